"""Is the synthetic benchmark non-trivial? Labels must hide from single frames and show in the motion.

Writes synthetic CASME II-, SAMM- and SMIC-format sites, reads them with the
real readers under the MEGC2019 composite labels, and trains the same linear
classifier (PCA + logistic regression, subject-grouped 5-fold CV, so no
subject is in train and test) on three inputs taken from a fixed face crop:

- the onset frame: a neutral face, i.e. identity and lighting only;
- the apex frame: one frame at the ME's peak;
- apex minus onset: the motion.

Writes JSON and a bar chart (UF1, UAR, chance) to ``benchmarks/results/``.
Usage: ``python benchmarks/synth_learnability.py [--subjects 16 --clips 8 --data DIR]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, recall_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from partitions.labels import load_site
from partitions.records import Sample
from partitions.synth.ground_truth import load_ground_truth
from partitions.synth.writer import synthesise

SITES = ("casme2", "samm", "smic")
CROP = 128  # pixels around the frame centre: the synthetic faces sit there, within a few pixels
SIZE = 64


def face_crop(path: Path) -> np.ndarray:
    """Grey central crop, downsampled: the same region for every clip, no alignment that could leak labels."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    h, w = image.shape
    top, left = (h - CROP) // 2, (w - CROP) // 2
    crop = image[top : top + CROP, left : left + CROP].astype(np.float32)
    return cv2.resize(crop, (SIZE, SIZE), interpolation=cv2.INTER_AREA).ravel()


def onset_and_apex(sample: Sample) -> tuple[Path, Path]:
    """Frames at onset and apex; SMIC annotates neither, so the synthetic ground truth supplies them there."""
    onset, apex = sample.onset, sample.apex
    if onset is None or apex is None:
        motion = load_ground_truth(sample.frames[0].parent).models[0]
        onset = int(motion.frame_numbers[0])
        apex = int(motion.frame_numbers[np.argmax(motion.curves.sum(axis=1))])
    index = sample.frame_numbers.index
    return sample.frames[index(onset)], sample.frames[index(apex)]


def features(samples: list[Sample]) -> dict[str, np.ndarray]:
    pairs = [onset_and_apex(s) for s in samples]
    onset = np.stack([face_crop(first) for first, _ in pairs])
    apex = np.stack([face_crop(peak) for _, peak in pairs])
    return {
        "onset frame (identity, lighting)": onset,
        "apex frame (single frame)": apex,
        "apex - onset (motion)": apex - onset,
    }


def predict_grouped(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """Out-of-fold predictions, subject-grouped 5-fold CV."""
    predictions = np.empty_like(y)
    folds = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
    for train, test in folds.split(x, y, groups):
        model = make_pipeline(
            StandardScaler(),
            PCA(n_components=min(40, len(train) - 1), random_state=seed),
            LogisticRegression(max_iter=2000, class_weight="balanced", C=0.1),
        )
        model.fit(x[train], y[train])
        predictions[test] = model.predict(x[test])
    return predictions


def evaluate(x: np.ndarray, y: np.ndarray, groups: np.ndarray, sites: np.ndarray, seed: int) -> dict[str, float]:
    """UF1/UAR of predictions pooled over folds (as MEGC2019 pools LOSO), two ways.

    ``pooled``: one classifier over all sites, which may recognise the site
    and guess its majority class; ``within_site``: one classifier per site,
    predictions pooled after, so only what is inside a site's clips counts.
    """
    pooled = predict_grouped(x, y, groups, seed)
    within = np.empty_like(y)
    for site in np.unique(sites):
        mask = sites == site
        within[mask] = predict_grouped(x[mask], y[mask], groups[mask], seed)
    return {
        "pooled_uf1": float(f1_score(y, pooled, average="macro")),
        "pooled_uar": float(recall_score(y, pooled, average="macro")),
        "uf1": float(f1_score(y, within, average="macro")),
        "uar": float(recall_score(y, within, average="macro")),
    }


def plot(results: dict, chance: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    uf1 = [results[n]["uf1"] for n in names]
    uar = [results[n]["uar"] for n in names]
    positions = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(positions - 0.18, uf1, 0.36, label="UF1")
    ax.bar(positions + 0.18, uar, 0.36, label="UAR")
    ax.axhline(chance, color="black", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
    ax.set_xticks(positions, [n.replace(" (", "\n(") for n in names])
    ax.set_ylim(0, 1)
    ax.set_ylabel("within-site, subject-grouped 5-fold CV")
    ax.set_title("Synthetic sites, composite 3 classes: label is in the motion only")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/learnability"))
    parser.add_argument("--subjects", type=int, default=16)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    roots = synthesise(args.data, seed=args.seed, sites=SITES, subjects=args.subjects, clips_per_subject=args.clips)
    sites = [load_site(name, roots[name], labels="composite3") for name in SITES]
    samples = [s for site in sites for s in site.samples]
    y = np.array([t for site in sites for t in site.targets])
    groups = np.array([s.database + "/" + s.subject for s in samples])
    classes = sites[0].space.classes
    databases = np.array([s.database for s in samples])
    results = {name: evaluate(x, y, groups, databases, args.seed) for name, x in features(samples).items()}
    report = {
        "clips": len(samples),
        "subjects": len(set(groups)),
        "classes": dict(zip(classes, np.bincount(y).tolist(), strict=True)),
        "chance_uf1_uar": 1.0 / len(classes),
        "protocol": "composite3, StratifiedGroupKFold(5) by subject, "
        "PCA(40)+logistic regression on a 64x64 grey centre crop; uf1/uar: one classifier per site, "
        "predictions pooled; pooled_*: one classifier over all sites",
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "synth_learnability.json").write_text(json.dumps(report, indent=2))
    plot(results, 1.0 / len(classes), args.out / "synth_learnability.png")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
