"""Where each database keeps its frames and how its sheet looks (``shared/reference/datasets.md``).

A layout names subjects, clips and frames the way the distributed database
does, and writes the annotation sheet with the quirks the readers must
survive: blank header columns and integer subjects (CASME II), notes above the
header and a formula column (SAMM), labels as folder names (SMIC), several MEs
per task, text frame indices and stray capitals (CAS(ME)^3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from openpyxl import Workbook

from .databases import AUCombo
from .workbook import save_reproducibly

OBJECTIVE_CLASS = {
    "happiness": "I",
    "happy": "I",
    "positive": "I",
    "surprise": "II",
    "anger": "III",
    "contempt": "IV",
    "disgust": "V",
    "fear": "VI",
    "sadness": "VI",
    "sad": "VI",
    "negative": "III",
}


def au_string(action_units: AUCombo) -> str | int:
    """``4+L10`` style code as coders write it; a lone bilateral AU is stored as a number, as in the real sheets."""
    if len(action_units) == 1 and action_units[0][1] is None:
        return action_units[0][0]
    return "+".join(f"{side or ''}{number}" for number, side in action_units)


@dataclass(frozen=True)
class ClipRecord:
    """What a layout needs to place one clip and annotate it."""

    subject: int  # 0-based subject index within the site
    clip: int  # 0-based clip index within the subject
    emotion: str
    action_units: AUCombo
    first: int
    onset: int
    apex: int
    offset: int
    last: int
    quirk: float  # a uniform draw the layout may use for sheet quirks (text cells, capitals)


class Layout:
    """Base class: a database's folder tree and sheet."""

    name: str
    extension: str

    def first_frame(self, rng: np.random.Generator, clip: int) -> int:
        """Number of the clip's first frame file."""
        raise NotImplementedError

    def clip_dir(self, root: Path, record: ClipRecord) -> Path:
        raise NotImplementedError

    def frame_name(self, record: ClipRecord, number: int) -> str:
        raise NotImplementedError

    def ground_truth_onset(self, record: ClipRecord) -> int | None:
        """Onset that names the ground-truth file when a folder holds several MEs, else None."""
        return None

    def write_sheet(self, root: Path, records: list[ClipRecord]) -> None:
        """Write the annotation sheet (nothing for databases labelled by folder names)."""


def subject_name(layout_name: str, subject: int) -> str:
    """Folder name of a subject in each database's convention."""
    return {
        "casme2": f"sub{subject + 1:02d}",
        "samm": f"{subject + 6:03d}",
        "smic": f"s{subject + 1}",
        "casme3": f"spNO.{subject + 1}",
    }[layout_name]


class Casme2Layout(Layout):
    """``CASME2_RAW_selected/sub01/EP02_01f/img46.jpg`` and ``CASME2-coding-20190701.xlsx``."""

    name, extension = "casme2", ".jpg"
    header = (
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
    )

    def first_frame(self, rng: np.random.Generator, clip: int) -> int:
        return int(rng.integers(1, 200))

    def filename(self, record: ClipRecord) -> str:
        return f"EP{(record.clip * 7) % 19 + 1:02d}_{record.clip + 1:02d}{'f' if record.clip % 2 else ''}"

    def clip_dir(self, root: Path, record: ClipRecord) -> Path:
        return root / "CASME2_RAW_selected" / subject_name(self.name, record.subject) / self.filename(record)

    def frame_name(self, record: ClipRecord, number: int) -> str:
        return f"img{number}.jpg"

    def write_sheet(self, root: Path, records: list[ClipRecord]) -> None:
        workbook = Workbook()
        sheet = workbook.active
        sheet.title = "Sheet1"
        sheet.append(self.header)
        for r in records:
            sheet.append(
                (
                    r.subject + 1,
                    self.filename(r),
                    None,
                    r.onset,
                    r.apex,
                    r.offset,
                    None,
                    au_string(r.action_units),
                    r.emotion,
                    OBJECTIVE_CLASS.get(r.emotion, "VII"),
                )
            )
        save_reproducibly(workbook, root / "CASME2-coding-20190701.xlsx")


class SammLayout(Layout):
    """``SAMM/006/006_1_2/006_05562.jpg`` and ``SAMM_Micro_FACS_Codes_v2.xlsx`` (sheet MICRO_ONLY)."""

    name, extension = "samm", ".jpg"
    notes = (
        "SAMM: Spontaneous Actions and Micro-Movements (synthetic stand-in written by fedmer)",
        "Micro-movements coded with FACS by three coders.",
        "Onset/Apex/Offset are frame numbers of the image files.",
        "Duration is Offset Frame - Onset Frame.",
        "Inducement Code refers to the stimulus video.",
        "Action Units: L/R mark the side of a unilateral AU.",
        "Estimated Emotion is the coders' judgement.",
        "Objective Classes follow Davison et al. (2018).",
        "A1/T codes mark head and eye movements.",
        "Subjects are numbered 006 onwards.",
        "Frames are 8-bit greyscale JPEG at 200 fps.",
        "",
        "Notes end here.",
    )
    header = (
        "Subject",
        "Filename",
        "Inducement Code",
        "Onset Frame",
        "Apex Frame",
        "Offset Frame",
        "Duration",
        "Micro",
        "Action Units",
        "Estimated Emotion",
        "Objective Classes",
        "Notes",
    )

    def first_frame(self, rng: np.random.Generator, clip: int) -> int:
        return int(rng.integers(1000, 9000))

    def filename(self, record: ClipRecord) -> str:
        subject = subject_name(self.name, record.subject)
        return f"{subject}_{record.clip % 7 + 1}_{record.clip // 7 + 1}"

    def clip_dir(self, root: Path, record: ClipRecord) -> Path:
        return root / "SAMM" / subject_name(self.name, record.subject) / self.filename(record)

    def frame_name(self, record: ClipRecord, number: int) -> str:
        return f"{subject_name(self.name, record.subject)}_{number:05d}.jpg"

    def write_sheet(self, root: Path, records: list[ClipRecord]) -> None:
        workbook = Workbook()
        sheet = workbook.active
        sheet.title = "MICRO_ONLY"
        for note in self.notes:
            sheet.append((note,))
        sheet.append(self.header)
        for r in records:
            row = sheet.max_row + 1
            sheet.append(
                (
                    r.subject + 6,
                    self.filename(r),
                    r.clip % 7 + 1,
                    r.onset,
                    r.apex,
                    r.offset,
                    f"=F{row}-D{row}",
                    "Micro",
                    au_string(r.action_units),
                    r.emotion,
                    OBJECTIVE_CLASS.get(r.emotion.lower(), "VII"),
                    None,
                )
            )
        save_reproducibly(workbook, root / "SAMM_Micro_FACS_Codes_v2.xlsx")


class SmicLayout(Layout):
    """``HS/s1/micro/negative/s1_ne_01/image000123.bmp``: labels are folder names, no sheet."""

    name, extension = "smic", ".bmp"
    abbreviation: ClassVar[dict[str, str]] = {"negative": "ne", "positive": "po", "surprise": "sur"}

    def first_frame(self, rng: np.random.Generator, clip: int) -> int:
        return int(rng.integers(1, 5000))

    def clip_dir(self, root: Path, record: ClipRecord) -> Path:
        subject = subject_name(self.name, record.subject)
        clip = f"{subject}_{self.abbreviation[record.emotion]}_{record.clip + 1:02d}"
        return root / "HS" / subject / "micro" / record.emotion / clip

    def frame_name(self, record: ClipRecord, number: int) -> str:
        return f"image{number:06d}.bmp"


class Casme3Layout(Layout):
    """``spNO.1/a/color/355.jpg`` with two MEs per task, and the Part A label sheet."""

    name, extension = "casme3", ".jpg"
    header = ("Subject", "Filename", "Onset", "Apex", "Offset", "AU", "Objective class", "emotion")
    per_task = 2

    def first_frame(self, rng: np.random.Generator, clip: int) -> int:
        # MEs of one task share a folder: the second starts well after the first can end.
        return int(rng.integers(100, 300)) + (clip % self.per_task) * 400

    def task(self, record: ClipRecord) -> str:
        return "abcdefghijklm"[(record.clip // self.per_task) % 13]

    def clip_dir(self, root: Path, record: ClipRecord) -> Path:
        return root / subject_name(self.name, record.subject) / self.task(record) / "color"

    def frame_name(self, record: ClipRecord, number: int) -> str:
        return f"{number}.jpg"

    def ground_truth_onset(self, record: ClipRecord) -> int | None:
        return record.onset

    def write_sheet(self, root: Path, records: list[ClipRecord]) -> None:
        workbook = Workbook()
        sheet = workbook.active
        sheet.title = "label"
        sheet.append(self.header)
        for r in records:
            as_text = r.quirk < 0.1  # some frame indices are stored as text in the real sheet
            frames = [str(v) if as_text else v for v in (r.onset, r.apex, r.offset)]
            emotion = "Others" if r.emotion == "others" and r.quirk > 0.8 else r.emotion
            sheet.append(
                (
                    subject_name(self.name, r.subject),
                    self.task(r),
                    *frames,
                    au_string(r.action_units),
                    OBJECTIVE_CLASS.get(r.emotion, "VII"),
                    emotion,
                )
            )
        save_reproducibly(workbook, root / "cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx")


LAYOUTS: dict[str, Layout] = {
    layout.name: layout for layout in (Casme2Layout(), SammLayout(), SmicLayout(), Casme3Layout())
}
