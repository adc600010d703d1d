"""Federation overhead of ``fedmer simulate`` per round, how it grows with the number of sites, and the bytes a
site sends and receives per round for each preset and sharing policy.

Writes one JSON (``--out``) with:

* the default main job (``fedmer simulate`` without arguments: three default-scale sites, fedavg, ``lite``,
  one local epoch, three rounds), run as that very command in its own process;
* the same federation on tiny data with 3, 10 and 30 sites (the databases repeat: casme2, samm, smic,
  casme2, ...), one local epoch, two rounds;
* per round: the server's wall time (the ``"phase": "round"`` line of ``metrics.jsonl``), every site's
  ``train-seconds`` and ``evaluate-seconds``, and the overhead under two definitions (see ``DEFINITIONS``);
* bytes per round per site for ``lite`` and ``mol`` under each sharing policy (``local-params``), from the
  model's state dict split (:func:`client.task.split_state`) and the records the server and sites exchange;
* the CPU load before and after each run: other jobs share this 2-core machine, so run it under ``nice``.

Each federation runs ``python -m server.cli simulate`` in a fresh process (Ray starts and stops with it),
with ``TMPDIR`` in a private folder that holds Ray's session files; the JSON lists any process still naming
that folder afterwards (``ray_leftovers``, expected empty).

    nice -n 10 .venv/bin/python benchmarks/federation_overhead.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from prepare_throughput import cpu_pressure
from torch import nn

from client.protocol import ARRAYS, COOCCURRENCE, METRICS, NUM_EXAMPLES, PRIOR_WEIGHT, SERVER_ROUND
from client.site import RunSettings
from client.task import LOSS_TERMS, Evaluation, TrainOutcome, evaluate_metrics, split_state, train_metrics
from models import build_model
from server.records import ROUND_PHASE, load_metrics
from server.server_app import DEFAULTS, resolve_settings, train_config
from server.strategies import EVALUATE, TRAIN, cooccurrence_prior, decay_prior_weight

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "federation_overhead.json"
DATABASES = ("casme2", "samm", "smic")
PRESETS = ("lite", "mol")
TARGET_SHARE = 0.10  # the target: overhead at most 10% of the round's wall time in the main job
CLASSES = 3  # composite3, the default label space

DEFINITIONS = {
    "wall_seconds": "the server's wall time of the round: from the end of the previous round (or of the query "
    "round) to the round's checkpoint written; it holds every site's train and evaluate message, aggregation "
    "and the records (metrics.jsonl line {'phase': 'round', 'seconds'})",
    "overhead_issue": "the issue's definition: wall_seconds minus the slowest site's train-seconds. It assumes "
    "the sites train in parallel; in this simulation one Ray worker of 2 CPUs runs the sites one after another, "
    "so it also counts the other sites' training and every evaluation as overhead and grows with the sites",
    "overhead_sequential": "wall_seconds minus the sum of every site's on-site compute (train-seconds + "
    "evaluate-seconds): what the federation adds around the compute when sites run one after another "
    "(message passing through Ray, (de)serialising arrays, loading a site's data and the received arrays into "
    "its model, aggregation, checkpoint and records); the measure that matches this engine",
    "share": "overhead seconds / wall_seconds",
    "per_site_seconds": "overhead seconds / (sites x rounds): what one site's round adds",
    "outside_rounds_seconds": "the process's wall time minus its rounds: imports, the data check (data "
    "prepared before), Ray's start and stop, the query round, summary and plot; paid once per run",
}
BYTES_DEFINITIONS = {
    "arrays": "ArrayRecord.count_bytes() of the shared arrays: tensor bytes plus their names (what train "
    "replies report as bytes-sent)",
    "received": "per site and round: the train message (shared arrays + train config) and the evaluate "
    "message (the aggregated shared arrays again + config). Flower's strategies send the arrays with both",
    "sent": "per site and round: the train reply (shared arrays + train metrics) and the evaluate reply (metrics only)",
    "same_for_every_strategy": "fedavg, fedprox, fedadam, fedmedian, krum, multikrum and personalised all send "
    "and receive the same shared arrays; local-params decide which",
}


# ----------------------------------------------------------------------------------------------- runs


def site_list(count: int) -> str:
    """``count`` sites over the default databases, repeated in order (casme2, samm, smic, casme2, ...)."""
    return ",".join(DATABASES[index % len(DATABASES)] for index in range(count))


def leftovers(marker: str) -> list[str]:
    """Command lines of live processes naming ``marker`` (Ray's session folder): Ray left behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in command:
                found.append(f"{entry.name}: {command[:160]}")
    return found


def machine_load() -> dict[str, Any]:
    """Load average and CPU pressure now: other jobs on the machine slow compute and overhead alike."""
    return {"load_average": [round(x, 2) for x in os.getloadavg()], "cpu_pressure": cpu_pressure()}


def simulate(work: Path, name: str, options: list[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """``fedmer simulate OPTIONS`` (``overrides`` through ``--config``) in its own process: its wall time and
    ``metrics.jsonl`` lines, and the load around it."""
    folder = work / name
    folder.mkdir()
    command = [sys.executable, "-m", "server.cli", "simulate", *options, "--out", str(folder / "run")]
    if overrides:
        config = folder / "overrides.toml"
        config.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in overrides.items()))
        command += ["--config", str(config)]
    private_tmp = Path(tempfile.mkdtemp(prefix="t", dir=work))  # Ray's RAY_TMPDIR is made in here
    before = machine_load()
    start = time.perf_counter()
    with (folder / "log.txt").open("w") as log:
        subprocess.run(
            command,
            cwd=ROOT,
            env={**os.environ, "TMPDIR": str(private_tmp)},
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
        )
    seconds = time.perf_counter() - start
    return {
        "command": " ".join(["fedmer", *command[3:]]),
        "process_seconds": seconds,
        "lines": load_metrics(folder / "run" / "metrics.jsonl"),
        "load_before": before,
        "load_after": machine_load(),
        "ray_leftovers": leftovers(str(private_tmp)),
    }


# ----------------------------------------------------------------------------------------------- overhead


def overhead(wall: float, subtracted: float, site_rounds: int) -> dict[str, float]:
    """Overhead seconds, share of ``wall`` once ``subtracted`` (compute) is taken out, and per site and round."""
    seconds = wall - subtracted
    return {
        "seconds": round(seconds, 3),
        "share": round(seconds / wall, 4),
        "per_site_seconds": round(seconds / site_rounds, 3),
    }


def round_figures(lines: list[dict[str, Any]], number: int, wall: float) -> dict[str, Any]:
    """One round: wall time, the sites' compute and both overheads."""
    train = [line["train-seconds"] for line in lines if line["round"] == number and line["phase"] == TRAIN]
    evaluate = [line["evaluate-seconds"] for line in lines if line["round"] == number and line["phase"] == EVALUATE]
    compute = sum(train) + sum(evaluate)
    return {
        "round": number,
        "sites": len(train),
        "wall_seconds": round(wall, 3),
        "train_seconds_sum": round(sum(train), 3),
        "evaluate_seconds_sum": round(sum(evaluate), 3),
        "site_compute_seconds_sum": round(compute, 3),
        "slowest_train_seconds": round(max(train), 3),
        "site_train_seconds": [round(value, 2) for value in train],
        "site_evaluate_seconds": [round(value, 2) for value in evaluate],
        "overhead_issue": overhead(wall, max(train), len(train)),
        "overhead_sequential": overhead(wall, compute, len(train)),
    }


def run_figures(run: dict[str, Any]) -> dict[str, Any]:
    """Per-round figures of a run, the same over all its rounds together, and what it spent outside rounds."""
    lines = run.pop("lines")
    walls = {line["round"]: line["seconds"] for line in lines if line["phase"] == ROUND_PHASE}
    rounds = [round_figures(lines, number, wall) for number, wall in sorted(walls.items())]
    wall = sum(walls.values())
    site_rounds = rounds[0]["sites"] * len(rounds)
    compute = sum(r["site_compute_seconds_sum"] for r in rounds)
    slowest = sum(r["slowest_train_seconds"] for r in rounds)
    bytes_sent = sorted({line["bytes-sent"] for line in lines if line["phase"] == TRAIN})
    return {
        **run,
        "process_seconds": round(run["process_seconds"], 3),
        "outside_rounds_seconds": round(run["process_seconds"] - wall, 3),
        "rounds": rounds,
        "all_rounds": {
            "wall_seconds": round(wall, 3),
            "site_compute_seconds_sum": round(compute, 3),
            "overhead_issue": overhead(wall, slowest, site_rounds),
            "overhead_sequential": overhead(wall, compute, site_rounds),
        },
        "bytes_sent_reported_by_sites": bytes_sent,
    }


# ----------------------------------------------------------------------------------------------- bytes


def norm_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Every normalisation layer's name: FedBN-style ``local-params`` (the issue's other example)."""
    kinds = (nn.GroupNorm, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)
    return tuple(name for name, module in model.named_modules() if isinstance(module, kinds))


def policies(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Sharing policy -> ``local-params`` prefixes."""
    return {
        "all shared": (),
        "flow_head local": ("flow_head",),
        "flow_head,landmark_head local": ("flow_head", "landmark_head"),
        "normalisation layers local": norm_prefixes(model),
    }


def record_bytes(sites: int) -> dict[str, int]:
    """Bytes of the records beside the arrays, built as the server and a site build them (round 1)."""
    settings = resolve_settings({**DEFAULTS, "sites": site_list(sites)})
    config = train_config(settings)
    config.update(
        {
            SERVER_ROUND: 1,
            PRIOR_WEIGHT: decay_prior_weight(1, settings.rounds),
            COOCCURRENCE: cooccurrence_prior([[0] * 144]),
        }
    )
    outcome = TrainOutcome(dict.fromkeys(LOSS_TERMS, 0.0), 0.0, 0.0, 1)
    scores = Evaluation(0.0, 0.0, 0.0, [0.0] * CLASSES, [0] * CLASSES**2, 0.0, 0.0, 0.0, 1)
    return {
        "train_config": config.count_bytes(),
        "evaluate_config": ConfigRecord({SERVER_ROUND: 1}).count_bytes(),
        "train_metrics": MetricRecord(train_metrics(0, outcome, 0)).count_bytes(),
        "evaluate_metrics": MetricRecord(evaluate_metrics(0, scores)).count_bytes(),
    }


def aggregated_bytes(arrays: ArrayRecord) -> int:
    """Bytes of FedAvg's aggregate of such arrays (what rounds after the first send; dtypes may change)."""
    reply = RecordDict({ARRAYS: arrays, METRICS: MetricRecord({NUM_EXAMPLES: 1})})
    return aggregate_arrayrecords([reply, reply], NUM_EXAMPLES).count_bytes()


def policy_bytes(state: dict[str, torch.Tensor], prefixes: tuple[str, ...], records: dict[str, int]) -> dict:
    """Bytes per round per site for one preset's state dict under one sharing policy."""
    shared, local = split_state(state, prefixes)
    arrays = ArrayRecord(torch_state_dict=shared)
    up, down = arrays.count_bytes(), aggregated_bytes(arrays)
    received = down + records["train_config"] + down + records["evaluate_config"]
    sent = up + records["train_metrics"] + records["evaluate_metrics"]
    kept = ArrayRecord(torch_state_dict=local).count_bytes() if local else 0
    return {
        "local_params": ",".join(prefixes),
        "shared_arrays": len(shared),
        "local_arrays": len(local),
        "shared_array_bytes": up,
        "shared_fraction": round(up / (up + kept), 4),
        "received_bytes": received,
        "sent_bytes": sent,
        "received_mib": round(received / 2**20, 3),
        "sent_mib": round(sent / 2**20, 3),
    }


def bytes_per_round() -> dict[str, Any]:
    """For each preset and sharing policy: what one site receives and sends in one round."""
    records = record_bytes(len(DATABASES))
    result: dict[str, Any] = {"definition": BYTES_DEFINITIONS, "records_beside_arrays": records}
    for name in PRESETS:
        torch.manual_seed(0)
        model = build_model(RunSettings(preset=name).model_config(CLASSES))
        state = model.state_dict()
        parameters = sum(p.numel() for p in model.parameters())
        result[name] = {
            "parameters": parameters,
            "policies": {
                policy: policy_bytes(state, prefixes, records) for policy, prefixes in policies(model).items()
            },
        }
    return result


# ----------------------------------------------------------------------------------------------- main


def scaling(work: Path, counts: list[int], rounds: int) -> list[dict[str, Any]]:
    """Tiny data, one local epoch, ``rounds`` rounds, for each number of sites."""
    options = ["--scale", "tiny", "--rounds", str(rounds)]
    return [
        {
            "sites": count,
            **run_figures(simulate(work, f"sites-{count}", options, {"sites": site_list(count), "local-epochs": 1})),
        }
        for count in counts
    ]


def main_job(work: Path, rounds: int | None) -> dict[str, Any]:
    """``fedmer simulate`` as the README runs it (``--rounds`` only when asked to cut it short)."""
    options = ["--rounds", str(rounds)] if rounds else []
    run = run_figures(simulate(work, "main", options, {}))
    share = run["all_rounds"]["overhead_sequential"]["share"]
    return {
        "settings": {
            key: DEFAULTS[key]
            for key in ("num-server-rounds", "strategy", "sites", "preset", "local-epochs", "batch-size")
        }
        | {"scale": "default"},
        "rounds_run": rounds or DEFAULTS["num-server-rounds"],
        **run,
        "target_share": TARGET_SHARE,
        "target_holds_sequential": share <= TARGET_SHARE,
        "target_holds_issue_definition": run["all_rounds"]["overhead_issue"]["share"] <= TARGET_SHARE,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--site-counts", default="3,10,30", help="numbers of tiny sites to simulate")
    parser.add_argument("--scaling-rounds", type=int, default=2)
    parser.add_argument("--main-rounds", type=int, default=None, help="cut the main job to this many rounds")
    parser.add_argument("--skip-main", action="store_true", help="leave the default main job out")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fo-"))  # short: Ray's socket paths are length-limited
    try:
        result = {
            "benchmark": "federation_overhead",
            "definition": DEFINITIONS,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "niceness": os.nice(0),
                "engine": "Flower simulation, one Ray worker of 2 CPUs",
                "contention": "other jobs shared this 2-core machine (load and CPU pressure around each "
                "run below); they slow compute and overhead alike, so read the shares, not the seconds",
            },
            "bytes_per_round_per_site": bytes_per_round(),
            "main_job": None if args.skip_main else main_job(work, args.main_rounds),
            "scaling": scaling(work, [int(n) for n in args.site_counts.split(",")], args.scaling_rounds),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary(result), indent=2))
    print(f"written {args.out}")


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The headline figures: overhead shares of the main job and per site count, bytes per policy."""
    runs = ([("main", result["main_job"])] if result["main_job"] else []) + [
        (f"{run['sites']} sites", run) for run in result["scaling"]
    ]
    shares = {
        name: {key: run["all_rounds"][key]["share"] for key in ("overhead_issue", "overhead_sequential")}
        for name, run in runs
    }
    traffic = {
        f"{name} {policy}": (values["received_mib"], values["sent_mib"])
        for name in PRESETS
        for policy, values in result["bytes_per_round_per_site"][name]["policies"].items()
    }
    return {"overhead_share": shares, "mib_received_sent": traffic}


if __name__ == "__main__":
    main()
