"""``describe_site`` and ``fedmer index`` on hand-made trees."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from handmade import (
    CASME2_SAMPLES,
    SMIC_HS,
    assert_user_message,
    build_casme2,
    build_casme3,
    build_samm,
    build_smic,
    write_csv,
)
from rich.console import Console
from typer.testing import CliRunner

from partitions.errors import DataError
from partitions.index import describe_site, render_description
from server.cli import app

REQUIRED_KEYS = {"samples", "subjects", "classes", "skipped"}


def run_index(*args: str) -> tuple[int, str, str]:
    """``fedmer index ...`` through the CLI: exit code, stdout, stderr."""
    result = CliRunner().invoke(app, ["index", *args])
    return result.exit_code, result.stdout, result.stderr


def test_describe_casme2_native(tmp_path: Path) -> None:
    description = describe_site("casme2", build_casme2(tmp_path))
    assert set(description) >= REQUIRED_KEYS
    assert description["samples"] == CASME2_SAMPLES
    assert description["subjects"] == 4
    assert description["classes"] == {
        "disgust": 1,
        "fear": 1,
        "happiness": 1,
        "others": 1,
        "repression": 1,
        "sadness": 0,  # present although no sample has it
        "surprise": 1,
    }
    assert sum(description["classes"].values()) == description["samples"]
    assert {tuple(item) for item in description["skipped"]} == {("entry", "reason")}
    assert len(description["skipped"]) == 2


def test_describe_counts_follow_the_label_space(tmp_path: Path) -> None:
    description = describe_site("samm", build_samm(tmp_path), labels="composite3")
    assert description["classes"] == {"negative": 3, "positive": 1, "surprise": 1}
    assert description["samples"] == 5
    assert description["subjects"] == 3  # 007's only clip is 'other', dropped
    assert any("not a class of --labels composite3" in s["reason"] for s in description["skipped"])


def test_cli_index_json(tmp_path: Path) -> None:
    root = build_smic(tmp_path)
    code, out, _ = run_index("--dataset", "smic", "--root", str(root), "--json")
    assert code == 0
    description = json.loads(out)
    assert set(description) >= REQUIRED_KEYS
    assert {k: description[k] for k in ("samples", "subjects", "classes")} == SMIC_HS
    assert [s["entry"].split(" (")[0] for s in description["skipped"]] == ["s3/s3_ne_02"]
    assert description["database"] == "smic"


def test_cli_index_json_with_labels_and_subset(tmp_path: Path) -> None:
    root = build_casme2(tmp_path / "casme2")
    subset = write_csv(tmp_path / "list.csv", ["casme2,sub01,EP02_01f,1", "casme2,sub02,EP01_01,2"])
    code, out, _ = run_index(
        "--dataset", "casme2", "--root", str(root), "--labels", "composite3", "--subset", str(subset), "--json"
    )
    assert code == 0
    description = json.loads(out)
    assert description["samples"] == 2
    assert description["subjects"] == 2
    assert description["classes"] == {"negative": 0, "positive": 1, "surprise": 1}


def test_cli_index_table(tmp_path: Path) -> None:
    code, out, _ = run_index("--dataset", "casme3", "--root", str(build_casme3(tmp_path)))
    assert code == 0
    assert "5 samples" in out and "3 subjects" in out
    assert "Skipped (2)" in out


def test_cli_index_wrong_dataset_is_one_message_and_exit_2(tmp_path: Path) -> None:
    code, out, err = run_index("--dataset", "samm", "--root", str(build_casme2(tmp_path)), "--json")
    assert code == 2
    assert out == ""
    message = " ".join(err.split())  # rich wraps long lines
    assert message.startswith("error:")
    assert "--dataset casme2" in message and "CASME II" in message
    assert "Traceback" not in err


def test_render_description_lists_every_class_and_the_skipped(tmp_path: Path) -> None:
    description = describe_site("casme2", build_casme2(tmp_path), labels="casme2-5")
    buffer = io.StringIO()
    render_description(description, Console(file=buffer, width=200))
    text = buffer.getvalue()
    for name in ("happiness", "disgust", "repression", "surprise", "others"):
        assert name in text
    assert "Skipped (3)" in text
    assert "EP09_01" in text


def test_describe_bad_space_message(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        describe_site("smic", build_smic(tmp_path), labels="casme2-5")
    assert_user_message(error, "--labels casme2-5", "SMIC-HS", "smic-3")
