"""The prepare cache: keys, atomic writes, resumability, worker determinism and the skipped summary."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import fields, replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from rich.console import Console

import partitions.cache as cache_module
from partitions.cache import (
    PrepareConfig,
    SiteSamples,
    entry_path,
    prepare_samples,
    read_entry,
    render_report,
    report_path,
    write_entry,
)
from partitions.errors import DataError
from partitions.face import AlignConfig
from partitions.flow import FlowConfig
from partitions.records import Sample, Skipped

SMALL = PrepareConfig(t=4, align=AlignConfig(size=64))


def make_clip(
    root: Path, clip_id: str, frames: int = 6, precropped: bool = True, blank: bool = False, seed: int = 0
) -> Sample:
    """A tiny clip of a drifting texture (pre-cropped, so the whole frame stands in for the face)."""
    folder = root / clip_id
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    texture = cv2.GaussianBlur((rng.random((120, 110)) * 255).astype(np.uint8), (0, 0), 2)
    paths = []
    for n in range(1, frames + 1):
        image = np.full_like(texture, 128) if blank else np.roll(texture, n // 2, axis=1)
        path = folder / f"img{n}.jpg"
        cv2.imwrite(str(path), image)
        paths.append(path)
    return Sample(
        "casme2",
        "sub01",
        clip_id,
        tuple(paths),
        tuple(range(1, frames + 1)),
        200.0,
        "happiness",
        onset=1,
        apex=3,
        offset=frames,
        precropped=precropped,
    )


def quiet(samples: list[Sample], cache: Path, **options) -> cache_module.PrepareReport:
    """Run prepare on the small configuration without a progress bar."""
    return prepare_samples(samples, cache, "casme2", config=SMALL, progress=False, **options)


def test_key_changes_with_every_parameter(tmp_path: Path) -> None:
    base = PrepareConfig()
    variants = [
        replace(base, t=6),
        replace(base, align=AlignConfig(size=112)),
        replace(base, align=AlignConfig(left_eye=(0.3, 0.36))),
        *(
            replace(base, flow=replace(base.flow, **{f.name: getattr(base.flow, f.name) * 2 + 1}))
            for f in fields(FlowConfig)
        ),  # every TV-L1 setting (scales, warps, iterations, epsilon...)
        replace(base, upsamples=(0,)),
        replace(base, version=base.version + 1),
    ]
    folders = {base.folder(tmp_path)} | {v.folder(tmp_path) for v in variants}
    assert len(folders) == len(variants) + 1
    assert PrepareConfig().folder(tmp_path) == base.folder(tmp_path)  # stable for equal parameters

    sample = make_clip(tmp_path / "data", "EP01")
    moved = replace(sample, onset=2)  # a corrected sheet row is a new entry, not a stale hit
    assert entry_path(base.folder(tmp_path), sample) != entry_path(base.folder(tmp_path), moved)
    odd = replace(sample, clip_id="a (1)/x")
    assert entry_path(base.folder(tmp_path), odd).parent == base.folder(tmp_path) / "casme2" / "sub01"


def test_entry_contents_and_report(tmp_path: Path) -> None:
    sample = make_clip(tmp_path / "data", "EP01")
    report = quiet([sample], tmp_path / "cache")
    assert (report.prepared, report.reused, report.skipped) == (1, 0, [])
    entry = read_entry(entry_path(SMALL.folder(tmp_path / "cache"), sample))
    assert entry["frames"].shape == (4, 64, 64) and entry["frames"].dtype == np.uint8
    assert entry["flow"].shape == (3, 2, 64, 64) and entry["flow"].dtype == np.float16
    assert entry["landmarks"].shape == (4, 68, 2) and entry["landmarks"].dtype == np.float32
    assert entry["interpolated"].shape == () and not entry["interpolated"] and entry["face_fallback"]
    assert json.loads((SMALL.folder(tmp_path / "cache") / "config.json").read_text())["t"] == 4
    saved = json.loads(report_path(report.folder, "casme2").read_text())
    assert saved["prepared"] == 1 and saved["skipped"] == []


def test_resume_does_no_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = [make_clip(tmp_path / "data", f"EP0{i}", seed=i) for i in range(2)]
    first = quiet(samples, tmp_path / "cache")
    assert first.prepared == 2
    stamps = {p: p.stat().st_mtime_ns for p in (entry_path(first.folder, s) for s in samples)}

    def no_work(*_args, **_kwargs):
        raise AssertionError("a finished entry was processed again")

    monkeypatch.setattr(cache_module, "process_sample", no_work)
    second = quiet(samples, tmp_path / "cache")
    assert (second.prepared, second.reused, second.skipped) == (0, 2, [])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_failed_write_leaves_no_entry_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "cache" / "entry.npz"

    def crash(_fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        write_entry(target, {"frames": np.zeros((4, 8, 8), np.uint8)})
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_crash_during_write_leaves_nothing_readable_and_rerun_completes(tmp_path: Path) -> None:
    """A process killed mid-write (after the bytes, before the rename) leaves only a temp file."""
    sample = make_clip(tmp_path / "data", "EP01")
    cache = tmp_path / "cache"
    target = entry_path(SMALL.folder(cache), sample)
    script = textwrap.dedent(
        f"""
        import os, numpy as np
        from pathlib import Path
        from partitions.cache import write_entry
        os.fsync = lambda fd: os._exit(9)  # die like a killed worker, half way through the write
        write_entry(Path({str(target)!r}), {{"frames": np.ones((4, 64, 64), np.uint8)}})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 9, result.stderr
    assert not target.exists()
    assert [p.name.startswith(".") and p.suffix == ".tmp" for p in target.parent.iterdir()] == [True]
    with pytest.raises(DataError, match="fedmer prepare"):
        read_entry(target)

    report = quiet([sample], cache)
    assert report.prepared == 1 and report.reused == 0
    assert read_entry(target)["frames"].shape == (4, 64, 64)


def test_one_and_two_workers_write_identical_bytes(tmp_path: Path) -> None:
    samples = [make_clip(tmp_path / "data", f"EP0{i}", seed=i) for i in range(3)]
    one = quiet(samples, tmp_path / "one", workers=1)
    two = quiet(samples, tmp_path / "two", workers=2)
    assert one.prepared == two.prepared == 3
    for sample in samples:
        assert entry_path(one.folder, sample).read_bytes() == entry_path(two.folder, sample).read_bytes()


def test_sites_in_one_pool_match_separate_runs(tmp_path: Path) -> None:
    """Two sites through one pool of workers: each site's own report, and the entries a run per site writes."""
    casme = [make_clip(tmp_path / "a", f"EP0{i}", seed=i) for i in range(3)]
    samm = [replace(make_clip(tmp_path / "b", f"00{i}", seed=10 + i), database="samm") for i in range(2)]
    samm[1].frames[0].unlink()
    together = cache_module.prepare_many(
        [SiteSamples("casme2", casme), SiteSamples("samm", samm)],
        tmp_path / "one",
        workers=2,
        config=SMALL,
        progress=False,
    )
    apart = [
        quiet(casme, tmp_path / "casme2", workers=1),
        prepare_samples(samm, tmp_path / "samm", "samm", config=SMALL, progress=False),
    ]
    assert [(r.dataset, r.total, r.prepared, len(r.skipped)) for r in together] == [
        ("casme2", 3, 3, 0),
        ("samm", 2, 1, 1),
    ]
    for report, alone, samples in zip(together, apart, (casme, samm), strict=True):
        assert [s.reason for s in report.skipped] == [s.reason for s in alone.skipped]
        assert json.loads(report_path(report.folder, report.dataset).read_text())["prepared"] == report.prepared
        for sample in samples:
            path = entry_path(report.folder, sample)
            assert path.exists() == entry_path(alone.folder, sample).exists()
            assert not path.exists() or path.read_bytes() == entry_path(alone.folder, sample).read_bytes()


def test_prepare_shows_progress_lines_when_output_is_not_a_terminal(tmp_path: Path) -> None:
    samples = [make_clip(tmp_path / "data", f"EP0{i}", seed=i) for i in range(3)]
    buffer = io.StringIO()
    console = Console(file=buffer, width=20, force_terminal=False)
    prepare_samples(samples, tmp_path / "cache", "casme2", config=SMALL, console=console)
    lines = [line.rsplit(",", 1)[0] for line in buffer.getvalue().splitlines()]
    assert lines == [f"casme2: prepared {done}/3 clips" for done in range(4)]

    buffer.truncate(0)
    prepare_samples(samples, tmp_path / "cache", "casme2", config=SMALL, console=console)
    assert buffer.getvalue() == ""  # nothing left to do: no progress to show


def test_skipped_summary_names_the_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    good = make_clip(data, "EP01")
    blank = make_clip(data, "EP02", precropped=False, blank=True)
    corrupt = make_clip(data, "EP03", seed=3)
    corrupt.frames[2].write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    missing = make_clip(data, "EP04", seed=4)
    missing.frames[0].unlink()
    short = replace(make_clip(data, "EP05", frames=1), onset=None, offset=None)
    site_skip = Skipped("casme2/sub02/EP09", "no frame folder CASME2_RAW_selected/sub02/EP09")

    report = quiet([good, blank, corrupt, missing, short], tmp_path / "cache", site_skipped=[site_skip])
    assert report.prepared == 1
    reasons = {s.entry: s.reason for s in report.skipped}
    assert f"no face found in {blank.frames[0]}" in reasons[blank.key]
    assert f"unreadable frame {corrupt.frames[2]}" in reasons[corrupt.key]
    assert f"missing frame {missing.frames[0]}" in reasons[missing.key]
    assert "too few frames" in reasons[short.key]
    assert "Traceback" not in json.dumps(reasons)

    saved = json.loads(report_path(report.folder, "casme2").read_text())
    assert {row["entry"] for row in saved["skipped"]} == {blank.key, corrupt.key, missing.key, short.key}
    assert saved["site_skipped"] == [{"entry": site_skip.entry, "reason": site_skip.reason}]

    console = Console(record=True, width=400, file=io.StringIO())
    render_report(report, console)
    text = console.export_text()
    assert str(corrupt.frames[2]) in text and site_skip.reason in text and "4 skipped" in text


def test_bad_settings_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--workers 0"):
        prepare_samples([], tmp_path, "casme2", workers=0, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="cannot create the cache folder"):
        prepare_samples([], blocker, "casme2", progress=False)
