"""``fedmer train --mode central|local`` on a tiny synthetic federation of two sites: the records the federation
writes, the federation's splits, reproducibility, leave-one-subject-out (``--protocol loso``), and refusals of bad
input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TinySites
from typer.testing import CliRunner

import client.task
from client.protocol import EVALUATE_METRIC_KEYS, NUM_EXAMPLES, SITE_INDEX, TRAIN_METRIC_KEYS
from client.site import RunSettings, SiteSpec, SplitSettings, load_data, num_classes
from models import build_model
from partitions.labels import load_site
from partitions.splits import subject_groups
from server.cli import app
from server.records import (
    COLLAPSED,
    POOLED_KEYS,
    SITE_KEYS,
    collapsed,
    load_checkpoint,
    load_metrics,
    load_summary,
)
from server.server_app import pooled_scores

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
    """Subjects of every dataset the run trained on and evaluated, and the clips it evaluated, in call order."""

    trained: list[set[tuple[str, str]]] = field(default_factory=list)
    evaluated: list[set[tuple[str, str]]] = field(default_factory=list)
    evaluated_clips: list[list[str]] = field(default_factory=list)


@dataclass
class Run:
    path: Path
    output: str
    seen: Seen


@pytest.fixture(scope="module")
def federation(tiny_sites: TinySites, tmp_path_factory: pytest.TempPathFactory) -> Federation:
    """Two of the session's tiny sites, with a config file of their own."""
    root = tmp_path_factory.mktemp("baselines")
    config_file = root / "settings.toml"
    config_file.write_text(f'sites = "{",".join(SITES)}"\nlocal-epochs = 1\nbatch-size = 8\n')
    config = tiny_sites.config(config_file, out=str(root / "unused"))
    return Federation(tiny_sites.data, tiny_sites.cache, config_file, config)


def _subjects(samples: list) -> set[tuple[str, str]]:
    return {(sample.database, sample.subject) for sample in samples}


def _invoke(federation: Federation, mode: str, out: Path, *extra: str, train: bool = True) -> Run:
    """The command in this process, with train_local / evaluate_local watched (the baselines look them up in
    client.task at run time); ``train=False`` skips the training itself (a test of which clips train)."""
    seen = Seen()
    train_local, evaluate_local = client.task.train_local, client.task.evaluate_local

    def watch_train(model: Any, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        seen.trained.append(_subjects(dataset.samples))
        if not train:
            return client.task.TrainOutcome(dict.fromkeys(client.task.LOSS_TERMS, 0.0), 0.0, 0.0, len(dataset))
        return train_local(model, dataset, *args, **kwargs)

    def watch_evaluate(model: Any, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        seen.evaluated.append(_subjects(dataset.samples))
        seen.evaluated_clips.append([sample.key for sample in dataset.samples])
        return evaluate_local(model, dataset, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(client.task, "train_local", watch_train)
        patch.setattr(client.task, "evaluate_local", watch_evaluate)
        result = CliRunner().invoke(app, federation.arguments(mode, out, *extra))
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
    expected = {**federation.config, "num-server-rounds": 1, "out": str(out), "strategy": mode, "mode": mode}
    assert config["run-key"] and config["run-key"] != federation.config["run-key"]  # a run of its own
    assert config == {**expected, "protocol": "holdout", "run-key": config["run-key"]}
    assert config["sites"] == ",".join(SITES)

    records = load_metrics(out / "metrics.jsonl")
    evaluations = [r for r in records if r["phase"] == "evaluate"]
    assert [(r["round"], r["site"]) for r in evaluations] == [(1, site) for site in SITES]
    for index, record in enumerate(evaluations):
        assert set(record) == {"round", "phase", "site", COLLAPSED, NUM_EXAMPLES, *EVALUATE_METRIC_KEYS}
        assert record[SITE_INDEX] == index
        confusion = np.array(record["confusion"]).reshape(3, 3)
        assert confusion.sum() == record[NUM_EXAMPLES] > 0
        assert record[COLLAPSED] is collapsed([record["confusion"]])

    document = json.loads((out / "summary.json").read_text())
    assert document == load_summary(out / "summary.json")
    assert set(document) == {"rounds", "sites", "pooled"} and document["rounds"] == 1
    assert list(document["sites"]) == list(SITES)
    for record in evaluations:
        scores = {key: round(record[key], 4) for key in SITE_KEYS}
        assert document["sites"][record["site"]] == {**scores, COLLAPSED: record[COLLAPSED]}
    confusions = [record["confusion"] for record in evaluations]
    pooled = pooled_scores(confusions)
    assert document["pooled"] == {
        **{key: round(pooled[key], 4) for key in POOLED_KEYS},
        COLLAPSED: collapsed(confusions),
    }
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


def test_central_balances_its_loss_over_the_union_of_the_sites_classes(federation_splits: list) -> None:
    from torch.utils.data import ConcatDataset

    from client.task import class_targets
    from server.baselines import SiteUnion

    parts = [split.train for split in federation_splits]
    every = [target for part in parts for target in part.targets]
    assert len(set(every)) > 1
    assert class_targets(SiteUnion(parts)) == every == class_targets(ConcatDataset(parts))
    with pytest.raises(TypeError, match="no class targets"):
        class_targets(torch.utils.data.TensorDataset(torch.zeros(2)))


def test_two_central_runs_with_one_seed_give_the_same_results(
    central: Run, federation: Federation, tmp_path: Path
) -> None:
    again = _invoke(federation, "central", tmp_path / "again")
    assert load_summary(again.path / "summary.json") == load_summary(central.path / "summary.json")

    def stable(path: Path) -> list[dict[str, Any]]:
        timings = ("train-seconds", "evaluate-seconds")
        return [{k: v for k, v in r.items() if k not in timings} for r in load_metrics(path / "metrics.jsonl")]

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


# ----------------------------------------------------------------------------------------------- LOSO


def _subset(federation: Federation, path: Path, subjects: dict[str, int]) -> Path:
    """A sample list (``subset``) keeping, per site, its ``subjects[site]`` subjects with the fewest clips."""
    rows = []
    for site, count in subjects.items():
        labelled = load_site(site, Path(federation.config["data-root"]) / site, labels="composite3")
        groups = subject_groups(labelled.samples)
        for key in sorted(groups, key=lambda key: (len(groups[key]), key))[:count]:
            for index in groups[key]:
                sample = labelled.samples[index]
                rows.append(f"{site},{sample.subject},{sample.clip_id},{labelled.targets[index]}\n")
    path.write_text("".join(rows))
    return path


def _restricted(federation: Federation, root: Path, subjects: dict[str, int]) -> Federation:
    """The federation with a config file whose ``subset`` keeps ``subjects[site]`` subjects of each site."""
    subset = _subset(federation, root / "subset.csv", subjects)
    config_file = root / "settings.toml"
    config_file.write_text(f'{federation.config_file.read_text()}subset = "{subset}"\n')
    return replace(federation, config_file=config_file, config={**federation.config, "subset": str(subset)})


@pytest.fixture(scope="module")
def loso_federation(federation: Federation, tmp_path_factory: pytest.TempPathFactory) -> Federation:
    """Two subjects per site: the fewest that leave every local fold a training subject, so 4 folds in all."""
    return _restricted(federation, tmp_path_factory.mktemp("loso"), dict.fromkeys(SITES, 2))


@pytest.fixture(scope="module")
def loso_clips(loso_federation: Federation) -> dict[str, list]:
    """Site -> its samples under the subset list, as the run reads them."""
    settings = RunSettings.from_config(loso_federation.config)
    specs = [SiteSpec.from_config({"partition-id": index}, loso_federation.config) for index in range(len(SITES))]
    return {spec.dataset: load_data.__wrapped__(spec, SplitSettings.of(settings)).site.samples for spec in specs}


def _clip_mean(lines: list[dict[str, Any]], key: str) -> float:
    return sum(line[key] * line[NUM_EXAMPLES] for line in lines) / sum(line[NUM_EXAMPLES] for line in lines)


def _check_loso_records(run: Run, federation: Federation, clips: dict[str, list], mode: str) -> list[dict[str, Any]]:
    """What both modes write: one fold per subject, its held-out clips predicted once, scores pooled over folds."""
    out = run.path
    expected = {**federation.config, "num-server-rounds": 1, "out": str(out), "strategy": mode, "mode": mode}
    config = json.loads((out / "config.json").read_text())
    assert config["run-key"] and config["run-key"] != federation.config["run-key"]  # a run of its own
    assert config == {**expected, "protocol": "loso", "run-key": config["run-key"]}

    folds = [f"{site}/{subject}" for site in SITES for subject in sorted({s.subject for s in clips[site]})]
    assert len(folds) == 4
    records = load_metrics(out / "metrics.jsonl")
    evaluations = [r for r in records if r["phase"] == "evaluate"]
    assert [(r["round"], r["site"], r[SITE_INDEX], r["fold"]) for r in evaluations] == [
        (1, fold.split("/")[0], SITES.index(fold.split("/")[0]), fold) for fold in folds
    ]
    assert [r["fold"] for r in records if r["phase"] == "train"] == folds  # one round per fold

    # every held-out clip is predicted exactly once, by the fold that holds out its subject
    everything = sorted(sample.key for site in SITES for sample in clips[site])
    assert sorted(key for keys in run.seen.evaluated_clips for key in keys) == everything
    assert [{f"{site}/{subject}" for site, subject in held} for held in run.seen.evaluated] == [{f} for f in folds]
    assert sum(r[NUM_EXAMPLES] for r in evaluations) == len(everything)
    for record in evaluations:
        assert np.array(record["confusion"]).sum() == record[NUM_EXAMPLES]

    # summary: MEGC2019 pooling over every fold's predictions, per site over its subjects' folds
    document = json.loads((out / "summary.json").read_text())
    assert {k: document[k] for k in ("rounds", "protocol", "folds")} == {"rounds": 1, "protocol": "loso", "folds": 4}
    assert {k: document[k] for k in ("rounds", "sites", "pooled")} == load_summary(out / "summary.json")
    confusions = [r["confusion"] for r in evaluations]
    pooled = pooled_scores(confusions)
    assert document["pooled"] == {
        **{key: round(pooled[key], 4) for key in POOLED_KEYS},
        COLLAPSED: collapsed(confusions),
    }
    for site in SITES:
        lines = [r for r in evaluations if r["site"] == site]
        scores = pooled_scores([r["confusion"] for r in lines])
        means = {key: _clip_mean(lines, key) for key in ("accuracy", "epe", "nme")}
        expected = {key: round({**scores, **means}[key], 4) for key in SITE_KEYS}
        assert document["sites"][site] == {**expected, COLLAPSED: collapsed([r["confusion"] for r in lines])}

    for fold in folds:  # the last round's network of every fold
        assert load_checkpoint(out / "checkpoints" / fold / "round-0001.safetensors")[0] == 1
    assert not (out / "rounds.png").exists()
    lines = run.output.splitlines()
    assert [sum(line.startswith(f"fold {n}/4 ") for line in lines) for n in (1, 2, 3, 4)] == [2, 2, 2, 2]
    assert f"run directory: {out}" in " ".join(run.output.split())
    return records


def test_central_loso_holds_out_every_subject_of_every_site_once_and_pools_the_folds(
    loso_federation: Federation, loso_clips: dict[str, list], tmp_path: Path
) -> None:
    run = _invoke(loso_federation, "central", tmp_path / "run", "--protocol", "loso")
    records = _check_loso_records(run, loso_federation, loso_clips, "central")
    assert all(r["site"] == "central" and SITE_INDEX not in r for r in records if r["phase"] == "train")
    everyone = {(sample.database, sample.subject) for site in SITES for sample in loso_clips[site]}
    assert len(run.seen.trained) == len(run.seen.evaluated) == 4
    for trained, held in zip(run.seen.trained, run.seen.evaluated, strict=True):
        assert trained == everyone - held  # every other subject of every site, never the held-out one


def test_local_loso_holds_out_each_subject_within_its_own_site(
    loso_federation: Federation, loso_clips: dict[str, list], tmp_path: Path
) -> None:
    """Which clips each fold trains on and predicts (the training itself is skipped: central's test runs it)."""
    run = _invoke(loso_federation, "local", tmp_path / "run", "--protocol", "loso", train=False)
    records = _check_loso_records(run, loso_federation, loso_clips, "local")
    for record in (r for r in records if r["phase"] == "train"):  # the held-out subject's site trains
        assert record["site"] == record["fold"].split("/")[0] and record[SITE_INDEX] == SITES.index(record["site"])
    for trained, held in zip(run.seen.trained, run.seen.evaluated, strict=True):
        ((site, _subject),) = held
        own = {(sample.database, sample.subject) for sample in loso_clips[site]}
        assert trained == own - held


def test_local_loso_refuses_a_site_with_one_subject(federation: Federation, tmp_path: Path) -> None:
    single = _restricted(federation, tmp_path, {"casme2": 2, "samm": 1})
    result = CliRunner().invoke(app, single.arguments("local", tmp_path / "run", "--protocol", "loso"))
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "site 1 (samm" in flat and "at least 2 subjects" in flat and "Traceback" not in flat
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------- bad input


def test_an_unknown_mode_exits_2_naming_the_choices(federation: Federation, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, federation.arguments("nope", tmp_path / "run"))
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "'nope'" in flat and "central" in flat and "local" in flat and "Traceback" not in flat
    assert not (tmp_path / "run").exists()


def test_an_unknown_protocol_exits_2_naming_the_choices(federation: Federation, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, federation.arguments("central", tmp_path / "run", "--protocol", "nope"))
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "'nope'" in flat and "holdout" in flat and "loso" in flat and "Traceback" not in flat
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


@pytest.mark.parametrize("setting", ["dp = true\ndp-target-epsilon = 3.0", 'central-dp = "server-fixed"'])
def test_dp_settings_are_refused_rather_than_ignored(federation: Federation, tmp_path: Path, setting: str) -> None:
    config = tmp_path / "private.toml"
    config.write_text(setting + "\n")
    result = CliRunner().invoke(app, [*federation.arguments("central", tmp_path / "run"), "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "fedmer train has no differential privacy" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()
