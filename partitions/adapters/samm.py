"""SAMM reader.

Facts from ``/work/shared/reference/datasets.md`` ("SAMM"): 200 fps; frames
``006/006_1_2/006_05562.jpg`` directly under the root or under ``SAMM/``; sheet
``SAMM_Micro_FACS_Codes_v2.xlsx``, sheet ``MICRO_ONLY``, with about 13 rows of
notes above the header (another release has the header on the first row);
Subject may load as the int 6 while the folder is ``006``; Duration is a
formula (not read: it follows from onset and offset); emotions are capitalised.

Choices: the header row is found by its column names, so both releases read
the same; when the workbook has no ``MICRO_ONLY`` sheet, the first sheet with
the expected header is used; a sample's frames are the whole clip folder.
"""

from __future__ import annotations

from pathlib import Path

from ..records import SiteIndex
from ..sheets import SheetRow, SheetTable, child_dir, find_files, read_table, subdirs
from .base import Adapter, SiteBuilder, list_frames, numbered_dirs, place_clip, require_sheet, row_facts

SHEET_PATTERNS = ("samm_micro_facs_codes*.xls*", "samm*facs*codes*.xls*")
SUBJECT_DIR = r"\d{2,3}"

COLUMNS = {
    "subject": ("Subject",),
    "filename": ("Filename", "File name"),
    "onset": ("Onset Frame", "Onset"),
    "apex": ("Apex Frame", "Apex"),
    "offset": ("Offset Frame", "Offset"),
    "action_units": ("Action Units", "Action Unit", "AU", "AUs"),
    "emotion": ("Estimated Emotion", "Emotion"),
}


def read(root: Path) -> SiteIndex:
    """Read ``MICRO_ONLY`` and pair each row with ``<subject>/<filename>/`` under the frames folder."""
    sheet = require_sheet(ADAPTER, root, SHEET_PATTERNS, "SAMM_Micro_FACS_Codes_v2.xlsx")
    table = read_table(sheet, COLUMNS, prefer_sheet="MICRO_ONLY", what="SAMM FACS code sheet")
    subjects = subject_dirs(root, sheet.parent)
    builder = SiteBuilder(ADAPTER, root)
    for row in table.rows:
        read_row(builder, table, row, subjects)
    return builder.finish()


def subject_dirs(root: Path, sheet_dir: Path | None = None) -> dict[int, Path]:
    """Subject folders (``006``) directly under ``root`` or the sheet's folder, or under their ``SAMM*/`` folder."""
    found: dict[int, Path] = {}
    bases = dict.fromkeys([root, sheet_dir or root])
    for parent in [*bases, *(d for base in bases for d in subdirs(base) if d.name.lower().startswith("samm"))]:
        for number, folder in numbered_dirs(parent, SUBJECT_DIR).items():
            found.setdefault(number, folder)
    return found


def read_row(builder: SiteBuilder, table: SheetTable, row: SheetRow, subjects: dict[int, Path]) -> None:
    """Turn one sheet row into a sample, or a skipped entry when its frames are missing or do not fit."""
    facts = row_facts(builder, table, row)
    if facts is None:
        return
    subject = f"{facts.subject:03d}"
    subject_dir = subjects.get(facts.subject)
    clip_dir = child_dir(subject_dir, facts.filename) if subject_dir else None
    frames = list_frames(clip_dir) if clip_dir else []
    problem = None
    if clip_dir is None:
        problem = f"no frame folder {subject}/{facts.filename} under the root or its SAMM/ folder"
    elif not frames:
        problem = f"the frame folder {clip_dir} holds no frames"
    place_clip(builder, facts, subject, facts.filename, frames, problem=problem)


def sniff(root: Path) -> str | None:
    """Evidence that ``root`` is a SAMM tree: its code sheet, or subject folders holding ``006_1_2``-style clips."""
    sheets = find_files(root, SHEET_PATTERNS, max_depth=2)
    if sheets:
        return f"it holds {sheets[0].name}"
    for number, folder in sorted(subject_dirs(root).items()):
        if any(clip.name.startswith(f"{folder.name}_") for clip in subdirs(folder)):
            return f"it holds subject folder {folder.relative_to(root)}/ with {folder.name}_* clips (subject {number})"
    return None


ADAPTER = Adapter(
    name="samm",
    title="SAMM",
    fps=200.0,
    emotions=("anger", "contempt", "disgust", "fear", "happiness", "other", "sadness", "surprise"),
    layout="SAMM_Micro_FACS_Codes_v2.xlsx beside 006/006_1_2/006_05562.jpg, directly or under SAMM/",
    read=read,
    sniff=sniff,
)
