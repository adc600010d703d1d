"""The federation deployed as sites run it: a real ``flower-superlink`` and one ``flower-supernode`` per site
(each naming only its own database in its node config) driven by ``flwr run``; the ``flwr run . local`` path;
and the structure of ``docker-compose.yml``, which cannot run here (no Docker daemon).

Every process a test starts runs in a session of its own and is stopped by process group afterwards, with its
descendants, including the ones Flower detaches (the SuperLink's SuperExec, the ``:local:`` SuperLink).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TinySites
from flwr.common.config import parse_config_args
from process_tree import descendants, leftovers, processes, stop

from client.runtime import THREAD_ENV
from partitions.adapters import canonical_database
from server.records import ROUND_PHASE, load_metrics, load_summary
from server.simulate import simulation_environment

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SITES = tuple(PROJECT["tool"]["flwr"]["app"]["config"]["sites"].split(","))
TINY_RUN = {"num-server-rounds": 1, "local-epochs": 1, "round-timeout": 120}
RUN_TIMEOUT = 300.0  # seconds for one `flwr run --stream`; a tiny round takes well under that

Config = Mapping[str, str | int | float | bool]


# ----------------------------------------------------------------------------------------------- helpers


def _config_args(values: Config) -> str:
    """Flower's ``key=value`` string for ``--node-config`` / ``--run-config``: strings quoted, numbers bare."""
    return " ".join(f"{key}='{value}'" if isinstance(value, str) else f"{key}={value}" for key, value in values.items())


def _free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (all held open together, so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for held in sockets:
            held.bind(("127.0.0.1", 0))
        return [held.getsockname()[1] for held in sockets]


def _write_connections(home: Path, connections: Mapping[str, Config]) -> None:
    """``$FLWR_HOME/config.toml`` with these ``[superlink.<name>]`` connections, the first one the default."""
    lines = ["[superlink]", f"default = {json.dumps(next(iter(connections)))}"]
    for name, fields in connections.items():
        lines += ["", f"[superlink.{name}]", *(f"{key} = {json.dumps(value)}" for key, value in fields.items())]
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def _files(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file below ``folder``."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@dataclass
class Launcher:
    """Starts commands, each in a session of its own with its output in ``logs/<name>.log``; :meth:`close`
    stops them and everything below them or holding a marker in its command line."""

    env: dict[str, str]
    logs: Path
    markers: tuple[Path, ...]
    started: dict[str, subprocess.Popen] = field(default_factory=dict)
    stopped: set[int] = field(default_factory=set)

    def start(self, name: str, *command: str, home: Path, cwd: Path, env: Config | None = None) -> subprocess.Popen:
        """``command`` with ``FLWR_HOME=home`` in ``cwd`` (both created)."""
        home.mkdir(parents=True, exist_ok=True)
        cwd.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                command,
                cwd=cwd,
                env={**self.env, "FLWR_HOME": str(home), **{k: str(v) for k, v in (env or {}).items()}},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started[name] = process
        return process

    def run(self, name: str, *command: str, home: Path, cwd: Path, env: Config | None = None) -> str:
        """``command`` to a successful end (at most :data:`RUN_TIMEOUT` seconds); its output."""
        process = self.start(name, *command, home=home, cwd=cwd, env=env)
        try:
            code = process.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not end within {RUN_TIMEOUT:g}s:\n{self.log(name)[-4000:]}")
        assert code == 0, f"{name} ended with exit code {code}:\n{self.log(name)[-4000:]}"
        return self.log(name)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        """Stop every process started, by process group, and reap the direct children."""
        # only live children: a reaped pid may be another process's by now (what an ended one left behind, such
        # as the `:local:` SuperLink, is found by its marker)
        running = [process.pid for process in self.started.values() if process.poll() is None]
        self.stopped = stop(running, *self.markers)
        for process in self.started.values():
            process.wait(timeout=10)
        for name in self.started:  # shown by pytest when the test fails
            print(f"----- {name}\n{self.log(name)[-3000:]}")


@contextlib.contextmanager
def launching(tmp_path: Path, *markers: Path) -> Iterator[Launcher]:
    """A :class:`Launcher` inside Flower's quiet settings and a private ``RAY_TMPDIR``
    (:func:`server.simulate.simulation_environment`), with the venv's commands on PATH (Flower starts
    ``flower-superexec`` by name) and HOME in ``tmp_path``; everything is stopped on the way out."""
    logs, home = tmp_path / "logs", tmp_path / "home"
    logs.mkdir()
    home.mkdir()
    with simulation_environment() as ray_tmp:
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        launcher = Launcher({**os.environ, "PATH": path, "HOME": str(home)}, logs, (ray_tmp, *markers))
        try:
            yield launcher
        finally:
            launcher.close()


def _wait_until_serving(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until the SuperLink on ``port`` answers ``/health``; fails when it exits or takes longer."""
    url, deadline = f"http://127.0.0.1:{port}/health", time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as answer:
            if answer.status == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"the SuperLink on port {port} did not come up (exit code {process.poll()})")


def _assert_every_site_recorded(out: Path) -> None:
    """The run directory holds one round's train and evaluate line per site and a summary naming every site."""
    lines = load_metrics(out / "metrics.jsonl")
    assert [line["round"] for line in lines if line["phase"] == ROUND_PHASE] == [1]
    records = [line for line in lines if line["phase"] != ROUND_PHASE]
    assert sorted((r["phase"], r["site"]) for r in records) == sorted(
        (phase, site) for phase in ("train", "evaluate") for site in SITES
    )
    assert all(record["site-index"] == SITES.index(record["site"]) for record in records)
    summary = load_summary(out / "summary.json")
    assert summary["rounds"] == 1 and list(summary["sites"]) == list(SITES)
    for values in summary["sites"].values():
        assert all(isinstance(values[key], float | int) for key in ("uf1", "uar", "accuracy"))


# ----------------------------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class App:
    """A copy of the Flower app (pyproject, README, packages) for ``flwr run``, and its files as copied."""

    path: Path
    files: dict[str, str]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> App:
    """``flwr run`` may rewrite pyproject.toml (a legacy federations table) and the ``:local:`` ServerApp works
    in the command's folder: the tests run it on a copy and check the copy stays as it was."""
    path = tmp_path_factory.mktemp("app")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, path / name)
    for pattern in PROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        shutil.copytree(ROOT / package, path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return App(path, _files(path))


# ----------------------------------------------------------------------------------------------- deployment


def test_a_superlink_and_one_supernode_per_site_run_the_federation(
    tiny_sites: TinySites, app: App, tmp_path: Path
) -> None:
    link, *runtime = _free_ports(1 + len(SITES))
    coordinator = tmp_path / "coordinator"  # the SuperLink's working directory, where the ServerApp writes
    cli_home = tmp_path / "flwr-cli"
    _write_connections(cli_home, {"sites": {"address": f"127.0.0.1:{link}", "insecure": True}})
    before = descendants(os.getpid(), processes())

    with launching(tmp_path) as launcher:
        superlink = launcher.start(
            "superlink",
            *("flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link)),
            home=tmp_path / "flwr-superlink",
            cwd=coordinator,
        )
        for index, site in enumerate(SITES):
            node_config = {
                "dataset": site,
                "data-path": str(tiny_sites.data_root / site),
                "cache-path": str(tiny_sites.cache),
                "site-index": index,
            }
            launcher.start(
                f"supernode-{site}",
                *("flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(runtime[index])),
                *("--node-config", _config_args(node_config)),
                home=tmp_path / f"flwr-{site}",
                cwd=tmp_path / site,
            )
        _wait_until_serving(link, superlink)
        output = launcher.run(
            "flwr-run",
            *("flwr", "run", ".", "sites", "--stream"),
            *("--run-config", _config_args({**TINY_RUN, "out": "runs/deployed"})),
            home=cli_home,
            cwd=app.path,
        )
        serving = [name for name, process in launcher.started.items() if process.poll() is None]
        assert serving == ["superlink", *(f"supernode-{site}" for site in SITES)], output  # they serve on

    assert leftovers(before, *launcher.markers, watched=launcher.stopped) == []
    assert "run directory:" in output, output
    _assert_every_site_recorded(coordinator / "runs" / "deployed")  # a relative `out` is under the SuperLink's
    assert _files(app.path) == app.files  # flwr run left the app as it was


def test_flwr_run_local_simulates_the_sites_on_a_background_superlink(
    tiny_sites: TinySites, app: App, tmp_path: Path
) -> None:
    http, control = _free_ports(2)
    home = tmp_path / "flwr"
    _write_connections(home, {"local": {"address": ":local:"}})
    ports = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": http, "FLWR_LOCAL_CONTROL_API_PORT": control}
    out = tmp_path / "run"
    run_config = {
        **TINY_RUN,
        "data-root": str(tiny_sites.data_root),
        "cache-root": str(tiny_sites.cache),
        "out": str(out),
    }
    before = descendants(os.getpid(), processes())

    with launching(tmp_path, home) as launcher:  # the background SuperLink's command line names FLWR_HOME
        output = launcher.run(
            "flwr-run",
            *("flwr", "run", ".", "local", "--stream"),
            *("--federation-config", f"num-supernodes={len(SITES)} client-resources-num-cpus=2"),
            *("--run-config", _config_args(run_config)),
            home=home,
            cwd=app.path,
            env=ports,
        )
        table = processes()
        background = [pid for pid, (_parent, command) in table.items() if str(home / "local-superlink") in command]
        assert len(background) == 1, output  # `:local:` started one SuperLink, and it outlived the command
        assert f"--port {http}" in table[background[0]][1]

    assert leftovers(before, *launcher.markers, watched=launcher.stopped) == []
    _assert_every_site_recorded(out)
    assert _files(app.path) == app.files


# ----------------------------------------------------------------------------------------------- docker compose


def _option(command: list[str], flag: str) -> str:
    """The value after ``flag`` in a command list."""
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def _mounts(service: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Container path -> (host path, mode) of a service's short-syntax volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        mounts[target] = (source, mode[0] if mode else "rw")
    return mounts


def _services(command: str, services: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The services whose command starts with ``command`` (space-separated words)."""
    words = command.split()
    return {name: s for name, s in services.items() if s.get("command", [])[: len(words)] == words}


def test_the_compose_file_gives_each_site_a_supernode_that_mounts_only_its_own_data() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]

    # the SuperLink: plain HTTP on one published port, reachable from the other containers, no site data
    link = services["superlink"]
    port = _option(link["command"], "--port")
    assert "--insecure" in link["command"] and _option(link["command"], "--host") == "0.0.0.0"
    assert f"{port}:{port}" in link["ports"]
    assert all("data" not in Path(source).parts for source, _mode in _mounts(link).values())

    # one SuperNode per site of pyproject's `sites`, in site-index order, each naming a known dataset
    nodes = _services("flower-supernode", services)
    configs = {name: parse_config_args([_option(s["command"], "--node-config")]) for name, s in nodes.items()}
    ordered = sorted(configs.values(), key=lambda config: config["site-index"])
    assert [config["dataset"] for config in ordered] == list(SITES)
    assert [config["site-index"] for config in ordered] == list(range(len(SITES)))

    prepares = {_option(s["command"], "--dataset"): s for s in _services("fedmer prepare", services).values()}
    (synth,) = _services("fedmer synth", services).values()
    assert _option(synth["command"], "--sites") == ",".join(SITES)
    synthetic = _mounts(synth)[_option(synth["command"], "--out")][0]
    for name, config in configs.items():
        site, command = config["dataset"], nodes[name]["command"]
        assert canonical_database(site) == site
        assert "--insecure" in command and _option(command, "--superlink") == f"superlink:{port}"
        mounts = _mounts(nodes[name])
        assert set(mounts) == {config["data-path"], config["cache-path"]}  # its data and its cache, nothing else
        data, cache = mounts[config["data-path"]], mounts[config["cache-path"]]
        assert data == (f"{synthetic}/{site}", "ro") and cache[1] == "ro"
        others = set(SITES) - {site}
        assert not any(others & set(Path(source).parts) for source, _mode in mounts.values())
        # the site's own one-shot prepare fills that very cache from that very data
        prepare = prepares[site]
        assert _mounts(prepare) == {config["data-path"]: data, config["cache-path"]: (cache[0], "rw")}
        assert _option(prepare["command"], "--root") == config["data-path"]
        assert _option(prepare["command"], "--cache") == config["cache-path"]

    # the run: `flwr run` through a connection to that SuperLink port
    (runner,) = _services("flwr run", services).values()
    connections = tomllib.loads((ROOT / "deploy" / "flwr-config.toml").read_text())["superlink"]
    assert connections[runner["command"][3]] == {"address": f"superlink:{port}", "insecure": True}


def test_the_image_pins_the_cpu_torch_build_and_turns_off_flowers_runtime_installs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    (torch,) = [spec for spec in PROJECT["project"]["dependencies"] if spec.startswith("torch")]
    assert f"{torch}+cpu" in dockerfile  # the CPU build of the version pyproject pins
    for setting in (
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1",
        "FLWR_TELEMETRY_ENABLED=0",
        "FLWR_DISABLE_UPDATE_CHECK=1",
        *(f"{key}={value}" for key, value in THREAD_ENV.items()),  # the fedmer command's, for the SuperNodes too
    ):
        assert setting in dockerfile
