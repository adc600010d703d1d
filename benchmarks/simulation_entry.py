"""What moving ``fedmer simulate`` off ``flwr.simulation.run_simulation`` (deprecated in Flower 1.41) would cost.

Flower's supported entry point for a simulation is ``flwr run <app> <connection>`` against a SuperLink; for one
machine the ``:local:`` connection starts a background SuperLink, which starts ``flower-superexec``, which starts
a ``flwr-simulation`` process that loads the app bundle and runs the same Ray engine. Both ways run here on the
same prepared tiny sites, alternately, each from a fresh process:

* ``run_simulation``: ``fedmer simulate --scale tiny --rounds 2`` as it is (the data step finds the sites
  prepared);
* ``flwr run``: what ``fedmer simulate`` would do after moving: the same data step in its own process, then
  ``flwr run <repository> local --stream`` with the resolved run config, in a private ``FLWR_HOME`` on free
  ports, then the background SuperLink (and its SuperExec) stopped by PID.

Both get fedmer's run environment (:data:`server.simulate.RUN_ENV`, a private ``RAY_TMPDIR``). Per run the JSON
holds the wall time of the whole job, the rounds' wall times from ``metrics.jsonl`` and what lies outside the
rounds (imports, Ray's and Flower's start and stop, the query round, the records), and the load around it:
other jobs share this 2-core machine.

    nice -n 10 .venv/bin/python benchmarks/simulation_entry.py --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from federation_overhead import leftovers, machine_load

from server.records import ROUND_PHASE, load_metrics
from server.simulate import RUN_ENV, Scale, prepare_data, simulation_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "simulation_entry.json"
ROUNDS = 2
SITES = 3
WAYS = ("run_simulation", "flwr_run")
PREPARE = (
    "import sys; from pathlib import Path; from server.simulate import Scale, prepare_data, simulation_config; "
    "prepare_data(simulation_config(scale=Scale.tiny, data=Path(sys.argv[1]), cache=Path(sys.argv[2]), "
    "options={'out': sys.argv[3]}), Scale.tiny)"
)


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (held open together, so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for held in sockets:
            held.bind(("127.0.0.1", 0))
        return [held.getsockname()[1] for held in sockets]


def marked(marker: str) -> list[int]:
    """PIDs of live processes whose command line names ``marker``."""
    return [int(line.split(":", 1)[0]) for line in leftovers(marker)]


def stop_superlink(home: Path) -> list[int]:
    """SIGTERM the background SuperLink (its command line names ``home``) and its SuperExec (named by the
    SuperLink's PID); SIGKILL what still runs after 15 s. Returns the PIDs it stopped."""
    links = marked(str(home))
    targets = links + [pid for link in links for pid in marked(f"--parent-pid {link}")]
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while (alive := [pid for pid in targets if Path(f"/proc/{pid}/cmdline").exists()]) and time.monotonic() < deadline:
        time.sleep(0.25)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return targets


def run_config_argument(config: dict[str, Any]) -> str:
    """Flower's ``key=value`` string for ``--run-config``: strings quoted, numbers bare."""
    return " ".join(f"{key}='{value}'" if isinstance(value, str) else f"{key}={value}" for key, value in config.items())


def timed(commands: list[list[str]], env: dict[str, str], log: Path) -> float:
    """Seconds to run ``commands`` one after another to a successful end, their output in ``log``."""
    start = time.perf_counter()
    with log.open("w") as handle:
        for command in commands:
            subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def one_run(way: str, folder: Path, data: Path, cache: Path) -> dict[str, Any]:
    """One tiny two-round federation the given way: wall time, rounds, load, processes left."""
    folder.mkdir(parents=True)
    out, ray_tmp = folder / "run", Path(tempfile.mkdtemp(prefix="r", dir=folder))
    env = {
        **os.environ,
        **RUN_ENV,
        "RAY_TMPDIR": str(ray_tmp),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    scale = ["--scale", "tiny", "--rounds", str(ROUNDS), "--data", str(data), "--cache", str(cache)]
    home = folder / "flwr-home"
    before = machine_load()
    if way == "run_simulation":
        commands = [[sys.executable, "-m", "server.cli", "simulate", *scale, "--out", str(out)]]
        seconds, stopped = timed(commands, env, folder / "log.txt"), []
    else:
        home.mkdir()
        (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
        http, control = free_ports(2)
        env |= {"FLWR_HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http)}
        env |= {"FLWR_LOCAL_CONTROL_API_PORT": str(control)}
        config = simulation_config(scale=Scale.tiny, data=data, cache=cache, options={"out": str(out)})
        config["num-server-rounds"] = ROUNDS
        federation = f"num-supernodes={SITES} client-resources-num-cpus=2"
        commands = [
            [sys.executable, "-c", PREPARE, str(data), str(cache), str(out)],
            ["flwr", "run", str(ROOT), "local", "--stream", "--federation-config", federation],
        ]
        commands[1] += ["--run-config", run_config_argument(config)]
        start = time.perf_counter()
        try:
            timed(commands, env, folder / "log.txt")
        finally:
            stopped = stop_superlink(home)
        seconds = time.perf_counter() - start
    lines = load_metrics(out / "metrics.jsonl")
    rounds = [line["seconds"] for line in lines if line["phase"] == ROUND_PHASE]
    return {
        "way": way,
        "seconds": round(seconds, 2),
        "round_seconds": [round(value, 2) for value in rounds],
        "outside_rounds_seconds": round(seconds - sum(rounds), 2),
        "load_before": before,
        "load_after": machine_load(),
        "superlink_pids_stopped": len(stopped),
        "left_running": marked(str(ray_tmp)) + marked(str(home)),
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and spread of each way's job and round times, and the difference of the medians."""
    figures: dict[str, Any] = {}
    for way in WAYS:
        mine = [run for run in runs if run["way"] == way]
        figures[way] = {
            key: {"median": round(statistics.median(values), 2), "min": min(values), "max": max(values)}
            for key, values in (
                ("seconds", [run["seconds"] for run in mine]),
                ("rounds_seconds", [round(sum(run["round_seconds"]), 2) for run in mine]),
                ("outside_rounds_seconds", [run["outside_rounds_seconds"] for run in mine]),
            )
        }
    figures["flwr_run_minus_run_simulation_seconds"] = round(
        figures["flwr_run"]["seconds"]["median"] - figures["run_simulation"]["seconds"]["median"], 2
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each way, alternating")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="entry") as scratch:
        work = Path(scratch)
        data, cache = work / "synthetic", work / "cache"
        prepare_data(simulation_config(scale=Scale.tiny, data=data, cache=cache, options={"out": "unused"}), Scale.tiny)
        runs = []
        for repeat in range(arguments.repeats):
            for way in WAYS if repeat % 2 == 0 else reversed(WAYS):
                runs.append(one_run(way, work / f"{way}-{repeat}", data, cache))
                print(json.dumps(runs[-1]), flush=True)
    document = {
        "what": __doc__.split("\n\n")[0],
        "command": "nice -n 10 .venv/bin/python benchmarks/simulation_entry.py --repeats " + str(arguments.repeats),
        "job": f"fedmer simulate --scale tiny --rounds {ROUNDS} ({SITES} sites, data prepared beforehand)",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "summary": summary(runs),
        "runs": runs,
    }
    arguments.out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document["summary"], indent=2))


if __name__ == "__main__":
    main()
