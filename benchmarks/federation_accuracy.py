"""Federated against central and local-only training on the default synthetic sites, with one compute budget.

Each seed runs the three commands a user would run, with the same run config (``--config`` TOML, ``--seed``):

- ``fedmer simulate --strategy S`` for each ``--strategies`` entry (the federation on Flower's simulation engine),
- ``fedmer train --mode central`` (one network on the union of the sites' training splits),
- ``fedmer train --mode local`` (one network per site on its own training split).

Every mode trains ``rounds x local-epochs`` epochs over each site's training clips and is scored after the
last round on the same held-out subjects: no round is selected on test subjects. A seed changes the model's
initialisation, the held-out subjects and the shuffling, so pooling seeds pools different test subjects.
``--epsilons 1,3,8`` adds, for each strategy, one federated run per DP budget (every site under sample-level
DP-SGD with that target epsilon for the whole run). Scores per mode: UF1 / UAR from the confusion matrices
summed over sites and seeds (MEGC2019's composite pooling), per seed the same over sites, and for ``local``
also the mean of the sites' own UF1 (what the average site gets alone). JSON:
``benchmarks/results/federation_accuracy.json``.

    .venv/bin/python benchmarks/federation_accuracy.py --config benchmarks/federation_accuracy.toml \
        --strategies fedavg,fedavgm --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from server.records import METRICS_FILE, SUMMARY_FILE, load_metrics, load_summary
from server.server_app import pooled_scores
from server.strategies import EVALUATE

ROOT = Path(__file__).resolve().parents[1]
FEDMER = Path(sys.executable).with_name("fedmer")
BASELINES = {"central": ["train", "--mode", "central"], "local": ["train", "--mode", "local"]}


def mode_command(mode: str) -> list[str]:
    """``federated-<strategy>`` -> ``simulate --strategy <strategy>``, ``federated-<strategy>-dp<epsilon>`` -> the
    same with sample-level DP at every site (``--dp --target-epsilon <epsilon>``); a baseline -> ``train --mode``."""
    if mode.startswith("federated-"):
        strategy, _, epsilon = mode.removeprefix("federated-").partition("-dp")
        private = ["--dp", "--target-epsilon", epsilon] if epsilon else []
        return ["simulate", "--strategy", strategy, *private]
    return BASELINES[mode]


def run_mode(mode: str, config: Path, seed: int, out: Path) -> float:
    """One command to completion (its console goes to ``out``.log); its wall seconds.

    A run directory that already holds a finished run (its ``summary.json``) is kept, and the wall seconds
    its log recorded are reused, so an interrupted benchmark resumes where it stopped (``--runs``).
    """
    seconds_file = out.with_suffix(".seconds")
    if (out / SUMMARY_FILE).is_file() and seconds_file.is_file():
        return float(seconds_file.read_text())
    command = [str(FEDMER), *mode_command(mode), "--config", str(config), "--seed", str(seed), "--out", str(out)]
    start = time.perf_counter()
    with open(f"{out}.log", "w", encoding="utf-8") as log:
        subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True, env=os.environ.copy())
    seconds = time.perf_counter() - start
    seconds_file.write_text(f"{seconds:.1f}\n")
    return seconds


def last_evaluations(run: Path) -> dict[str, dict[str, Any]]:
    """Each site's evaluate line of the last round in ``metrics.jsonl``."""
    evaluations = [line for line in load_metrics(run / METRICS_FILE) if line["phase"] == EVALUATE]
    last = max(line["round"] for line in evaluations)
    return {line["site"]: line for line in evaluations if line["round"] == last}


def scored(confusions: list[list[int]]) -> dict[str, float]:
    """UF1 / UAR of summed confusion matrices (None -> nan for JSON-free comparisons)."""
    return {key: float(value) for key, value in pooled_scores(confusions).items()}


def summarise(runs: dict[str, list[Path]]) -> dict[str, Any]:
    """Per mode: pooled over sites and seeds, per seed, and per site (pooled over seeds)."""
    result: dict[str, Any] = {}
    for mode, paths in runs.items():
        per_seed = [last_evaluations(path) for path in paths]
        sites = sorted(per_seed[0])
        entry: dict[str, Any] = {
            "pooled": scored([e["confusion"] for evaluations in per_seed for e in evaluations.values()]),
            "per_seed": [scored([e["confusion"] for e in evaluations.values()]) for evaluations in per_seed],
            "sites": {site: scored([evaluations[site]["confusion"] for evaluations in per_seed]) for site in sites},
        }
        entry["site_mean_uf1"] = float(np.mean([entry["sites"][site]["uf1"] for site in sites]))
        spent = [dp["epsilon"] for path in paths for dp in site_privacy(path) if dp is not None]
        if spent:
            entry["max_site_epsilon"] = max(spent)  # what the run actually spent, at each site's own delta
        result[mode] = entry
    return result


def site_privacy(run: Path) -> list[dict[str, Any] | None]:
    """Each site's ``dp`` entry in the run's ``summary.json`` (none without sample-level DP)."""
    summary = load_summary(run / SUMMARY_FILE)
    return [values.get("dp") for values in summary["sites"].values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="run-config TOML shared by the three modes")
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds")
    parser.add_argument("--strategies", default="fedavg", help="comma-separated strategies of the federated runs")
    parser.add_argument("--baselines", default="central,local", help="which of central,local ('' for none)")
    parser.add_argument(
        "--epsilons", default="", help="comma-separated DP budgets: each strategy also runs with --dp at each"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/federation_accuracy.json")
    parser.add_argument("--runs", type=Path, help="keep the run directories here and resume finished ones")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    names = [name.strip() for name in args.strategies.split(",") if name.strip()]
    epsilons = [epsilon.strip() for epsilon in args.epsilons.split(",") if epsilon.strip()]
    strategies = [f"federated-{name}" for name in names]
    strategies += [f"federated-{name}-dp{epsilon}" for name in names for epsilon in epsilons]
    modes = strategies + [name.strip() for name in args.baselines.split(",") if name.strip()]
    runs: dict[str, list[Path]] = {mode: [] for mode in modes}
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="fedmer-accuracy-") as temporary:
        scratch = args.runs or Path(temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            for mode in modes:
                out = scratch / f"{mode}-seed{seed}"
                print(f"seed {seed}: {mode} ...", flush=True)
                seconds[mode].append(run_mode(mode, args.config.resolve(), seed, out))
                runs[mode].append(out)
                print(f"seed {seed}: {mode} done in {seconds[mode][-1]:.0f} s", flush=True)
        report = {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "config": args.config.read_text(),
            "seeds": seeds,
            "seconds": seconds,
            "modes": summarise(runs),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for mode, entry in report["modes"].items():
        pooled, site_mean = entry["pooled"], entry["site_mean_uf1"]
        print(f"{mode:<10} UF1 {pooled['uf1']:.3f}  UAR {pooled['uar']:.3f}  site mean UF1 {site_mean:.3f}")


if __name__ == "__main__":
    main()
