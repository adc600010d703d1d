"""Run directory: config, metrics lines, checkpoints, summary, table and plot; whole files written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from rich.console import Console

import partitions.cache
from server.records import (
    COLLAPSED,
    LOGS,
    ROUND_PHASE,
    RunDirectory,
    chance_level,
    collapsed,
    collapsed_class,
    load_checkpoint,
    load_metrics,
    load_summary,
    plot_rounds,
    rounds_figure,
    site_table,
)

SITES = {
    "casme2": {"uf1": 0.612345, "uar": 0.58, "accuracy": 0.7, "epe": 1.23456, "nme": 0.051, "extra": 1},
    "samm": {"uf1": 0.5, "uar": 0.45, "accuracy": 0.6, "epe": None, "nme": float("nan")},
}
POOLED = {"uf1": 0.55556, "uar": 0.51111}


def test_creates_the_folder_and_refuses_a_non_empty_one(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "runs" / "a")
    assert run.path.is_dir()
    run.write_config({"strategy": "fedavg"})
    with pytest.raises(FileExistsError, match="already holds files"):
        RunDirectory(tmp_path / "runs" / "a")
    run.append_metrics(1, "train", "casme2", {"loss": 1.0})
    run.save_checkpoint(1, {"w": torch.ones(2)})
    (run.path / "notes.txt").write_text("keep me")
    again = RunDirectory(run.path, overwrite=True)  # the earlier run's records go, foreign files stay
    assert sorted(p.name for p in again.path.rglob("*") if p.is_file()) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        RunDirectory(tmp_path / "file")


def test_config_is_json_with_plain_values(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    path = run.write_config({"rounds": 3, "lr": np.float32(0.5), "data": Path("/data"), "sites": ("a", "b")})
    assert path.name == "config.json"
    assert json.loads(path.read_text()) == {"rounds": 3, "lr": 0.5, "data": "/data", "sites": ["a", "b"]}


def test_metrics_are_one_flushed_json_line_each(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    run.append_metrics(1, "train", "casme2", {"loss": 0.5, "site-index": 0})
    run.append_metrics(1, "evaluate", "samm", {"uf1": np.float64(0.25), "class-recall": [1.0, 0.0], "nme": math.inf})
    lines = run.metrics_path.read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0]) == {"round": 1, "phase": "train", "site": "casme2", "loss": 0.5, "site-index": 0}
    assert load_metrics(run.metrics_path)[1] == {
        "round": 1,
        "phase": "evaluate",
        "site": "samm",
        "uf1": 0.25,
        "class-recall": [1.0, 0.0],
        "nme": None,
    }
    with pytest.raises(ValueError, match="reserved"):
        run.append_metrics(2, "train", "casme2", {"round": 3})


def test_a_round_line_holds_the_rounds_wall_time_and_leaves_the_plot_alone(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    run.append_metrics(1, "train", "casme2", {"loss": 0.5})
    run.append_round(1, np.float64(12.5))
    assert load_metrics(run.metrics_path)[-1] == {"round": 1, "phase": ROUND_PHASE, "seconds": 12.5}
    assert plot_rounds(run.metrics_path, run.plot_path).stat().st_size > 0  # a line without a site is skipped


def test_load_metrics_ignores_a_torn_last_line_but_not_a_broken_middle(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2}\n{"round": 3, "lo')
    assert load_metrics(path) == [{"round": 1}, {"round": 2}]
    path.write_text('{"round": 1}\nnot json\n{"round": 3}\n')
    with pytest.raises(ValueError, match=":2:"):
        load_metrics(path)


def test_checkpoints_hold_contiguous_tensors_and_the_round(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    state = {"w": weight.t(), "tied": weight, "steps": torch.tensor(7)}  # a view sharing storage with "tied"
    path = run.save_checkpoint(3, state)
    assert path == run.path / "checkpoints" / "round-0003.safetensors"
    server_round, loaded = load_checkpoint(path)
    assert server_round == 3
    assert set(loaded) == {"w", "tied", "steps"}
    assert torch.equal(loaded["w"], weight.t()) and loaded["steps"].item() == 7

    record = ArrayRecord({"w": Array(np.ones((2, 2), np.float32))})
    server_round, loaded = load_checkpoint(run.save_checkpoint(12, record))
    assert server_round == 12 and torch.equal(loaded["w"], torch.ones(2, 2))


def test_summary_has_exactly_the_documented_keys_rounded(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    path = run.write_summary(5, SITES, POOLED)
    document = json.loads(path.read_text())
    assert document == {
        "rounds": 5,
        "sites": {
            "casme2": {"uf1": 0.6123, "uar": 0.58, "accuracy": 0.7, "epe": 1.2346, "nme": 0.051},
            "samm": {"uf1": 0.5, "uar": 0.45, "accuracy": 0.6, "epe": None, "nme": None},
        },
        "pooled": {"uf1": 0.5556, "uar": 0.5111},
    }
    assert load_summary(path) == document


@pytest.mark.parametrize(
    ("rounds", "sites", "pooled", "fragment"),
    [
        (5, {"casme2": {"uf1": 0.5, "uar": 0.5, "accuracy": 0.5, "epe": 1.0}}, POOLED, "nme"),
        (5, SITES, {"uf1": 0.5}, "pooled lacks ['uar']"),
        (5, {}, POOLED, "at least one site"),
        (-1, SITES, POOLED, "rounds"),
        (5, {"x": {"uf1": "high", "uar": 0, "accuracy": 0, "epe": 0, "nme": 0}}, POOLED, "uf1 must be a number"),
    ],
)
def test_summary_validation(tmp_path: Path, rounds, sites, pooled, fragment: str) -> None:
    run = RunDirectory(tmp_path / "run")
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        run.write_summary(rounds, sites, pooled)
    assert not run.summary_path.exists()


def test_a_failing_write_leaves_the_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDirectory(tmp_path / "run")
    run.write_summary(5, SITES, POOLED)
    before = run.summary_path.read_bytes()
    run.write_config({"a": 1})

    with pytest.raises(ValueError):  # invalid content: refused before anything is written
        run.write_summary(6, {"x": {}}, POOLED)
    with pytest.raises(TypeError):  # unserialisable config
        run.write_config({"a": object()})

    def broken_replace(source, target):
        raise OSError("disk gone")

    monkeypatch.setattr(partitions.cache.os, "replace", broken_replace)  # the temp file is written, never moved
    with pytest.raises(OSError, match="disk gone"):
        run.write_summary(7, SITES, POOLED)
    with pytest.raises(OSError, match="disk gone"):
        run.save_checkpoint(1, {"w": torch.ones(1)})
    assert run.summary_path.read_bytes() == before
    assert json.loads(run.config_path.read_text()) == {"a": 1}
    leftovers = [p.name for p in run.path.rglob("*") if p.is_file()]
    assert sorted(leftovers) == ["config.json", "summary.json"]  # no temp files, no half checkpoint


def test_site_table_has_a_row_per_site_and_a_pooled_row(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    table = site_table(load_summary(run.write_summary(5, SITES, POOLED)))
    assert table.row_count == 3
    assert [column.header for column in table.columns] == ["Site", "UF1", "UAR", "Accuracy", "EPE", "NME"]
    console = Console(record=True, width=120, color_system=None)
    console.print(table)
    lines = console.export_text().splitlines()
    casme2 = next(line for line in lines if "casme2" in line)
    samm = next(line for line in lines if "samm" in line)
    pooled = next(line for line in lines if "pooled" in line)
    assert all(value in casme2 for value in ("0.6123", "0.5800", "0.7000", "1.2346", "0.0510"))
    assert samm.count("—") == 2 and pooled.count("—") == 3 and "0.5556" in pooled and "0.5111" in pooled


def test_plot_rounds_writes_a_png(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    for server_round in (1, 2, 3):
        for site in ("casme2", "samm"):
            run.append_metrics(server_round, "train", site, {"loss": 2.0 / server_round})
            run.append_metrics(server_round, "evaluate", site, {"uf1": 0.2 * server_round})
    out = plot_rounds(run.metrics_path, run.plot_path)
    assert out == run.plot_path
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000


# ----------------------------------------------------------------------------------------------- collapse


def confusion(pairs: list[tuple[int, int]], classes: int = 3) -> list[int]:
    """A flattened confusion matrix (rows = true class) of (true, predicted) clips."""
    matrix = np.zeros((classes, classes), dtype=int)
    for true, predicted in pairs:
        matrix[true, predicted] += 1
    return matrix.ravel().tolist()


@pytest.mark.parametrize(
    ("pairs", "only", "flag"),
    [
        ([(0, 2), (1, 2), (2, 2)], 2, True),  # three classes, one answer
        ([(0, 1), (0, 1), (2, 1)], 1, True),  # two classes present are enough
        ([(0, 2), (1, 2), (2, 0)], None, False),  # two columns used
        ([(0, 0), (1, 1), (2, 2)], None, False),
        ([(1, 1), (1, 1)], None, False),  # one class only: predicting it is no sign of collapse
        ([(1, 0), (1, 0)], None, False),  # nor is predicting another one: nothing to tell classes apart by
        ([], None, None),  # no clip: nothing to judge
    ],
)
def test_a_site_collapses_when_every_prediction_falls_in_one_class_of_several(
    pairs: list[tuple[int, int]], only: int | None, flag: bool | None
) -> None:
    assert collapsed_class([confusion(pairs)]) == only
    assert collapsed([confusion(pairs)]) is flag


def test_the_pooled_predictions_collapse_only_when_every_site_answers_with_the_same_class() -> None:
    casme2, samm = confusion([(0, 2), (1, 2)]), confusion([(2, 2), (0, 2)])
    assert collapsed_class([casme2, samm]) == 2 and collapsed([casme2, samm]) is True
    other = confusion([(0, 1), (2, 1)])  # collapsed too, onto another class
    assert collapsed([other]) is True and collapsed([casme2, other]) is False
    assert collapsed([]) is None
    with pytest.raises(ValueError, match="CxC"):
        collapsed([[1, 0, 0]])


def test_evaluate_lines_and_the_summary_carry_the_collapse_flag(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    run.append_metrics(1, "evaluate", "casme2", {"uf1": 0.1, "confusion": confusion([(0, 2), (1, 2)])})
    run.append_metrics(1, "evaluate", "samm", {"uf1": 0.9, "confusion": confusion([(0, 0), (1, 1)])})
    run.append_metrics(1, "evaluate", "smic", {"uf1": 0.0, "confusion": [1, 2]})  # malformed: recorded, not judged
    run.append_metrics(1, "train", "casme2", {"loss": 1.0})  # no confusion matrix, no flag
    lines = load_metrics(run.metrics_path)
    assert [line.get(COLLAPSED, "absent") for line in lines] == [True, False, None, "absent"]
    with pytest.raises(ValueError, match="reserved"):
        run.append_metrics(2, "evaluate", "casme2", {COLLAPSED: False})  # derived from the matrix, never given

    sites = {"casme2": {**SITES["casme2"], COLLAPSED: True}, "samm": {**SITES["samm"], COLLAPSED: None}}
    document = json.loads(run.write_summary(5, sites, {**POOLED, COLLAPSED: False}).read_text())
    assert document["sites"]["casme2"][COLLAPSED] is True and document["sites"]["samm"][COLLAPSED] is None
    assert document["pooled"] == {"uf1": 0.5556, "uar": 0.5111, COLLAPSED: False}
    assert load_summary(run.summary_path) == document
    with pytest.raises(ValueError, match="collapsed must be"):
        run.write_summary(5, {"casme2": {**SITES["casme2"], COLLAPSED: "yes"}}, POOLED)


def test_a_folder_holding_only_the_runs_logs_counts_as_empty(tmp_path: Path) -> None:
    (tmp_path / "run" / LOGS).mkdir(parents=True)
    (tmp_path / "run" / LOGS / "flower.log").write_text("opened before the records\n")
    run = RunDirectory(tmp_path / "run")
    run.write_config({"a": 1})
    assert (run.path / LOGS / "flower.log").exists()
    with pytest.raises(FileExistsError, match="already holds files"):
        RunDirectory(tmp_path / "run")


# ----------------------------------------------------------------------------------------------- rounds.png


def test_the_rounds_figure_has_whole_rounds_a_fixed_score_axis_and_the_chance_level(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    for server_round in (1, 2, 3):
        for site in ("casme2", "samm"):
            run.append_metrics(server_round, "train", site, {"loss": 2.0 / server_round})
            scores = {"uf1": 0.1 * server_round, "confusion": confusion([(0, 0), (1, 2)])}
            run.append_metrics(server_round, "evaluate", site, scores)
    figure = rounds_figure(load_metrics(run.metrics_path))
    uf1, loss = figure.axes
    for axes in (uf1, loss):
        shown = [tick for tick in axes.get_xticks() if axes.get_xlim()[0] <= tick <= axes.get_xlim()[1]]
        assert shown and all(float(tick).is_integer() for tick in shown)
    assert uf1.get_ylim() == (0.0, 1.0)
    chance = [line for line in uf1.get_lines() if line.get_label().startswith("chance")]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == pytest.approx([1 / 3, 1 / 3])
    assert chance_level(load_metrics(run.metrics_path)) == pytest.approx(1 / 3)
    assert chance_level([{"phase": "train", "loss": 1.0}]) is None
