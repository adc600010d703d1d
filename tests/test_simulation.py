"""The whole federation: the real ServerApp and ClientApp through Flower's simulation engine (Ray) on a tiny
synthetic federation, and ``fedmer simulate``'s refusals of bad options (no Ray there)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from conftest import TinySites
from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore import telemetry
from flwr.supercore.task_identity import TaskIdentity
from process_tree import descendants, leftovers, processes, stop
from rich.console import Console
from sklearn.metrics import f1_score, recall_score
from test_records import confusion
from typer.testing import CliRunner

from client.protocol import AU_COUNTS, CONFIG, COUNTS, RUN_KEY, SAMPLES, SITE_INDEX
from client.site import RunSettings, num_classes
from models import build_model
from server.cli import app
from server.records import (
    COLLAPSED,
    POOLED_KEYS,
    ROUND_PHASE,
    SITE_KEYS,
    collapsed,
    load_checkpoint,
    load_metrics,
    load_summary,
)
from server.server_app import (
    DEFAULTS,
    collapse_warnings,
    pooled_scores,
    query_sites,
    resolve_settings,
    train_config,
)
from server.simulate import run_simulation, simulation_environment
from server.strategies import build_strategy, cooccurrence_prior

ROOT = Path(__file__).resolve().parent.parent
SITES = ("casme2", "samm", "smic")
COMMAND_TIMEOUT = 900.0  # seconds for a one-round tiny `fedmer simulate`; it takes about a minute


# ----------------------------------------------------------------------------------------------- end to end


def test_two_rounds_on_three_tiny_sites_through_the_simulation_engine_write_every_record(
    tiny_sites: TinySites, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, consoles: dict[str, io.StringIO]
) -> None:
    monkeypatch.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "0")  # read at flwr's import, maybe by another test
    out = tmp_path / "run"
    config = tiny_sites.config(**{"num-server-rounds": 2, "local-epochs": 1, "out": str(out)})
    assert config["sites"] == ",".join(SITES)
    before = descendants(os.getpid(), processes())
    printed = io.StringIO()

    with simulation_environment() as ray_tmp:
        assert os.environ["RAY_TMPDIR"] == str(ray_tmp) and ray_tmp.is_dir()
        run_simulation(config, Console(file=printed, width=120))

    assert not ray.is_initialized()
    assert not ray_tmp.exists() and os.environ.get("RAY_TMPDIR") != str(ray_tmp)
    assert leftovers(before, ray_tmp) == []

    # config.json: the resolved run config
    assert json.loads((out / "config.json").read_text()) == config

    # metrics.jsonl: one train and one evaluate line per round and site, and one wall-time line per round
    lines = load_metrics(out / "metrics.jsonl")
    rounds = {r["round"]: r for r in lines if r["phase"] == ROUND_PHASE}
    records = [r for r in lines if r["phase"] != ROUND_PHASE]
    assert sorted(rounds) == [1, 2] and all(set(r) == {"round", "phase", "seconds"} for r in rounds.values())
    for number, line in rounds.items():  # the sites' compute lies within their round's wall time
        compute = sum(r.get("train-seconds", 0) + r.get("evaluate-seconds", 0) for r in records if r["round"] == number)
        assert line["seconds"] > compute > 0
    keys = sorted((r["round"], r["phase"], r["site"]) for r in records)
    assert keys == sorted((r, phase, site) for r in (1, 2) for phase in ("train", "evaluate") for site in SITES)
    evaluations = [r for r in records if r["phase"] == "evaluate"]
    for record in evaluations:
        confusion = np.array(record["confusion"]).reshape(3, 3)
        assert confusion.sum() == record["num-examples"] > 0
        assert record[COLLAPSED] is collapsed([record["confusion"]])
    for record in records:
        assert record["site-index"] == SITES.index(record["site"])

    # checkpoints: the global (shared) arrays after each round, nothing for round 0
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["round-0001.safetensors", "round-0002.safetensors"]
    settings = RunSettings.from_config(config)
    expected = build_model(settings.model_config(num_classes("casme2"))).state_dict()
    for number, name in enumerate(checkpoints, start=1):
        saved_round, state = load_checkpoint(out / "checkpoints" / name)
        assert saved_round == number and state.keys() == expected.keys()
        assert all(state[k].shape == expected[k].shape and torch.isfinite(state[k]).all() for k in state)

    # summary.json: exactly the documented schema, from the last round; pooled from the summed confusions
    document = json.loads((out / "summary.json").read_text())
    assert document == load_summary(out / "summary.json")
    assert set(document) == {"rounds", "sites", "pooled"} and document["rounds"] == 2
    assert list(document["sites"]) == list(SITES)
    last = {r["site"]: r for r in evaluations if r["round"] == 2}
    for site, values in document["sites"].items():
        assert set(values) == {*SITE_KEYS, COLLAPSED}
        assert values == {**{key: round(last[site][key], 4) for key in SITE_KEYS}, COLLAPSED: last[site][COLLAPSED]}
    assert set(document["pooled"]) == {*POOLED_KEYS, COLLAPSED}
    confusions = [last[site]["confusion"] for site in SITES]
    pooled = pooled_scores(confusions)
    assert document["pooled"] == {
        **{key: round(pooled[key], 4) for key in POOLED_KEYS},
        COLLAPSED: collapsed(confusions),
    }
    assert (out / "rounds.png").stat().st_size > 0

    # the console: one progress line per round and site (flagged when the site collapsed), the table, a warning
    # per collapsed site, the run directory; none of Flower's lines
    text = printed.getvalue()
    flat = lines_text(text)
    lines = [lines_text(line) for line in text.splitlines()]
    for record in evaluations:
        progress = [line for line in lines if line.startswith(f"round {record['round']}/2 {record['site']} ")]
        assert len(progress) == 1 and ("collapsed: predicts" in progress[0]) is record[COLLAPSED], progress
    for site in SITES:
        warning = f"warning: {site} collapsed: all {last[site]['num-examples']} test clips predicted as"
        assert (warning in flat) is document["sites"][site][COLLAPSED]
    assert ("warning: pooled collapsed: every site predicts" in flat) is document["pooled"][COLLAPSED]
    assert "pooled" in text and f"run directory: {out}" in flat
    assert_only_fedmer_lines(text)
    assert consoles["flower"].getvalue() == "" and consoles["root"].getvalue() == ""

    # Flower's and Ray's logs in the run directory
    assert_logs_captured(out, rounds=2)


def test_dp_at_every_site_and_at_the_server_through_the_simulation_engine(
    tiny_sites: TinySites, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fedmer simulate --dp --target-epsilon 3 --central-dp client-fixed`` on the tiny sites, two rounds."""
    monkeypatch.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "0")
    out = tmp_path / "private"
    options = {"num-server-rounds": 2, "out": str(out), "dp": True, "dp-target-epsilon": 3.0}
    config = tiny_sites.config(**options, **{"central-dp": "client-fixed", "central-dp-noise": 0.5})
    printed = io.StringIO()
    with simulation_environment():
        run_simulation(config, Console(file=printed, width=140))

    lines = load_metrics(out / "metrics.jsonl")
    for site in SITES:  # each site's epsilon grows round by round and lands within the budget
        spent = [r["dp-epsilon"] for r in lines if r["phase"] == "train" and r["site"] == site]
        assert len(spent) == 2 and 0 < spent[0] < spent[1] <= 3.0
    central = [r["central-epsilon"] for r in lines if r["phase"] == ROUND_PHASE]
    assert len(central) == 2 and 0 < central[0] < central[1]

    document = load_summary(out / "summary.json")
    for values in document["sites"].values():
        dp = values["dp"]
        assert set(dp) == {"noise_multiplier", "sample_rate", "steps", "delta", "epsilon"}
        assert 3.0 - 0.05 <= dp["epsilon"] <= 3.0 and dp["steps"] > 0 and 0 < dp["delta"] <= 1e-5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["central_dp"]["releases"] == 2
    assert summary["central_dp"]["epsilon"] == pytest.approx(central[-1])
    assert "ε (δ)" in printed.getvalue()


FLOWER_MARKERS = ("INFO", "DEBUG", "WARNING", "DEPRECATED", "Aggregated MetricRecord", "ClientAppActor", "[ROUND")
"""What Flower's and Ray's console output holds and fedmer's own lines never do."""


def lines_text(text: str) -> str:
    """Console text with its whitespace normalised: the tests never depend on the console's width."""
    return " ".join(text.split())


def assert_only_fedmer_lines(text: str) -> None:
    leaked = [marker for marker in FLOWER_MARKERS if marker in text]
    assert not leaked, f"Flower's or Ray's output on the console ({leaked}):\n{text}"


def assert_logs_captured(out: Path, rounds: int) -> None:
    """``<out>/logs/flower.log`` holds Flower's lines of the run, and ``logs/ray/`` Ray's session logs with the
    ClientApp workers' own output."""
    flower = (out / "logs" / "flower.log").read_text()
    for line in (f"[ROUND {rounds}/{rounds}]", "Aggregated MetricRecord", "Final results", "DEPRECATED FEATURE"):
        assert line in flower, line
    sessions = list((out / "logs" / "ray").glob("session_*"))
    assert len(sessions) == 1, sessions
    workers = "".join(path.read_text(errors="replace") for path in sessions[0].glob("worker-*.err"))
    assert "ClientAppActor" in workers


def test_fedmer_simulate_prints_its_own_lines_and_logs_flower_and_ray_in_the_run_directory(
    tiny_sites: TinySites, tmp_path: Path
) -> None:
    """The command as a user runs it, its output going to a file (not a terminal): progress, table and warnings
    on the console, Flower's and Ray's logs in ``<run>/logs/``."""
    out = tmp_path / "run"
    private_tmp = Path(tempfile.mkdtemp(prefix="fm"))  # short: Ray's socket paths under it are length-limited
    command = [sys.executable, "-m", "server.cli", "simulate", "--scale", "tiny", "--rounds", "1"]
    command += ["--data", str(tiny_sites.data), "--cache", str(tiny_sites.cache), "--out", str(out)]
    before = descendants(os.getpid(), processes())
    try:
        with (tmp_path / "console.txt").open("w") as console:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**os.environ, "TMPDIR": str(private_tmp)},
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            code = process.wait(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
            stop([process.pid], private_tmp)
            process.wait(timeout=30)
        text = (tmp_path / "console.txt").read_text()
        assert code == 0, text
        left = leftovers(before, private_tmp)
        stop([], private_tmp)  # whatever it left behind, the test does not leave behind
        assert left == []
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)

    summary = load_summary(out / "summary.json")
    for site in SITES:
        assert f"round 1/1 {site} loss" in lines_text(text)
        assert (f"warning: {site} collapsed:" in lines_text(text)) is summary["sites"][site][COLLAPSED]
    assert f"run directory: {out}" in lines_text(text)
    assert_only_fedmer_lines(text)
    assert_logs_captured(out, rounds=1)


# ----------------------------------------------------------------------------------------------- cheap checks


def test_pooled_scores_are_uf1_and_uar_over_all_sites_clips() -> None:
    sites = [([0, 0, 1, 2], [0, 1, 1, 1]), ([2, 2, 1], [2, 0, 1]), ([0], [2])]
    confusions = []
    for labels, predicted in sites:
        matrix = np.zeros((3, 3), dtype=int)
        np.add.at(matrix, (labels, predicted), 1)
        confusions.append(matrix.flatten().tolist())
    labels = [label for site in sites for label in site[0]]
    predicted = [guess for site in sites for guess in site[1]]
    scores = pooled_scores(confusions)
    assert scores["uf1"] == pytest.approx(f1_score(labels, predicted, labels=[0, 1, 2], average="macro"))
    assert scores["uar"] == pytest.approx(recall_score(labels, predicted, average="macro"))
    assert pooled_scores([]) == {"uf1": None, "uar": None}


def test_collapsed_sites_and_a_pooled_collapse_are_warned_about_by_class_name() -> None:
    settings = resolve_settings({"out": "unused"})  # casme2, samm, smic; composite3: negative, positive, surprise
    onto_surprise = {0: [confusion([(0, 2), (1, 2)])], 1: [confusion([(0, 2)]), confusion([(2, 2)])]}
    learning = {2: [confusion([(0, 0), (1, 1), (2, 0)])]}

    assert collapse_warnings(settings, {**onto_surprise, **learning}) == [
        "casme2 collapsed: all 2 test clips predicted as surprise",
        "samm collapsed: all 2 test clips predicted as surprise",  # over its matrices together (LOSO folds)
    ]
    assert collapse_warnings(settings, onto_surprise)[-1] == "pooled collapsed: every site predicts surprise only"
    onto_other = {1: [confusion([(0, 1), (2, 1)])]}
    assert len(collapse_warnings(settings, {**onto_surprise, **onto_other})) == 2  # each collapsed, not alike
    assert collapse_warnings(settings, learning) == []


class QueryGrid:
    """Replies to the query round as scripted: node -> site index (counts reply), an error reason, or None."""

    def __init__(self, script: dict[int, int | str | None]) -> None:
        self.script = script
        self.timeouts: list[float | None] = []

    def get_node_ids(self) -> list[int]:
        return list(self.script)

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        self.timeouts.append(timeout)
        self.run_keys = [message.content[CONFIG][RUN_KEY] for message in messages]
        replies = []
        for message in messages:
            answer = self.script[message.metadata.dst_node_id]
            assert message.metadata.message_type == MessageType.QUERY
            if isinstance(answer, int):
                counts = MetricRecord({SITE_INDEX: answer, COUNTS: [answer + 1] * 144, SAMPLES: 2})
                replies.append(Message(RecordDict({AU_COUNTS: counts}), reply_to=message))
            elif isinstance(answer, str):
                replies.append(Message(Error(code=3, reason=answer), reply_to=message))
        return replies


def test_the_query_round_maps_nodes_to_sites_and_records_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)  # a ServerApp process gets these from the SuperLink
    settings = resolve_settings({"round-timeout": 7, "out": "unused"})
    strategy = build_strategy("fedavg", 3, settings.config)
    grid = QueryGrid({11: 2, 12: "DataError: site 1 (samm ...): run fedmer prepare", 13: None, 14: 0})

    prior, node_sites = query_sites(grid, [11, 12, 13, 14], settings, strategy)

    assert node_sites == {11: 2, 14: 0} and grid.timeouts == [7.0]
    assert grid.run_keys == [settings.run_key] * 4  # the sites' state files (privacy ledgers) are named by it
    assert prior == cooccurrence_prior([[1] * 144, [3] * 144])
    failed = {(f["phase"], f["node_id"]): f["reason"] for f in strategy.failures}
    assert set(failed) == {("query", 12), ("query", 13)}
    assert "fedmer prepare" in failed[("query", 12)] and "no reply" in failed[("query", 13)]

    strict = resolve_settings({"min-sites": 3, "out": "unused"})
    with pytest.raises(RuntimeError, match=r"only 2 of 4 nodes answered.*min-sites=3.*fedmer prepare"):
        query_sites(grid, [11, 12, 13, 14], strict, build_strategy("fedavg", 3, strict.config))


def test_every_run_gets_its_own_run_key_unless_it_names_one() -> None:
    first, second = resolve_settings({"out": "unused"}), resolve_settings({"out": "unused"})
    assert first.run_key and second.run_key and first.run_key != second.run_key
    assert first.config["run-key"] == first.run_key  # recorded in config.json
    resumed = resolve_settings({"out": "unused", "run-key": first.run_key})
    assert resumed.run_key == first.run_key
    assert train_config(resumed)[RUN_KEY] == first.run_key


def test_the_pyproject_run_config_holds_the_server_defaults() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["config"] == DEFAULTS
    assert "federations" not in project["tool"]["flwr"]


def test_simulate_refuses_an_unknown_strategy_before_touching_data(tmp_path: Path) -> None:
    arguments = ["simulate", "--strategy", "nope", "--scale", "tiny", "--data", str(tmp_path / "synthetic")]
    result = CliRunner().invoke(app, [*arguments, "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "error:" in flat and "'nope'" in flat and "fedavg" in flat and "personalised" in flat
    assert "Traceback" not in flat
    assert not any(tmp_path.iterdir())  # nothing synthesised, prepared or recorded


def test_simulate_refuses_a_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    result = CliRunner().invoke(app, ["simulate", "--config", str(missing), "--data", str(tmp_path / "synthetic")])
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "error:" in flat and str(missing) in flat and "does not exist" in flat and "Traceback" not in flat
