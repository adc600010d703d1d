"""CAS(ME)^3 Part A reader.

Facts from ``/work/shared/reference/datasets.md`` ("CAS(ME)^3 Part A"): 30 fps;
sheet ``cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx``, sheet ``label``, columns
``Subject | Filename | Onset | Apex | Offset | AU | Objective class | emotion``;
Filename is a task letter and one task holds several MEs, so (Subject,
Filename, Onset) is the key; emotions are lowercase but a few say ``Others``;
some frame indices are text; frames are ``spNO.1/a/color/355.jpg`` (the whole
task recording) or per clip ``.../spNO.1_a_355/355.jpg``; folder case may
differ from the sheet (``spNo`` vs ``spNO``).

Choices: the clip id is ``<task>_<onset>`` (``a_355``) and the subject
``spNO.<n>``; a sample's frames are the onset..offset interval (inclusive) in
both layouts, because a task recording is minutes long and holds several MEs;
onset, apex and offset keep the sheet's frame numbers; a per-clip folder is
used before the task recording when both exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..records import SiteIndex
from ..sheets import SheetRow, SheetTable, child_dir, find_files, read_table, subdirs
from .base import Adapter, SiteBuilder, entry_name, list_frames, place_clip, require_sheet, row_facts

SHEET_PATTERNS = ("cas(me)*3*label*.xls*", "casme*3*label*.xls*")
SUBJECT_DIR = re.compile(r"sp\s*no\.?\s*(\d+)", re.IGNORECASE)
CLIP_DIR = re.compile(r"sp\s*no\.?\s*(\d+)_([a-z]+)_(\d+)", re.IGNORECASE)
MAX_DEPTH = 4
"""How deep below the root subject folders may sit (``part_A/data/spNO.1``)."""

COLUMNS = {
    "subject": ("Subject",),
    "filename": ("Filename", "File name", "Task"),
    "onset": ("Onset", "Onset Frame"),
    "apex": ("Apex", "Apex Frame"),
    "offset": ("Offset", "Offset Frame"),
    "action_units": ("AU", "AUs", "Action Units"),
    "emotion": ("emotion", "Estimated Emotion"),
}


@dataclass
class FrameFolders:
    """Where the frames are: subject folders by number and per-clip folders by (subject, task, onset)."""

    subjects: dict[int, Path] = field(default_factory=dict)
    clips: dict[tuple[int, str, int], Path] = field(default_factory=dict)
    _tasks: dict[tuple[int, str], list[tuple[int, Path]]] = field(default_factory=dict)

    def task_frames(self, subject: int, task: str) -> tuple[list[tuple[int, Path]], Path | None]:
        """Frames of a whole task recording (``spNO.1/a/color/``), listed once per task; and the folder."""
        subject_dir = self.subjects.get(subject)
        task_dir = child_dir(subject_dir, task) if subject_dir else None
        if task_dir is None:
            return [], None
        folder = child_dir(task_dir, "color") or task_dir
        if (subject, task) not in self._tasks:
            self._tasks[subject, task] = list_frames(folder)
        return self._tasks[subject, task], folder


def find_frame_folders(root: Path) -> FrameFolders:
    """Subject and per-clip folders up to :data:`MAX_DEPTH` below ``root``, without entering frame folders."""
    found = FrameFolders()

    def visit(folder: Path, depth: int) -> None:
        for sub in subdirs(folder):
            if clip := CLIP_DIR.fullmatch(sub.name):
                found.clips.setdefault((int(clip[1]), clip[2].lower(), int(clip[3])), sub)
            elif subject := SUBJECT_DIR.fullmatch(sub.name):
                found.subjects.setdefault(int(subject[1]), sub)
                visit_clips(sub)
            elif depth < MAX_DEPTH:
                visit(sub, depth + 1)

    def visit_clips(subject_dir: Path) -> None:
        for sub in subdirs(subject_dir):
            if clip := CLIP_DIR.fullmatch(sub.name):
                found.clips.setdefault((int(clip[1]), clip[2].lower(), int(clip[3])), sub)

    visit(root, 1)
    return found


def read(root: Path) -> SiteIndex:
    """Read the ``label`` sheet and cut each ME's onset..offset frames out of its folder."""
    sheet = require_sheet(ADAPTER, root, SHEET_PATTERNS, "cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx")
    table = read_table(sheet, COLUMNS, prefer_sheet="label", what="CAS(ME)^3 Part A label sheet")
    folders = find_frame_folders(root)
    builder = SiteBuilder(ADAPTER, root)
    for row in table.rows:
        read_row(builder, table, row, folders)
    return builder.finish()


def read_row(builder: SiteBuilder, table: SheetTable, row: SheetRow, folders: FrameFolders) -> None:
    """Turn one sheet row into a sample, or a skipped entry when its frames are missing or do not fit."""
    facts = row_facts(builder, table, row)
    if facts is None:
        return
    subject, task, onset = f"spNO.{facts.subject}", facts.filename.lower(), facts.marks["onset"]
    if onset is None:
        builder.skip(
            entry_name(subject, task, facts.source),
            f"the {table.columns['onset']!r} cell is empty, and the onset names the clip",
        )
        return
    clip_id = f"{task}_{onset}"
    clip_dir = folders.clips.get((facts.subject, task, onset))
    if clip_dir is not None:
        frames, folder = list_frames(clip_dir), clip_dir
    else:
        frames, folder = folders.task_frames(facts.subject, task)
    problem = None
    if folder is None:
        problem = f"no frame folder {subject}/{task}/color/ or {subject}_{task}_{onset}/ under the root"
    elif not frames:
        problem = f"the frame folder {folder} holds no frames"
    place_clip(builder, facts, subject, clip_id, frames, problem=problem, interval_only=True)


def sniff(root: Path) -> str | None:
    """Evidence that ``root`` is a CAS(ME)^3 tree: its label sheet or ``spNO.<n>`` subject folders."""
    sheets = find_files(root, SHEET_PATTERNS, max_depth=2)
    if sheets:
        return f"it holds {sheets[0].name}"
    near = subdirs(root) + [grandchild for child in subdirs(root) for grandchild in subdirs(child)]
    for path in near:
        if SUBJECT_DIR.fullmatch(path.name) or CLIP_DIR.fullmatch(path.name):
            return f"it holds {path.relative_to(root)}/"
    return None


ADAPTER = Adapter(
    name="casme3",
    title="CAS(ME)^3 Part A",
    fps=30.0,
    emotions=("anger", "disgust", "fear", "happy", "others", "sad", "surprise"),
    layout="cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx beside spNO.1/a/color/355.jpg or spNO.1_a_355/355.jpg",
    read=read,
    sniff=sniff,
)
