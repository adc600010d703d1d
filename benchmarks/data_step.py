"""Time of ``fedmer simulate``'s data step: synthesising and preparing the three default sites.

Runs ``server.simulate.prepare_data`` at scale ``default`` (CASME II, SAMM and SMIC at 8 subjects x 6 clips,
composite labels, 2 workers), in a fresh data and cache folder each time, as a first ``fedmer simulate`` on a
fresh clone does, and times its two halves (synthesis, preparation) in wall seconds and in CPU seconds (which
other load on the machine inflates far less). Each ``--code`` is a checkout of fedmer (this one by default;
e.g. ``git archive <commit> | tar -x -C /tmp/before`` for a before/after comparison); runs alternate between
the checkouts ``--repeat`` times so that other load on a shared machine falls on all of them alike. Every run
is a subprocess whose progress lines go to a log beside the data.

    .venv/bin/python benchmarks/data_step.py --code before=/tmp/before --code after=. --repeat 2
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

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "data_step.json"
REPO = Path(__file__).resolve().parents[1]

# Runs inside the checkout measured: times synthesise (called by prepare_data) apart from the rest, in wall
# seconds and in CPU seconds of this process and its finished workers (which other load inflates far less).
CHILD = """
import json, resource, sys, time
from pathlib import Path
import partitions.synth.writer as writer
from server.simulate import Scale, prepare_data, simulation_config

def cpu():
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                         resource.RUSAGE_CHILDREN)))

work = Path(sys.argv[1])
seconds, cpu_seconds = {}, {}
synthesise = writer.synthesise

def timed_synthesise(*args, **kwargs):
    start, start_cpu = time.perf_counter(), cpu()
    try:
        return synthesise(*args, **kwargs)
    finally:
        seconds["synthesis"], cpu_seconds["synthesis"] = time.perf_counter() - start, cpu() - start_cpu

writer.synthesise = timed_synthesise
config = simulation_config(scale=Scale.default, data=work / "synthetic", cache=work / "cache")
start, start_cpu = time.perf_counter(), cpu()
prepare_data(config, Scale.default)
seconds["total"], cpu_seconds["total"] = time.perf_counter() - start, cpu() - start_cpu
seconds["preparation"] = seconds["total"] - seconds["synthesis"]
cpu_seconds["preparation"] = cpu_seconds["total"] - cpu_seconds["synthesis"]
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds}))
"""


def cpu_pressure() -> str | None:
    """Linux PSI line for CPU: the share of time runnable tasks waited, i.e. other load on the machine."""
    path = Path("/proc/pressure/cpu")
    return path.read_text().splitlines()[0] if path.exists() else None


def commit_of(code: Path) -> str | None:
    """The checkout's commit, when it is a git checkout."""
    done = subprocess.run(["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or None


def one_run(label: str, code: Path, work: Path) -> dict:
    """The data step once, with ``code`` first on the import path, in a fresh folder."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    environment = {**os.environ, "PYTHONPATH": str(code)}
    load, pressure = os.getloadavg(), cpu_pressure()
    with (work / "progress.log").open("w") as log:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(work)],
            cwd=code,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        raise SystemExit(f"{label}: the data step failed; see {work / 'progress.log'}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "label": label,
        **{kind: {key: round(value, 1) for key, value in values.items()} for kind, values in measured.items()},
        "load_average_before": [round(x, 2) for x in load],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_pressure_before": pressure,
        "cpu_pressure_after": cpu_pressure(),
    }


def summary(runs: list[dict]) -> dict:
    """Per checkout, the fastest run's wall and CPU seconds: other load only ever slows a run down."""
    best: dict[str, dict] = {}
    for run in runs:
        kept = best.get(run["label"])
        if kept is None or run["seconds"]["total"] < kept["seconds"]["total"]:
            best[run["label"]] = {"seconds": run["seconds"], "cpu_seconds": run["cpu_seconds"]}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", action="append", default=[], help="label=checkout (repeatable; default this one)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default a temp folder, removed)")
    parser.add_argument("--note", default="", help="conditions worth keeping with the figures (e.g. other load)")
    args = parser.parse_args()
    codes = {}
    for item in args.code or [f"this={REPO}"]:
        label, _, path = item.partition("=")
        if not path or not (Path(path) / "server" / "simulate.py").is_file():
            parser.error(f"--code {item}: give label=path to a fedmer checkout")
        codes[label] = Path(path).resolve()

    scratch = args.work or Path(tempfile.mkdtemp(prefix="data-step-"))
    runs = []
    try:
        for attempt in range(max(1, args.repeat)):
            for label, code in codes.items():
                run = one_run(label, code, scratch / f"{label}-{attempt}")
                runs.append(run)
                print(json.dumps(run), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "benchmark": "data_step",
        "what": "server.simulate.prepare_data at scale default: casme2, samm, smic at 8 subjects x 6 clips, "
        "synthesised and prepared (composite3 labels, 2 workers) into fresh folders",
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "codes": {label: {"commit": commit_of(code)} for label, code in codes.items()},  # no machine paths
        "repeat": args.repeat,
        "runs": runs,
        "fastest": summary(runs),
    }
    if args.note:
        result["note"] = args.note
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["fastest"], indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
