"""What makes the `lite` network learn, and what federating it costs: one recipe change at a time, in three modes.

The three default sites (``fedmer simulate``'s: CASME II, SAMM and SMIC formats, 8 subjects x 6 clips, MEGC2019
composite labels) are split into subject folds per site, and every job (variant, mode, seed, fold) is scored on
the held-out subjects of its fold. ``--modes``:

- ``central``: one network on the union of the training folds, exactly as ``fedmer simulate --mode central``
  trains (``client.task.train_local`` round by round, a fresh optimiser each round, the AU prior's weight
  decaying over the rounds);
- ``federated``: FedAvg in one process, each site training the global weights on its own fold per round as the
  ClientApp does (same round options and seeds), aggregated by Flower's FedAvg aggregation;
- ``local``: one network per site on its own fold.

UF1 and UAR are pooled over every held-out clip of all folds (MEGC2019), per seed; the table gives the mean over
seeds and its standard error, and the mean of the sites' own UF1 where each site's clips were scored apart.

Jobs run in ``--jobs`` worker processes of ``--threads`` threads each and are appended to ``<out>.jsonl`` as
they finish, so an interrupted run resumes where it stopped.

    .venv/bin/python benchmarks/recipe.py [--variants recipe,before] [--modes central,federated,local] \
        [--seeds 0,1,2] [--folds 2] [--jobs 2]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
SITES = ("casme2", "samm", "smic")
BATCH_SIZE = 8
"""Every job's batch: the budget all of these figures were measured with, whatever the run config's default."""

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
    return replace(RunSettings(), rounds=rounds, local_epochs=local_epochs, batch_size=BATCH_SIZE, **changes)


def fold_data(data: Path, cache: Path, fold: int, folds: int, seed: int, augment):
    """Per site, in SITES order: the training subjects of ``fold`` (augmented per seed) and its held-out clips."""
    from partitions.dataset import ClipDataset
    from partitions.labels import load_site
    from partitions.splits import subject_k_folds

    train, test = [], []
    for name in SITES:
        site = load_site(name, data / name, labels="composite3")
        split = subject_k_folds(site.samples, folds, seed=0)[fold]
        options = {"train": True, "seed": seed * 100 + fold, "augment": augment}
        train.append(ClipDataset.from_site(site, split.train, cache, **options))
        test.append(ClipDataset.from_site(site, split.test, cache))
    return train, test


def round_options(settings, job: dict[str, Any], server_round: int, site_index: int = 0):
    """One round's local training, seeded as a federated site's round (the job's seed + site index + round)."""
    from server.baselines import round_training

    return round_training(replace(settings, seed=job["seed"]), site_index, server_round, "cpu")


def train_central(model, train: list, settings, job: dict[str, Any]) -> list:
    """One network on the union of the sites' training folds, as ``fedmer simulate --mode central``."""
    from client.task import set_au_prior, train_local
    from server.baselines import SiteUnion, au_prior

    union = SiteUnion(train)
    set_au_prior(model, au_prior([part.samples for part in train]))
    for server_round in range(1, job["rounds"] + 1):
        outcome = train_local(model, union, 3, round_options(settings, job, server_round))
    return [(model, outcome)] * len(train)


class FoldSites:
    """The grid a strategy sees in :func:`train_federated`: one node per site, answering train messages by
    training on that site's fold in this process (the ClientApp's round options and seeds, FedProx's mu)."""

    def __init__(self, model, train: list, settings, job: dict[str, Any]) -> None:
        self.model, self.train, self.settings, self.job = model, train, settings, job
        self.outcomes: dict[int, Any] = {}

    def get_node_ids(self) -> list[int]:
        return [index + 1 for index in range(len(self.train))]  # node id = site index + 1

    def send_and_receive(self, messages, timeout=None) -> list:
        from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

        from client.protocol import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, PROXIMAL_MU, SERVER_ROUND, SITE_INDEX
        from client.task import train_local

        replies = []
        for message in messages:
            site, config = message.metadata.dst_node_id - 1, message.content[CONFIG]
            server_round = int(config[SERVER_ROUND])
            options = replace(
                round_options(self.settings, self.job, server_round, site), mu=float(config.get(PROXIMAL_MU, 0.0))
            )
            self.model.load_state_dict(message.content[ARRAYS].to_torch_state_dict())
            self.outcomes[site] = train_local(self.model, self.train[site], 3, options)
            metrics = MetricRecord({SITE_INDEX: site, NUM_EXAMPLES: self.outcomes[site].examples})
            arrays = ArrayRecord(torch_state_dict=self.model.state_dict())
            replies.append(Message(RecordDict({ARRAYS: arrays, METRICS: metrics}), reply_to=message))
        return replies


def train_federated(model, train: list, settings, job: dict[str, Any]) -> list:
    """A federation in one process: each round the project's strategy (``job["strategy"]``, built by
    ``server.strategies.build_strategy`` from ``job["server"]``) configures the round, every site trains the
    global weights on its own fold, and the strategy aggregates the replies."""
    import logging

    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from client.protocol import SERVER_ROUND
    from client.task import set_au_prior
    from server.baselines import au_prior
    from server.strategies import build_strategy

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # a ServerApp's, from the SuperLink
    logging.getLogger("flwr").setLevel(logging.WARNING)  # not "Sampled 3 nodes" each round
    set_au_prior(model, au_prior([part.samples for part in train]))
    strategy = build_strategy(job["strategy"], len(train), {"min-sites": len(train), **job["server"]})
    sites = FoldSites(model, train, settings, job)
    global_arrays = ArrayRecord(torch_state_dict=model.state_dict())
    for server_round in range(1, job["rounds"] + 1):
        config = ConfigRecord({SERVER_ROUND: server_round})  # FedAvg sets it too; the sites read it
        messages = strategy.configure_train(server_round, global_arrays, config, sites)
        global_arrays, _ = strategy.aggregate_train(server_round, sites.send_and_receive(messages))
    model.load_state_dict(global_arrays.to_torch_state_dict())
    return [(model, sites.outcomes[index]) for index in range(len(train))]


def train_local_only(model, train: list, settings, job: dict[str, Any]) -> list:
    """One network per site on its own training fold, from the same initial weights."""
    import copy

    from client.task import set_au_prior, train_local
    from server.baselines import au_prior

    trained = []
    for index, part in enumerate(train):
        mine = copy.deepcopy(model)
        set_au_prior(mine, au_prior([part.samples]))
        for server_round in range(1, job["rounds"] + 1):
            outcome = train_local(mine, part, 3, round_options(settings, job, server_round, index))
        trained.append((mine, outcome))
    return trained


MODES = {"central": train_central, "federated": train_federated, "local": train_local_only}
"""How a job trains: each returns, per site, the network that site's held-out clips are scored with and its
last round's outcome."""


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one variant in one mode on one fold with one seed; each site's held-out confusion matrix."""
    import numpy as np
    import torch

    from client.task import evaluate_local
    from models import build_model

    torch.set_num_threads(job["threads"])
    settings = run_settings(job["variant"], job["rounds"], job["local_epochs"])
    augment = augmentation(job["variant"])
    train, test = fold_data(Path(job["data"]), Path(job["cache"]), job["fold"], job["folds"], job["seed"], augment)
    torch.manual_seed(job["seed"] * 100 + job["fold"])
    model = build_model(settings.model_config(3))
    start = time.perf_counter()
    trained = MODES[job["mode"]](model, train, settings, job)
    seconds = time.perf_counter() - start
    results = [evaluate_local(net, part, 3, seed=job["seed"]) for (net, _), part in zip(trained, test, strict=True)]
    clips = [r.examples for r in results]
    return {
        **{k: job[k] for k in ("key", "variant", "mode", "seed", "fold")},
        **({"federation": {"strategy": job["strategy"], "server": job["server"]}} if "strategy" in job else {}),
        "rounds": job["rounds"],
        "local_epochs": job["local_epochs"],
        "train_seconds": round(seconds, 1),
        "final_terms": [outcome.terms for _, outcome in trained],
        "confusion": np.sum([r.confusion for r in results], axis=0).tolist(),
        "site_confusions": dict(zip(SITES, [r.confusion for r in results], strict=True)),
        "site_uf1": dict(zip(SITES, [r.uf1 for r in results], strict=True)),
        "flow_epe": float(np.average([r.epe for r in results], weights=clips)),
        "landmark_nme": float(np.average([r.nme for r in results], weights=clips)),
        "au_f1": float(np.average([r.au_f1 for r in results], weights=clips)),
    }


def federation(mode: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """A federated job's strategy and its server settings (``--strategy``, ``--server``); None for other modes."""
    return {"strategy": args.strategy, "server": server_settings(args.server)} if mode == "federated" else None


def server_settings(text: str) -> dict[str, float]:
    """``--server "server-lr=3,server-momentum=0"``: run-config keys of ``build_strategy``, as numbers."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    try:
        return {key.strip(): float(value) for key, value in pairs}
    except ValueError as exc:
        raise SystemExit(f"--server {text!r}: give comma-separated key=number pairs ({exc})") from exc


def mode_label(row: dict[str, Any]) -> str:
    """``central``, ``local``, ``federated`` (FedAvg) or e.g. ``federated fedavgm server-lr=3``."""
    mode, plan = mode_of(row), row.get("federation")
    if mode != "federated" or plan is None or plan == {"strategy": "fedavg", "server": {}}:
        return mode
    return " ".join([mode, plan["strategy"], *(f"{k}={v:g}" for k, v in sorted(plan["server"].items()))])


def job_key(variant: str, mode: str, seed: int, fold: int, args: argparse.Namespace) -> str:
    """Identifies a finished job across restarts: the variant's settings, mode, seed, fold and the run's shape.
    The central mode leaves itself out of the key, and plain FedAvg its strategy, so that the jobs run before
    modes (and strategies) existed still count."""
    settings = asdict(run_settings(variant, args.rounds, args.local_epochs))
    augment = asdict(augmentation(variant))
    shape = [seed, fold, args.folds, str(args.data), str(args.cache)] + ([] if mode == "central" else [mode])
    plan = federation(mode, args)
    if plan is not None and plan != {"strategy": "fedavg", "server": {}}:
        shape.append(plan)
    text = json.dumps([settings, augment, *shape], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def pooled(confusions: list[list[int]]) -> dict[str, float | None]:
    from server.server_app import pooled_scores

    return pooled_scores(confusions)


def mode_of(row: dict[str, Any]) -> str:
    """A job's mode (rows from before modes existed are central)."""
    return row.get("mode", "central")


def seed_scores(mine: list[dict[str, Any]]) -> dict[str, Any]:
    """One seed's jobs (its folds): UF1/UAR pooled over every held-out clip, and per site where recorded, with
    the mean of the sites' own UF1 (what the average site gets)."""
    scores = {
        **pooled([r["confusion"] for r in mine]),
        "folds": len(mine),
        "clips": sum(sum(r["confusion"]) for r in mine),
    }
    if all("site_confusions" in r for r in mine):
        sites = {site: pooled([r["site_confusions"][site] for r in mine]) for site in SITES}
        scores["sites"] = sites
        scores["site_mean_uf1"] = statistics.fmean(site["uf1"] for site in sites.values())
    return scores


def mean_and_se(values: list[float]) -> tuple[float | None, float | None]:
    mean = round(statistics.fmean(values), 4) if values else None
    return mean, round(statistics.stdev(values) / len(values) ** 0.5, 4) if len(values) > 1 else None


def summarise(rows: list[dict[str, Any]], variants: list[str], modes: list[str], seeds: list[int]):
    """Per variant and mode: pooled UF1/UAR per seed (all folds' held-out clips), their mean and standard error
    over seeds, and the sites' mean UF1 where each site's clips were recorded."""
    table = []
    for variant in variants:
        for mode in modes:
            per_seed = {}
            for seed in seeds:
                mine = [r for r in rows if r["variant"] == variant and mode_of(r) == mode and r["seed"] == seed]
                if mine:
                    per_seed[seed] = seed_scores(mine)
            if not per_seed:
                continue
            uf1_mean, uf1_se = mean_and_se([s["uf1"] for s in per_seed.values()])
            site_mean, site_se = mean_and_se([s["site_mean_uf1"] for s in per_seed.values() if "site_mean_uf1" in s])
            table.append(
                {
                    "variant": variant,
                    "mode": mode_label(next(r for r in rows if mode_of(r) == mode)),
                    "changes": VARIANTS[variant],
                    "seeds": per_seed,
                    "uf1_mean": uf1_mean,
                    "uf1_se": uf1_se,
                    "uar_mean": mean_and_se([s["uar"] for s in per_seed.values()])[0],
                    "site_mean_uf1": site_mean,
                    "site_mean_uf1_se": site_se,
                }
            )
    return table


def _cell(mean: float | None, se: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--modes", default="central", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--strategy", default="fedavg", help="the federated mode's (server.strategies.STRATEGIES)")
    parser.add_argument("--server", default="", help='its settings, e.g. "server-lr=3,server-momentum=0"')
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--only-folds", default="", help="run these of the folds only (a quick look), e.g. 0")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--cache", type=Path, default=Path("data/cache"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "recipe.json")
    parser.add_argument("--only-done", action="store_true", help="summarise the finished jobs, run nothing")
    args = parser.parse_args()
    variants, modes = args.variants.split(","), args.modes.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    for option, given, known in (("--variants", variants, VARIANTS), ("--modes", modes, MODES)):
        unknown = [v for v in given if v not in known]
        if unknown:
            parser.error(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")

    from model_variants import prepared_sites

    prepared_sites(args.data, args.cache, subjects=8, clips=6, workers=2)
    log = args.out.with_suffix(".jsonl")
    done = {}
    if log.exists():
        done = {row["key"]: row for row in map(json.loads, log.read_text().splitlines()) if row}
    jobs, wanted = [], set()
    folds = [int(f) for f in args.only_folds.split(",")] if args.only_folds else range(args.folds)
    for variant, mode, seed, fold in itertools.product(variants, modes, seeds, folds):
        key = job_key(variant, mode, seed, fold, args)
        wanted.add(key)
        if key not in done and not args.only_done:
            shape = {"folds": args.folds, "rounds": args.rounds, "local_epochs": args.local_epochs}
            where = {"threads": args.threads, "data": str(args.data), "cache": str(args.cache)}
            plan = federation(mode, args) or {}
            jobs.append(
                {"key": key, "variant": variant, "mode": mode, "seed": seed, "fold": fold, **shape, **where, **plan}
            )
    print(f"{len(jobs)} jobs to run ({len(done)} already done), {args.jobs} at a time", flush=True)
    run_jobs(jobs, args.jobs, done, log)
    rows = [row for key, row in done.items() if key in wanted]
    table = summarise(rows, variants, modes, seeds)
    settings = {k: os.path.relpath(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"settings": settings, "summary": table, "runs": rows}, indent=2) + "\n")
    print("| variant | mode | pooled UF1 (mean ± SE over seeds) | UAR | sites' mean UF1 | seeds |")
    print("|---|---|---|---|---|---|")
    for row in table:
        pooled_uf1 = _cell(row["uf1_mean"], row["uf1_se"])
        site_mean = _cell(row["site_mean_uf1"], row["site_mean_uf1_se"])
        cells = [row["variant"], row["mode"], pooled_uf1, f"{row['uar_mean']:.3f}", site_mean, str(len(row["seeds"]))]
        print("| " + " | ".join(cells) + " |")
    print(f"wrote {args.out} and {log}")


def run_jobs(jobs: list[dict[str, Any]], workers: int, done: dict[str, dict[str, Any]], log: Path) -> None:
    """Run ``jobs`` in worker processes, appending each finished one to ``log`` (and ``done``) at once."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_job, job) for job in jobs]
        for count, future in enumerate(as_completed(futures), 1):
            row = future.result()
            done[row["key"]] = row
            with log.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(
                f"[{count}/{len(jobs)}] {row['variant']} {mode_label(row)} seed {row['seed']} fold {row['fold']}: "
                f"UF1 {pooled([row['confusion']])['uf1']:.3f} ({row['train_seconds']:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
