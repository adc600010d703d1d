"""``fedmer prepare`` end to end through the real CLI, adapter and label layer."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from openpyxl import Workbook
from typer.testing import CliRunner

from partitions.cache import PrepareConfig, entry_path, read_entry
from partitions.dataset import ClipDataset
from partitions.flow import endpoint_error
from server.cli import app

HEADER = [
    "Subject",
    "Filename",
    None,
    "OnsetFrame",
    "ApexFrame",
    "OffsetFrame",
    None,
    "Action Units",
    "Estimated Emotion",
    "Objective Classes",
]


def build_cropped_casme2(root: Path) -> dict[str, Path]:
    """A two-clip CASME II cropped release (``Cropped/sub01/EP../reg_imgN.jpg``) plus a row without frames.

    Frames are a drifting texture: no face for HOG, so the pre-cropped fallback (whole frame) is used.
    """
    book = Workbook()
    sheet = book.active
    sheet.append(HEADER)
    sheet.append([1, "EP02_01f", None, 10, 12, 19, None, "12", "happiness", 1])
    sheet.append([1, "EP03_02", None, 30, 32, 37, None, "4+L10", "disgust", 2])
    sheet.append([2, "EP05_03", None, 50, 52, 54, None, "14", "surprise", 3])  # no frame folder
    root.mkdir(parents=True)
    book.save(root / "CASME2-coding-20190701.xlsx")
    texture = cv2.GaussianBlur((np.random.default_rng(0).random((140, 120)) * 255).astype(np.uint8), (0, 0), 2)
    for clip, numbers in (("EP02_01f", range(10, 20)), ("EP03_02", range(30, 38))):
        folder = root / "Cropped" / "sub01" / clip
        folder.mkdir(parents=True)
        for n in numbers:
            cv2.imwrite(str(folder / f"reg_img{n}.jpg"), np.roll(texture, n // 3, axis=1))
    corrupt = root / "Cropped" / "sub01" / "EP03_02" / "reg_img30.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return {"corrupt": corrupt}


def test_prepare_command_end_to_end(tmp_path: Path) -> None:
    files = build_cropped_casme2(tmp_path / "CASME2")
    cache = tmp_path / "cache"
    runner = CliRunner()
    arguments = ["prepare", "--dataset", "casme2", "--root", str(tmp_path / "CASME2"), "--cache", str(cache)]
    result = runner.invoke(app, arguments, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "1 prepared" in result.output and "1 skipped" in result.output
    flat = " ".join(result.output.split())
    assert "EP03_02" in flat and "reg_img30.jpg" in flat and "unreadable frame" in flat
    assert "EP05_03" in flat  # the adapter's skip is reported too

    folder = PrepareConfig().folder(cache)
    report = json.loads((folder / "reports" / "casme2.json").read_text())
    assert report["prepared"] == 1 and [row["reason"] for row in report["skipped"]] == [
        f"unreadable frame {files['corrupt']}: not a decodable image (corrupt or truncated file)"
    ]
    assert any("EP05_03" in row["entry"] for row in report["site_skipped"])
    entries = list(folder.rglob("*.npz"))
    assert len(entries) == 1
    assert read_entry(entries[0])["frames"].shape == (8, 128, 128)

    again = runner.invoke(app, [*arguments, "--workers", "2"], catch_exceptions=False)
    assert again.exit_code == 0 and "1 already cached" in again.output


def test_prepare_command_reports_bad_input_without_traceback(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(
        app, ["prepare", "--dataset", "casme2", "--root", str(tmp_path / "nope"), "--cache", str(tmp_path / "cache")]
    )
    assert missing.exit_code == 2 and "error:" in missing.output and "Traceback" not in missing.output

    build_cropped_casme2(tmp_path / "CASME2")
    blocker = tmp_path / "cache-file"
    blocker.write_text("a file where the cache folder should be")
    blocked = runner.invoke(
        app, ["prepare", "--dataset", "casme2", "--root", str(tmp_path / "CASME2"), "--cache", str(blocker)]
    )
    assert blocked.exit_code == 2 and "cannot create the cache folder" in blocked.output


def test_prepare_synthetic_site_with_ground_truth(tmp_path: Path) -> None:
    from partitions.labels import load_site
    from partitions.synth.writer import synthesise

    written = synthesise(tmp_path / "synth", seed=1, sites=["casme2"], subjects=1, clips_per_subject=2, progress=False)
    cache = tmp_path / "cache"
    result = CliRunner().invoke(
        app,
        ["prepare", "--dataset", "casme2", "--root", str(written["casme2"]), "--cache", str(cache)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    site = load_site("casme2", written["casme2"])
    folder = PrepareConfig().folder(cache)
    entries = [entry_path(folder, s) for s in site.samples]
    assert entries and all(p.exists() for p in entries), result.output
    for path in entries:
        entry = read_entry(path)
        assert not bool(entry["interpolated"]) and "gt_flow" in entry, f"{path} lacks the exact ground truth"
        flow, truth = entry["flow"].astype(np.float32), entry["gt_flow"].astype(np.float32)
        assert truth.shape == flow.shape and entry["gt_landmarks"].shape == entry["landmarks"].shape
        # TV-L1 tracks the exact motion better than assuming none; dlib lands near the exact points.
        assert endpoint_error(flow, truth, margin=4) < endpoint_error(np.zeros_like(truth), truth, margin=4)
        exact = entry["gt_landmarks"]
        inter_ocular = np.linalg.norm(exact[:, 36] - exact[:, 45], axis=-1)
        assert (np.linalg.norm(entry["landmarks"] - exact, axis=-1).mean(-1) / inter_ocular).max() < 0.15

    dataset = ClipDataset.from_site(site, None, cache, train=True, seed=0)
    item = dataset[0]
    assert bool(item["gt_mask"]) and item["gt_flow"].shape == (7, 2, 128, 128)
    assert int(item["label"]) == site.targets[0]
