"""Which CCC graph and which loss weights: the `lite` network trained on the synthetic sites.

The three default synthetic sites (CASME II, SAMM, SMIC formats; MEGC2019 composite labels) are pooled
and split into subject-grouped folds per site; each configuration trains from the same seed on the
training folds and is scored on the held-out subjects: UF1/UAR, AU F1, flow EPE against the exact
displacement and against TV-L1, landmark NME. Results go to JSON (one row per configuration and fold).

    .venv/bin/python benchmarks/model_variants.py [--configs positions,channels] [--epochs 20] [--folds 2]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader

from client.training import evaluate, train_epoch
from models import LossWeights, MultitaskLoss, build_model, preset
from partitions.cache import prepare_site
from partitions.dataset import ClipDataset
from partitions.labels import load_site
from partitions.splits import subject_k_folds
from partitions.synth.writer import synthesise

SITES = ("casme2", "samm", "smic")
CONFIGS: dict[str, dict] = {
    "positions": {"ccc_graph": "positions", "weights": LossWeights()},
    "channels": {"ccc_graph": "channels", "weights": LossWeights()},
    "mer-only": {"ccc_graph": "positions", "weights": LossWeights(flow=0.0, landmarks=0.0, au=0.0)},
    "aux-x5": {"ccc_graph": "positions", "weights": LossWeights(flow=0.5, landmarks=5.0, au=2.5)},
}


def prepared_sites(data: Path, cache: Path, subjects: int, clips: int, workers: int) -> dict:
    """Synthesise (or reuse) and prepare the default sites; returns each site with composite3 labels."""
    roots = synthesise(data, seed=0, sites=SITES, subjects=subjects, clips_per_subject=clips, progress=False)
    sites = {}
    for name, root in roots.items():
        prepare_site(name, root, cache, workers=workers, labels="composite3")
        sites[name] = load_site(name, root, labels="composite3")
    return sites


def fold_datasets(sites: dict, cache: Path, fold: int, folds: int) -> tuple[ConcatDataset, ConcatDataset]:
    train, test = [], []
    for site in sites.values():
        split = subject_k_folds(site.samples, folds, seed=0)[fold]
        train.append(ClipDataset.from_site(site, split.train, cache, train=True, seed=fold))
        test.append(ClipDataset.from_site(site, split.test, cache))
    return ConcatDataset(train), ConcatDataset(test)


def run(name: str, train, test, epochs: int, seed: int) -> dict:
    settings = CONFIGS[name]
    torch.manual_seed(seed)
    model = build_model(preset("lite", num_classes=3, ccc_graph=settings["ccc_graph"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-4)
    loss_fn = MultitaskLoss(settings["weights"])
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=8, shuffle=True, generator=generator)
    start, history = time.perf_counter(), []
    for epoch in range(epochs):
        for part in train.datasets:
            part.set_epoch(epoch)
        prior = max(0.0, 1.0 - epoch / max(epochs - 1, 1))  # r decays from 1 to 0, as the server will do
        history.append(train_epoch(model, loader, optimizer, loss_fn, prior_weight=prior))
        print(f"  {name} epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k} {v:.3f}" for k, v in history[-1].items()))
    metrics = evaluate(model, DataLoader(test, batch_size=8), num_classes=3)
    return {"config": name, "weights": asdict(settings["weights"]), "ccc_graph": settings["ccc_graph"],
            "train_seconds": round(time.perf_counter() - start, 1), "final_train": history[-1], **metrics}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over folds per configuration."""
    keys = ("uf1", "uar", "au_f1", "flow_epe_exact", "flow_epe", "landmark_nme", "train_seconds")
    out = []
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == name]
        out.append({"config": name, **{k: round(float(np.mean([r[k] for r in mine if k in r])), 4)
                                       for k in keys if any(k in r for r in mine)}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--cache", type=Path, default=Path("data/cache"))
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "model_variants.json")
    args = parser.parse_args()
    sites = prepared_sites(args.data, args.cache, args.subjects, args.clips, args.workers)
    rows = []
    for fold in range(args.folds):
        train, test = fold_datasets(sites, args.cache, fold, args.folds)
        print(f"fold {fold + 1}/{args.folds}: {len(train)} training clips, {len(test)} held-out clips")
        for name in args.configs.split(","):
            rows.append({"fold": fold, **run(name, train, test, args.epochs, seed=fold)})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "final_train"}))
    summary = summarise(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": vars(args) | {"data": str(args.data), "cache": str(args.cache),
                                                              "out": str(args.out)},
                                    "summary": summary, "runs": rows}, indent=2) + "\n")
    print("| config | " + " | ".join(k for k in summary[0] if k != "config") + " |")
    for row in summary:
        print(f"| {row['config']} | " + " | ".join(str(v) for k, v in row.items() if k != "config") + " |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
