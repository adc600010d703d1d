"""CASME II reader.

Facts from ``/work/shared/reference/datasets.md`` ("CASME II"): 200 fps; frames
``CASME2_RAW_selected/sub01/EP02_01f/img46.jpg`` or, in the cropped release,
``Cropped/sub01/EP02_01f/reg_img46.jpg``; some copies drop the ``sub`` prefix;
the sheet ``CASME2-coding-YYYYMMDD.xlsx`` has its header on the first row, in a
2014 layout and a 2019 layout that adds ``Objective Classes``, with blank
header columns between; Subject may load as the int 1; some apex cells are
missing or ``/``.

Choices: when several coding sheets are present the newest (by the date in
its name) is read; when a clip exists both raw and cropped, the raw frames are
used (``precropped=False``); a sample's frames are the whole clip folder.
"""

from __future__ import annotations

from pathlib import Path

from ..records import SiteIndex
from ..sheets import SheetRow, SheetTable, child_dir, find_dirs, find_files, read_table
from .base import Adapter, SiteBuilder, list_frames, numbered_dirs, place_clip, require_sheet, row_facts

SHEET_PATTERNS = ("casme2-coding-*.xls*", "casme2_coding*.xls*", "casme2 coding*.xls*")
RAW_PATTERNS = ("casme2_raw*", "casme2-raw*")
CROPPED_PATTERNS = ("cropped", "casme2_cropped*", "casme2-cropped*")
SUBJECT_DIR = r"(sub)?\d+"

Sources = list[tuple[dict[int, Path], bool]]
"""Subject folders (by number) of each frame release, with whether that release is pre-cropped."""

COLUMNS = {
    "subject": ("Subject",),
    "filename": ("Filename", "File name"),
    "onset": ("OnsetFrame", "Onset"),
    "apex": ("ApexFrame", "Apex"),
    "offset": ("OffsetFrame", "Offset"),
    "action_units": ("Action Units", "Action Unit", "AU", "AUs"),
    "emotion": ("Estimated Emotion", "Emotion"),
}


def read(root: Path) -> SiteIndex:
    """Read the coding sheet under ``root`` and pair each row with its frame folder."""
    sheet = require_sheet(ADAPTER, root, SHEET_PATTERNS, "CASME2-coding-YYYYMMDD.xlsx")
    table = read_table(sheet, COLUMNS, what="CASME II coding sheet")
    sources = frame_sources(root)
    builder = SiteBuilder(ADAPTER, root)
    for row in table.rows:
        read_row(builder, table, row, sources)
    return builder.finish()


def frame_sources(root: Path) -> Sources:
    """Subject folders of the raw release, then of the cropped one, each with its ``precropped`` flag."""
    sources = []
    for patterns, precropped in ((RAW_PATTERNS, False), (CROPPED_PATTERNS, True)):
        for folder in find_dirs(root, patterns, max_depth=2):
            subjects = numbered_dirs(folder, SUBJECT_DIR)
            if subjects:
                sources.append((subjects, precropped))
    return sources


def read_row(builder: SiteBuilder, table: SheetTable, row: SheetRow, sources: Sources) -> None:
    """Turn one sheet row into a sample, or a skipped entry when its frames are missing or do not fit."""
    facts = row_facts(builder, table, row)
    if facts is None:
        return
    frames, precropped, problem = locate_clip(sources, facts.subject, facts.filename)
    place_clip(
        builder, facts, f"sub{facts.subject:02d}", facts.filename, frames, precropped=precropped, problem=problem
    )


def locate_clip(sources: Sources, number: int, clip_id: str) -> tuple[list[tuple[int, Path]], bool, str | None]:
    """Frames of a clip from the first release that has them (raw before cropped), or why none was found."""
    empty: Path | None = None
    for subjects, precropped in sources:
        subject_dir = subjects.get(number)
        clip_dir = child_dir(subject_dir, clip_id) if subject_dir else None
        if clip_dir is None:
            continue
        frames = list_frames(clip_dir)
        if frames:
            return frames, precropped, None
        empty = empty or clip_dir
    if empty is not None:
        return [], False, f"the frame folder {empty} holds no frames"
    return [], False, f"no frame folder sub{number:02d}/{clip_id} under CASME2_RAW_selected/ or Cropped/"


def sniff(root: Path) -> str | None:
    """Evidence that ``root`` is a CASME II tree: its coding sheet or its raw frame folder."""
    sheets = find_files(root, SHEET_PATTERNS, max_depth=2)
    if sheets:
        return f"it holds {sheets[0].name}"
    raw = find_dirs(root, RAW_PATTERNS, max_depth=1)
    return f"it holds {raw[0].name}/" if raw else None


ADAPTER = Adapter(
    name="casme2",
    title="CASME II",
    fps=200.0,
    emotions=("disgust", "fear", "happiness", "others", "repression", "sadness", "surprise"),
    layout="CASME2-coding-YYYYMMDD.xlsx beside CASME2_RAW_selected/sub01/EP02_01f/img46.jpg "
    "or Cropped/sub01/EP02_01f/reg_img46.jpg",
    read=read,
    sniff=sniff,
)
