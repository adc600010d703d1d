"""Small hand-made database trees with the naming quirks of ``/work/shared/reference/datasets.md``.

Frames are empty files: indexing never decodes an image. Each builder returns
the root to hand to an adapter; the module constants say what a reader should
find there, so later tests can reuse both the trees and the expectations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from openpyxl import Workbook

from partitions.records import Sample

# ----------------------------------------------------------------------------- generic helpers


def touch_frames(folder: Path, names: Iterable[str]) -> list[Path]:
    """Create empty frame files (a frame is never opened while indexing)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / name
        path.write_bytes(b"")
        paths.append(path)
    return paths


def write_workbook(path: Path, sheets: dict[str, Sequence[Sequence[object]]]) -> Path:
    """Write an .xlsx with openpyxl; ``None`` cells stay blank, strings starting with ``=`` become formulas."""
    book = Workbook()
    book.remove(book.active)
    for title, rows in sheets.items():
        sheet = book.create_sheet(title)
        for row in rows:
            sheet.append(list(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    book.save(path)
    return path


def assert_user_message(error: pytest.ExceptionInfo, *fragments: str) -> None:
    """A one-line message naming what is asked, without traceback or exception-repr noise."""
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "Traceback" not in message
    assert "\n" not in message


def write_csv(path: Path, lines: Sequence[str]) -> Path:
    """A small text file, one line per item."""
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- CASME II

CASME2_HEADER_2014 = [
    "Subject", "Filename", None, "OnsetFrame", "ApexFrame", "OffsetFrame", None, "Action Units", "Estimated Emotion",
]  # fmt: skip
CASME2_HEADER_2019 = [*CASME2_HEADER_2014, "Objective Classes"]

# subject cell, filename, onset, apex, offset, AUs, emotion, frames on disk (None: no folder)
CASME2_ROWS: list[tuple[object, str, object, object, object, object, str, range | None]] = [
    (1, "EP02_01f", 8, 10, 12, 12, "happiness", range(8, 13)),  # img8..img12: lexical order would be wrong
    (1, "EP03_02", 100, "/", 104, "4+L10", "disgust", range(98, 107)),  # apex written as '/'
    ("sub02", "EP01_01", 20, 22, 24, "R12", "Others", range(20, 25)),  # capitalised emotion
    (2, "EP05_03", 30, 32, 34, "14", "surprise", None),  # frame folder missing -> skipped
    (3, "EP06_01", 25, 31, 33, "1+2", "repression", range(30, 35)),  # onset outside the frames -> skipped
    (3, "EP07_01", 40, None, 44, "1+2+L4", "repression", range(40, 45)),  # apex missing
    (4, "EP08_01", 50, 52, 54, "AU12", "surprise", range(50, 55)),
    (4, "EP09_01", 60, 61, 62, "L12+R14", "fear", range(60, 63)),  # dropped by casme2-5
]
CASME2_SAMPLES = 6
CASME2_SKIPPED = {"sub02/EP05_03", "sub03/EP06_01"}


def casme2_sheet_rows(layout: str, rows: Sequence[tuple] = CASME2_ROWS) -> list[list[object]]:
    """Sheet rows in the 2014 or 2019 layout (2019 adds Objective Classes), header first."""
    header = CASME2_HEADER_2019 if layout == "2019" else CASME2_HEADER_2014
    out: list[list[object]] = [list(header)]
    for subject, filename, onset, apex, offset, aus, emotion, _frames in rows:
        line = [subject, filename, None, onset, apex, offset, None, aus, emotion]
        out.append([*line, 1] if layout == "2019" else line)
    return out


def build_casme2(
    root: Path,
    layout: str = "2019",
    release: str = "raw",
    sub_prefix: bool = True,
    rows: Sequence[tuple] = CASME2_ROWS,
) -> Path:
    """A CASME II tree: ``CASME2_RAW_selected/sub01/EP02_01f/img8.jpg`` and/or ``Cropped/.../reg_img8.jpg``.

    ``release`` is ``raw``, ``cropped`` or ``both``; ``sub_prefix=False`` names
    subject folders ``01``; the sheet is ``CASME2-coding-20190701.xlsx`` (2019)
    or ``CASME2-coding-20140508.xlsx`` (2014).
    """
    name = "CASME2-coding-20190701.xlsx" if layout == "2019" else "CASME2-coding-20140508.xlsx"
    write_workbook(root / name, {"Sheet1": casme2_sheet_rows(layout, rows)})
    for subject, filename, *_rest, frames in rows:
        if frames is None:
            continue
        number = int(str(subject).removeprefix("sub"))
        folder = f"sub{number:02d}" if sub_prefix else f"{number:02d}"
        if release in {"raw", "both"}:
            touch_frames(root / "CASME2_RAW_selected" / folder / filename, [f"img{n}.jpg" for n in frames])
        if release in {"cropped", "both"}:
            touch_frames(root / "Cropped" / folder / filename, [f"reg_img{n}.jpg" for n in frames])
    return root


# ----------------------------------------------------------------------------- SAMM

SAMM_HEADER = [
    "Subject", "Filename", "Inducement Code", "Onset Frame", "Apex Frame", "Offset Frame", "Duration", "Micro",
    "Action Units", "Estimated Emotion", "Objective Classes", "Notes",
]  # fmt: skip

# subject cell, filename, onset, apex, offset, AUs, emotion, frames on disk (None: no folder)
SAMM_ROWS: list[tuple[object, str, int, int, int, object, str, range | None]] = [
    (6, "006_1_2", 5562, 5564, 5566, "4+7+A1", "Anger", range(5560, 5569)),
    (6, "006_1_3", 1020, 1022, 1024, "R12", "Happiness", range(1020, 1025)),
    (7, "007_3_1", 200, 202, 204, 12, "Other", range(198, 206)),  # AU cell loads as an int
    ("011", "011_2_1", 3000, 3002, 3004, "L14+T", "Contempt", range(3000, 3005)),
    (11, "011_2_4", 4000, 4002, 4004, "9", "Disgust", None),  # frame folder missing -> skipped
    (16, "016_7_1", 700, 702, 704, "1+2", "Surprise", range(700, 705)),
    (16, "016_7_4", 800, 802, 804, "15", "Sadness", range(800, 805)),
]
SAMM_SAMPLES = 6
SAMM_SKIPPED = {"011/011_2_4"}


def samm_sheet_rows(notes_above: bool, rows: Sequence[tuple] = SAMM_ROWS) -> list[list[object]]:
    """The MICRO_ONLY sheet: 13 rows of notes (some blank) above the header, or the header first."""
    out: list[list[object]] = []
    if notes_above:
        out += [["SAMM micro-movement FACS codes"], [None], ["Coded by two FACS coders"]]
        out += [[f"note {i}: see the paper"] if i % 3 else [None] for i in range(10)]
    out.append(list(SAMM_HEADER))
    for subject, filename, onset, apex, offset, aus, emotion, _frames in rows:
        row = len(out) + 1
        out.append([subject, filename, 1, onset, apex, offset, f"=F{row}-D{row}+1", "Micro", aus, emotion, "I", None])
    return out


def build_samm(
    root: Path, notes_above: bool = True, under_samm: bool = True, rows: Sequence[tuple] = SAMM_ROWS
) -> Path:
    """A SAMM tree: ``SAMM/006/006_1_2/006_05562.jpg`` (or without ``SAMM/``) and the FACS code sheet.

    The workbook has a first sheet of notes so the reader must pick ``MICRO_ONLY``.
    """
    write_workbook(
        root / "SAMM_Micro_FACS_Codes_v2.xlsx",
        {
            "README": [["Subject", "is explained here"], ["see MICRO_ONLY"]],
            "MICRO_ONLY": samm_sheet_rows(notes_above, rows),
        },
    )
    frames_root = root / "SAMM" if under_samm else root
    for subject, filename, *_rest, frames in rows:
        if frames is not None:
            folder = frames_root / f"{int(subject):03d}" / filename
            touch_frames(folder, [f"{int(subject):03d}_{n:05d}.jpg" for n in frames])
    return root


# ----------------------------------------------------------------------------- SMIC

# variant, subject folder, emotion, clip, frame names (empty: a folder without frames)
SMIC_CLIPS: list[tuple[str, str, str, str, list[str]]] = [
    ("HS", "s1", "negative", "s1_ne_01", [f"image{n:06d}.bmp" for n in (98, 99, 100, 101)]),
    ("HS", "s1", "positive", "s1_po_01", [f"image{n:06d}.bmp" for n in range(10, 14)]),
    ("HS", "s02", "surprise", "s2_sur_01", [f"reg_image{n:06d}.bmp" for n in range(5, 9)]),  # padded subject
    ("HS", "s02", "negative", "s2_ne_03", [f"reg_image{n:06d}.bmp" for n in range(1, 4)]),
    ("HS", "s3", "positive", "s3_po_02", [f"reg_{n:05d}.bmp" for n in range(1, 12)]),
    ("HS", "s3", "negative", "s3_ne_02", []),  # no frames -> skipped
    ("VIS", "s1", "negative", "s1_ne_01", [f"image{n:06d}.bmp" for n in range(1, 4)]),
    ("VIS", "s2", "positive", "s2_po_01", [f"image{n:06d}.bmp" for n in range(1, 4)]),
    ("NIR", "s1", "negative", "s1_ne_01", [f"image{n:06d}.bmp" for n in range(1, 4)]),
    ("NIR", "s2", "surprise", "s2_sur_01", [f"image{n:06d}.bmp" for n in range(1, 4)]),
]
SMIC_HS = {"samples": 5, "subjects": 3, "classes": {"negative": 2, "positive": 2, "surprise": 1}}


def build_smic(root: Path, clips: Sequence[tuple] = SMIC_CLIPS, variants: Sequence[str] = ("HS", "VIS", "NIR")) -> Path:
    """A SMIC tree ``HS/s1/micro/negative/s1_ne_01/image000098.bmp`` with ``non_micro/`` clips that must be ignored."""
    for variant, subject, emotion, clip, names in clips:
        if variant not in variants:
            continue
        folder = root / variant / subject / "micro" / emotion / clip
        folder.mkdir(parents=True, exist_ok=True)
        touch_frames(folder, names)
        touch_frames(root / variant / subject / "non_micro" / emotion / f"{clip}_nm", ["image000001.bmp"])
    return root


# ----------------------------------------------------------------------------- CAS(ME)^3 Part A

CASME3_HEADER = ["Subject", "Filename", "Onset", "Apex", "Offset", "AU", "Objective class", "emotion"]
CASME3_SHEET = "cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx"

# subject, task, onset, apex, offset (cells as written), AUs, emotion
CASME3_ROWS: list[tuple[str, str, object, object, object, object, str]] = [
    ("spNO.1", "a", 355, 360, 365, "L1+L2", "happy"),  # whole-task layout, folder spelled spNo.1
    ("spNO.1", "a", "370", "372", "375", "4", "Others"),  # text indices, capitalised emotion, same task
    ("spNO.2", "b", 100, 103, 106, 12, "surprise"),  # per-clip layout
    ("spNO.2", "c", 50, 52, 70, "4+7", "anger"),  # offset beyond the task's frames -> skipped
    ("spNO.3", "a", 10, 12, 14, "9", "disgust"),  # no task folder -> skipped
    ("spNO.3", "d", 200, None, 205, "15+17", "sad"),  # apex missing
    ("spNO.1", "b", 20, 22, 24, "R12", "fear"),
]
CASME3_SAMPLES = 5
CASME3_SKIPPED = {"spNO.2/c_50", "spNO.3/a_10"}


def build_casme3(root: Path, rows: Sequence[tuple] = CASME3_ROWS) -> Path:
    """A CAS(ME)^3 Part A tree mixing both frame layouts and folder case that differs from the sheet.

    Whole-task recordings ``part_A/spNo.1/a/color/340.jpg`` (with a ``depth/``
    folder that must be ignored) and a per-clip folder
    ``part_A/clips/spNO.2_b_100/100.jpg``.
    """
    header_sheet = [list(CASME3_HEADER)] + [[s, t, on, ap, off, au, "1", emo] for s, t, on, ap, off, au, emo in rows]
    write_workbook(root / CASME3_SHEET, {"label": header_sheet, "readme": [["notes"]]})
    data = root / "part_A"
    touch_frames(data / "spNo.1" / "a" / "color", [f"{n}.jpg" for n in range(340, 381)])
    touch_frames(data / "spNo.1" / "a" / "depth", [f"{n}.png" for n in range(340, 381)])
    touch_frames(data / "spNo.1" / "B" / "color", [f"{n}.jpg" for n in range(15, 31)])
    touch_frames(data / "clips" / "spNO.2_b_100", [f"{n}.jpg" for n in range(100, 107)])
    touch_frames(data / "spNO.2" / "c" / "color", [f"{n}.jpg" for n in range(40, 61)])
    touch_frames(data / "SPNO.3" / "d" / "color", [f"{n}.jpg" for n in range(195, 211)])
    return root


def fake_samples(sizes: Sequence[int], database: str = "casme2", emotion: str = "happiness") -> list[Sample]:
    """Samples without files: subject ``sub{i+1:02d}`` gets ``sizes[i]`` clips (for split tests)."""
    samples = []
    for number, size in enumerate(sizes, start=1):
        for clip in range(size):
            frames = (Path(f"sub{number:02d}/clip{clip}/img1.jpg"),)
            samples.append(Sample(database, f"sub{number:02d}", f"clip{clip}", frames, (1,), 200.0, emotion))
    return samples
