"""``fedmer train --mode central|local`` on a tiny synthetic federation of two sites: the records the federation
writes, the federation's splits, reproducibility, and refusals of bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import client.task
from client.protocol import EVALUATE_METRIC_KEYS, NUM_EXAMPLES, SITE_INDEX, TRAIN_METRIC_KEYS
from client.site import RunSettings, SiteSpec, SplitSettings, load_data, num_classes
from models import build_model
from server.cli import app
from server.records import POOLED_KEYS, SITE_KEYS, load_checkpoint, load_metrics, load_summary
from server.server_app import pooled_scores
from server.simulate import Scale, prepare_data, simulation_config

SITES = ("casme2", "samm")  # the two smallest tiny sites: the runs stay short


@dataclass
class Federation:
    """The prepared tiny sites and what a command line needs to reach them."""

    data: Path
    cache: Path
    config_file: Path
    config: dict[str, Any]

    def arguments(self, mode: str, out: Path, *extra: str) -> list[str]:
        return [
            "train",
            "--mode",
            mode,
            "--scale",
            "tiny",
            "--rounds",
            "1",
            "--data",
            str(self.data),
            "--cache",
            str(self.cache),
            "--config",
            str(self.config_file),
            "--out",
            str(out),
            *extra,
        ]


@dataclass
class Seen:
    """Subjects of every dataset the run trained on and evaluated, in call order."""

    trained: list[set[tuple[str, str]]] = field(default_factory=list)
    evaluated: list[set[tuple[str, str]]] = field(default_factory=list)


@dataclass
class Run:
    path: Path
    output: str
    seen: Seen


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    root = tmp_path_factory.mktemp("baselines")
    data, cache = root / "synthetic", root / "cache"
    config_file = root / "settings.toml"
    config_file.write_text(f'sites = "{",".join(SITES)}"\nlocal-epochs = 1\nbatch-size = 8\n')
    config = simulation_config(
        scale=Scale.tiny, data=data, cache=cache, config_file=config_file, options={"out": str(root / "unused")}
    )
    prepare_data(config, Scale.tiny)
    return Federation(data, cache, config_file, config)


def _subjects(samples: list) -> set[tuple[str, str]]:
    return {(sample.database, sample.subject) for sample in samples}


def _invoke(federation: Federation, mode: str, out: Path) -> Run:
    """The command in this process, with train_local / evaluate_local watched (the baselines look them up in
    client.task at run time)."""
    seen = Seen()
    train_local, evaluate_local = client.task.train_local, client.task.evaluate_local

    def watch_train(model: Any, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        seen.trained.append(_subjects(dataset.samples))
        return train_local(model, dataset, *args, **kwargs)

    def watch_evaluate(model: Any, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        seen.evaluated.append(_subjects(dataset.samples))
        return evaluate_local(model, dataset, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(client.task, "train_local", watch_train)
        patch.setattr(client.task, "evaluate_local", watch_evaluate)
        result = CliRunner().invoke(app, federation.arguments(mode, out))
    assert result.exit_code == 0, result.output
    return Run(out, result.output, seen)


@pytest.fixture(scope="module")
def central(federation: Federation, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _invoke(federation, "central", tmp_path_factory.mktemp("central") / "run")


@pytest.fixture(scope="module")
def local(federation: Federation, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _invoke(federation, "local", tmp_path_factory.mktemp("local") / "run")


@pytest.fixture(scope="module")
def federation_splits(federation: Federation) -> Iterator[list]:
    """Each site's split as the federation's node computes it, read afresh (not load_data's in-process cache)."""
    settings = RunSettings.from_config(federation.config)
    specs = [SiteSpec.from_config({"partition-id": index}, federation.config) for index in range(len(SITES))]
    yield [load_data.__wrapped__(spec, SplitSettings.of(settings)) for spec in specs]


def _check_records(run: Run, federation: Federation, mode: str) -> list[dict[str, Any]]:
    """What both modes write: config, one evaluate line per site, summary schema and pooling, table, plot."""
    out = run.path
    config = json.loads((out / "config.json").read_text())
    assert config == {**federation.config, "num-server-rounds": 1, "out": str(out), "strategy": mode, "mode": mode}
    assert config["sites"] == ",".join(SITES)

    records = load_metrics(out / "metrics.jsonl")
    evaluations = [r for r in records if r["phase"] == "evaluate"]
    assert [(r["round"], r["site"]) for r in evaluations] == [(1, site) for site in SITES]
    for index, record in enumerate(evaluations):
        assert set(record) == {"round", "phase", "site", NUM_EXAMPLES, *EVALUATE_METRIC_KEYS}
        assert record[SITE_INDEX] == index
        confusion = np.array(record["confusion"]).reshape(3, 3)
        assert confusion.sum() == record[NUM_EXAMPLES] > 0

    document = json.loads((out / "summary.json").read_text())
    assert document == load_summary(out / "summary.json")
    assert set(document) == {"rounds", "sites", "pooled"} and document["rounds"] == 1
    assert list(document["sites"]) == list(SITES)
    for record in evaluations:
        assert document["sites"][record["site"]] == {key: round(record[key], 4) for key in SITE_KEYS}
    pooled = pooled_scores([record["confusion"] for record in evaluations])
    assert document["pooled"] == {key: round(pooled[key], 4) for key in POOLED_KEYS}
    assert (out / "rounds.png").stat().st_size > 0

    flat = " ".join(run.output.split())
    assert "pooled" in flat and f"run directory: {out}" in flat
    return records


def _check_checkpoint(path: Path, federation: Federation) -> dict[str, torch.Tensor]:
    expected = build_model(RunSettings.from_config(federation.config).model_config(num_classes(SITES[0])))
    saved_round, state = load_checkpoint(path)
    assert saved_round == 1 and state.keys() == expected.state_dict().keys()
    assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())
    return state


# ----------------------------------------------------------------------------------------------- central


def test_central_trains_on_the_union_and_writes_the_federation_records(
    central: Run, federation: Federation, federation_splits: list
) -> None:
    records = _check_records(central, federation, "central")
    trains = [r for r in records if r["phase"] == "train"]
    assert len(trains) == 1 and trains[0]["site"] == "central" and trains[0]["round"] == 1
    assert set(trains[0]) == {"round", "phase", "site", NUM_EXAMPLES, *TRAIN_METRIC_KEYS} - {SITE_INDEX}
    assert trains[0][NUM_EXAMPLES] == sum(len(split.train) for split in federation_splits)
    assert trains[0]["bytes-sent"] == 0

    assert sorted(p.name for p in (central.path / "checkpoints").iterdir()) == ["round-0001.safetensors"]
    _check_checkpoint(central.path / "checkpoints" / "round-0001.safetensors", federation)

    # the federation's splits: the union of every site's training subjects; each site's own test subjects
    union = set().union(*(_subjects(split.train.samples) for split in federation_splits))
    assert central.seen.trained == [union]
    tested = [{(split.spec.dataset, s) for s in split.test_subjects} for split in federation_splits]
    assert central.seen.evaluated == tested and all(tested)
    assert not union & set().union(*tested)

    assert sum(line.startswith("round 1/1  central ") for line in central.output.splitlines()) == 1


def test_two_central_runs_with_one_seed_give_the_same_results(
    central: Run, federation: Federation, tmp_path: Path
) -> None:
    again = _invoke(federation, "central", tmp_path / "again")
    assert load_summary(again.path / "summary.json") == load_summary(central.path / "summary.json")

    def stable(path: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "train-seconds"} for r in load_metrics(path / "metrics.jsonl")]

    assert stable(again.path) == stable(central.path)
    _, first = load_checkpoint(central.path / "checkpoints" / "round-0001.safetensors")
    _, second = load_checkpoint(again.path / "checkpoints" / "round-0001.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)


# ----------------------------------------------------------------------------------------------- local


def test_local_trains_one_network_per_site_and_writes_the_federation_records(
    local: Run, federation: Federation, federation_splits: list
) -> None:
    records = _check_records(local, federation, "local")
    trains = [r for r in records if r["phase"] == "train"]
    assert [(r["round"], r["site"], r[SITE_INDEX]) for r in trains] == [(1, s, i) for i, s in enumerate(SITES)]
    for record, split in zip(trains, federation_splits, strict=True):
        assert set(record) == {"round", "phase", "site", NUM_EXAMPLES, *TRAIN_METRIC_KEYS}
        assert record[NUM_EXAMPLES] == len(split.train)
    phases = [(r["site"], r["phase"]) for r in records]  # round by round, each site trained then evaluated
    assert phases == [(site, phase) for site in SITES for phase in ("train", "evaluate")]

    checkpoints = local.path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(SITES)
    states = []
    for site in SITES:
        assert [p.name for p in (checkpoints / site).iterdir()] == ["round-0001.safetensors"]
        states.append(_check_checkpoint(checkpoints / site / "round-0001.safetensors", federation))
    assert any(not torch.equal(states[0][name], states[1][name]) for name in states[0])  # two networks

    # each site trains on its own training subjects and is scored on its own test subjects, as federated
    assert local.seen.trained == [_subjects(split.train.samples) for split in federation_splits]
    assert local.seen.evaluated == [{(s.spec.dataset, t) for t in s.test_subjects} for s in federation_splits]

    lines = local.output.splitlines()
    for site in SITES:
        assert sum(line.startswith(f"round 1/1  {site} ") for line in lines) == 1


# ----------------------------------------------------------------------------------------------- bad input


def test_an_unknown_mode_exits_2_naming_the_choices(federation: Federation, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, federation.arguments("nope", tmp_path / "run"))
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "'nope'" in flat and "central" in flat and "local" in flat and "Traceback" not in flat
    assert not (tmp_path / "run").exists()


def test_a_missing_config_file_exits_2_with_one_message(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    arguments = ["train", "--mode", "central", "--config", str(missing), "--data", str(tmp_path / "synthetic")]
    result = CliRunner().invoke(app, [*arguments, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "error:" in flat and str(missing) in flat and "does not exist" in flat and "Traceback" not in flat
    assert not any(tmp_path.iterdir())  # nothing synthesised, prepared or recorded


def test_a_run_directory_holding_files_is_refused(federation: Federation, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old.txt").write_text("keep")
    result = CliRunner().invoke(app, federation.arguments("local", tmp_path / "run"))
    assert result.exit_code == 2, result.output
    assert "already holds files" in " ".join(result.output.split())
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["old.txt"]
