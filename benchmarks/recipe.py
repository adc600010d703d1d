"""What makes the `lite` network learn: central training on the default synthetic sites, one recipe change at a time.

The three default sites (``fedmer simulate``'s: CASME II, SAMM and SMIC formats, 8 subjects x 6 clips, MEGC2019
composite labels) are split into subject folds per site; each variant trains one network on the union of the
training folds exactly as ``fedmer simulate --mode central`` does (``client.task.train_local`` round by round, a
fresh optimiser each round, the AU prior's weight decaying over the rounds) and is scored on the held-out
subjects. UF1 and UAR are pooled over every held-out clip of all folds (MEGC2019), per seed; the table gives the
mean over seeds and its standard error.

Jobs (variant, seed, fold) run in ``--jobs`` worker processes of ``--threads`` threads each and are appended to
``<out>.jsonl`` as they finish, so an interrupted run resumes where it stopped.

    .venv/bin/python benchmarks/recipe.py [--variants recipe,before] [--seeds 0,1,2] [--folds 2] [--jobs 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"

VARIANTS: dict[str, dict[str, Any]] = {
    "recipe": {},
    "before": {
        "lr": 3e-4,
        "lr_schedule": "constant",
        "warmup_epochs": 0.0,
        "weight_decay": 0.0,
        "class_balance": False,
        "label_smoothing": 0.0,
        "shift": 0,
    },
    "no shift": {"shift": 0},
    "no label smoothing": {"label_smoothing": 0.0},
    "no class balance": {"class_balance": False},
    "constant lr": {"lr_schedule": "constant", "warmup_epochs": 0.0},
    "lr 3e-4": {"lr": 3e-4},
    "no weight decay": {"weight_decay": 0.0},
    "MER loss only": {"weights": {"flow": 0.0, "landmarks": 0.0, "au": 0.0}},
}
"""Each variant: what differs from the defaults. RunSettings fields (``weights``: LossWeights fields), and
``shift``: the training augmentation's largest shift (partitions.dataset.Augment)."""


def augmentation(variant: str):
    from partitions.dataset import Augment

    changes = VARIANTS[variant]
    return replace(Augment(), shift=changes["shift"]) if "shift" in changes else Augment()


def run_settings(variant: str, rounds: int, local_epochs: int):
    from client.site import RunSettings
    from models import LossWeights

    changes = {key: value for key, value in VARIANTS[variant].items() if key != "shift"}
    if "weights" in changes:
        changes["weights"] = replace(LossWeights(), **changes["weights"])
    return replace(RunSettings(), rounds=rounds, local_epochs=local_epochs, **changes)


def fold_data(data: Path, cache: Path, fold: int, folds: int, seed: int, augment):
    """The union of every site's training subjects of ``fold`` (augmented per seed) and its held-out clips."""
    from torch.utils.data import ConcatDataset

    from partitions.dataset import ClipDataset
    from partitions.labels import load_site
    from partitions.splits import subject_k_folds
    from server.baselines import SiteUnion

    train, test = [], []
    for name in ("casme2", "samm", "smic"):
        site = load_site(name, data / name, labels="composite3")
        split = subject_k_folds(site.samples, folds, seed=0)[fold]
        options = {"train": True, "seed": seed * 100 + fold, "augment": augment}
        train.append(ClipDataset.from_site(site, split.train, cache, **options))
        test.append(ClipDataset.from_site(site, split.test, cache))
    return SiteUnion(train), ConcatDataset(test)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one variant on one fold with one seed; the held-out labels and predictions."""
    import torch

    from client.task import evaluate_local, set_au_prior, train_local
    from models import build_model
    from server.baselines import au_prior
    from server.strategies import decay_prior_weight

    torch.set_num_threads(job["threads"])
    settings = run_settings(job["variant"], job["rounds"], job["local_epochs"])
    augment = augmentation(job["variant"])
    train, test = fold_data(Path(job["data"]), Path(job["cache"]), job["fold"], job["folds"], job["seed"], augment)
    torch.manual_seed(job["seed"] * 100 + job["fold"])
    model = build_model(settings.model_config(3))
    set_au_prior(model, au_prior([part.samples for part in train.parts]))
    start = time.perf_counter()
    for server_round in range(1, job["rounds"] + 1):
        options = settings.local_training(
            server_round,
            job["seed"] + server_round,
            "cpu",
            prior_weight=decay_prior_weight(server_round, job["rounds"]),
        )
        outcome = train_local(model, train, 3, options)
    seconds = time.perf_counter() - start
    result = evaluate_local(model, test, 3, seed=job["seed"])
    return {
        **{k: job[k] for k in ("key", "variant", "seed", "fold")},
        "train_seconds": round(seconds, 1),
        "final_terms": outcome.terms,
        "fold_uf1": result.uf1,
        "confusion": result.confusion,
        "flow_epe": result.epe,
        "landmark_nme": result.nme,
        "au_f1": result.au_f1,
    }


def job_key(variant: str, seed: int, fold: int, args: argparse.Namespace) -> str:
    """Identifies a finished job across restarts: the variant's settings, seed, fold and the run's shape."""
    settings = asdict(run_settings(variant, args.rounds, args.local_epochs))
    augment = asdict(augmentation(variant))
    shape = [seed, fold, args.folds, str(args.data), str(args.cache)]
    text = json.dumps([settings, augment, *shape], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def pooled(confusions: list[list[int]]) -> dict[str, float | None]:
    from server.server_app import pooled_scores

    return pooled_scores(confusions)


def summarise(rows: list[dict[str, Any]], variants: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """Per variant: pooled UF1/UAR per seed (all folds' held-out clips), their mean and standard error."""
    table = []
    for variant in variants:
        per_seed = {}
        for seed in seeds:
            mine = [r for r in rows if r["variant"] == variant and r["seed"] == seed]
            if mine:
                per_seed[seed] = {
                    **pooled([r["confusion"] for r in mine]),
                    "folds": len(mine),
                    "clips": sum(sum(r["confusion"]) for r in mine),
                }
        uf1 = [s["uf1"] for s in per_seed.values()]
        uar = [s["uar"] for s in per_seed.values()]
        table.append(
            {
                "variant": variant,
                "changes": VARIANTS[variant],
                "seeds": per_seed,
                "uf1_mean": round(statistics.fmean(uf1), 4) if uf1 else None,
                "uf1_se": round(statistics.stdev(uf1) / len(uf1) ** 0.5, 4) if len(uf1) > 1 else None,
                "uar_mean": round(statistics.fmean(uar), 4) if uar else None,
            }
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--cache", type=Path, default=Path("data/cache"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "recipe.json")
    parser.add_argument("--only-done", action="store_true", help="summarise the finished jobs, run nothing")
    args = parser.parse_args()
    variants, seeds = args.variants.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    from model_variants import prepared_sites

    prepared_sites(args.data, args.cache, subjects=8, clips=6, workers=2)
    log = args.out.with_suffix(".jsonl")
    done = {}
    if log.exists():
        done = {row["key"]: row for row in map(json.loads, log.read_text().splitlines()) if row}
    jobs = []
    for variant in variants:
        for seed in seeds:
            for fold in range(args.folds):
                key = job_key(variant, seed, fold, args)
                if key not in done and not args.only_done:
                    jobs.append(
                        {
                            "key": key,
                            "variant": variant,
                            "seed": seed,
                            "fold": fold,
                            "folds": args.folds,
                            "rounds": args.rounds,
                            "local_epochs": args.local_epochs,
                            "threads": args.threads,
                            "data": str(args.data),
                            "cache": str(args.cache),
                        }
                    )
    print(f"{len(jobs)} jobs to run ({len(done)} already done), {args.jobs} at a time", flush=True)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_job, job) for job in jobs]
        for count, future in enumerate(as_completed(futures), 1):
            row = future.result()
            done[row["key"]] = row
            with log.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(
                f"[{count}/{len(jobs)}] {row['variant']} seed {row['seed']} fold {row['fold']}: "
                f"UF1 {row['fold_uf1']:.3f} ({row['train_seconds']:.0f} s)",
                flush=True,
            )
    wanted = {job_key(v, s, f, args) for v in variants for s in seeds for f in range(args.folds)}
    rows = [row for key, row in done.items() if key in wanted]
    table = summarise(rows, variants, seeds)
    settings = {k: os.path.relpath(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"settings": settings, "summary": table, "runs": rows}, indent=2) + "\n")
    print("| variant | pooled UF1 (mean ± SE over seeds) | UAR | seeds |")
    print("|---|---|---|---|")
    for row in table:
        se = f" ± {row['uf1_se']:.3f}" if row["uf1_se"] is not None else ""
        print(f"| {row['variant']} | {row['uf1_mean']:.3f}{se} | {row['uar_mean']:.3f} | {len(row['seeds'])} |")
    print(f"wrote {args.out} and {log}")


if __name__ == "__main__":
    main()
