"""What every database adapter shares: the adapter record, frame listing and the checks on a sheet row.

Facts from ``/work/shared/reference/datasets.md``: frame numbers are the digits
in the frame file name (``img46.jpg``, ``006_05562.jpg``, ``reg_00001.bmp``,
``355.jpg``) and must be ordered as numbers, not as text; emotions are compared
lowercased and stripped because some copies capitalise them (SAMM, a few
CAS(ME)^3 rows).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..action_units import parse_action_units
from ..errors import DataError
from ..records import Sample, SiteIndex, Skipped, subject_number
from ..sheets import SheetRow, SheetTable, cell_int, find_files, pick_latest, subdirs, tree_summary

FRAME_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
"""Image files that count as frames; anything else in a clip folder is ignored."""


@dataclass(frozen=True)
class Adapter:
    """One database reader: ``read`` turns a root into a :class:`SiteIndex`, ``sniff`` recognises a tree.

    ``sniff`` returns a short piece of evidence (``"it holds CASME2-coding-20190701.xlsx"``)
    when ``root`` looks like this database, so a wrong ``--dataset`` can be named.
    """

    name: str
    title: str
    fps: float
    emotions: tuple[str, ...]
    layout: str
    read: Callable[[Path], SiteIndex] = field(repr=False)
    sniff: Callable[[Path], str | None] = field(repr=False)


def frame_number(path: Path) -> int | None:
    """The last run of digits in a frame's file name, or None when it has none."""
    digits = re.findall(r"\d+", path.stem)
    return int(digits[-1]) if digits else None


def list_frames(folder: Path) -> list[tuple[int, Path]]:
    """``(number, path)`` of the image files in a folder, ordered by number (``img9`` before ``img10``).

    Never opens an image. A second file with the same number (``img46.jpg`` and
    ``img46.png``) is ignored so every frame number appears once.
    """
    if not folder.is_dir():
        return []
    numbered: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        number = frame_number(path) if path.suffix.lower() in FRAME_SUFFIXES and path.is_file() else None
        if number is not None and number not in numbered:
            numbered[number] = path
    return sorted(numbered.items())


def interval_problem(numbers: Sequence[int], onset: int | None, apex: int | None, offset: int | None) -> str | None:
    """Why annotated onset/apex/offset do not fit the frames on disk, or None when they do."""
    if not numbers:
        return "the clip folder holds no frames"
    first, last = numbers[0], numbers[-1]
    for name, value in (("onset", onset), ("apex", apex), ("offset", offset)):
        if value is not None and not first <= value <= last:
            return f"{name} frame {value} lies outside the frames on disk ({first}..{last})"
    if onset is not None and offset is not None and onset > offset:
        return f"onset frame {onset} comes after offset frame {offset}"
    return None


def check_emotion(raw: str, adapter: Adapter, where: str) -> str:
    """The emotion lowercased and stripped; an unknown one is a DataError naming the cell and the vocabulary."""
    emotion = raw.strip().lower()
    if emotion not in adapter.emotions:
        raise DataError(
            f"{where}: unknown emotion {raw!r}; {adapter.title} emotions are {', '.join(adapter.emotions)}. "
            f"Correct its spelling, or check that --dataset {adapter.name} is the right database."
        )
    return emotion


def row_subject(table: SheetTable, row: SheetRow) -> int:
    """The subject number of a sheet row (``1``, ``sub01``, ``006``, ``spNO.1``); DataError naming the cell."""
    try:
        return subject_number(row.text("subject"))
    except DataError:
        raise DataError(
            f"{table.where(row, 'subject')}: subject {row.text('subject')!r} holds no number. "
            f"Write the subject id as the database does (e.g. sub01, 006, spNO.1) or delete the row."
        ) from None


def row_frames(table: SheetTable, row: SheetRow) -> dict[str, int | None] | str:
    """Onset/apex/offset cells of a row as ints (None where blank); a reason string when one is not a number.

    An apex that is missing or text such as ``/`` is None, per datasets.md;
    an onset or offset that is not a number is reported so the row can be
    skipped with the cell named.
    """
    values: dict[str, int | None] = {}
    for key in ("onset", "apex", "offset"):
        try:
            values[key] = cell_int(row.cells.get(key))
        except ValueError as error:
            if key != "apex":
                return f"column {table.columns.get(key, key)!r}: {error}"
            values[key] = None
    return values


@dataclass(frozen=True)
class RowFacts:
    """What a sheet row annotates, checked, before its frames are looked up."""

    subject: int
    filename: str
    emotion: str
    marks: dict[str, int | None]
    action_units: object
    source: str


def row_facts(builder: SiteBuilder, table: SheetTable, row: SheetRow) -> RowFacts | None:
    """Check one sheet row; None (and a skipped entry) when it lacks a filename, an emotion or frame numbers.

    A row with neither a subject number nor a filename is a note under the
    table and is passed over. Unknown emotions and subjects without a number
    raise, because they mean the sheet is not what the adapter expects rather
    than that one clip is missing.
    """
    if not row.text("filename") and not re.search(r"\d", row.text("subject")):
        return None
    builder.entries += 1
    number = row_subject(table, row)
    source = f"{table.path.name} row {row.number}"
    entry = entry_name(row.text("subject"), row.text("filename"), source)
    if not row.text("filename"):
        builder.skip(entry, f"the {table.columns['filename']!r} cell is empty")
        return None
    if not row.text("emotion"):
        builder.skip(entry, f"the {table.columns['emotion']!r} cell is empty")
        return None
    emotion = check_emotion(row.text("emotion"), builder.adapter, table.where(row, "emotion"))
    marks = row_frames(table, row)
    if isinstance(marks, str):
        builder.skip(entry, marks)
        return None
    return RowFacts(number, row.text("filename"), emotion, marks, row.cells.get("action_units"), source)


@dataclass
class SiteBuilder:
    """Collects samples and skipped entries for one root, refusing duplicate keys."""

    adapter: Adapter
    root: Path
    entries: int = 0
    site: SiteIndex = field(init=False)
    _seen: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.site = SiteIndex(self.adapter.name, self.root)

    def skip(self, entry: str, reason: str) -> None:
        """Leave one entry out, with a reason a person can act on."""
        self.site.skipped.append(Skipped(entry, reason))

    def add(self, sample: Sample) -> None:
        """Keep a sample unless its key was already read from an earlier row."""
        if sample.key in self._seen:
            self.skip(
                entry_name(sample.subject, sample.clip_id, sample.source), f"duplicate of {self._seen[sample.key]}"
            )
            return
        self._seen[sample.key] = sample.source
        self.site.samples.append(sample)

    def finish(self) -> SiteIndex:
        """The site index; a site with no readable sample is a DataError that says where frames were expected."""
        if not self.site.samples:
            if self.entries == 0:
                raise DataError(
                    f"{self.root}: the {self.adapter.title} site is empty (no annotated clip found). "
                    f"Expected layout: {self.adapter.layout}."
                )
            first = self.site.skipped[0]
            raise DataError(
                f"{self.root}: none of the {self.entries} {self.adapter.title} entries could be read; the first, "
                f"{first.entry}, was skipped because {first.reason}. Point --root at the database's top folder "
                f"({self.adapter.layout}); {tree_summary(self.root)}."
            )
        return self.site


def entry_name(subject: str, clip_id: str, source: str) -> str:
    """How a skipped entry is named: ``sub01/EP02_01f (CASME2-coding-20190701.xlsx row 5)``."""
    return f"{subject}/{clip_id} ({source})" if source else f"{subject}/{clip_id}"


def make_sample(
    adapter: Adapter,
    subject: str,
    clip_id: str,
    frames: Sequence[tuple[int, Path]],
    emotion: str,
    *,
    onset: int | None = None,
    apex: int | None = None,
    offset: int | None = None,
    action_units: object = None,
    source: str = "",
    precropped: bool = False,
) -> Sample:
    """A :class:`Sample` with frames split into paths and numbers and the AU cell parsed."""
    units, other = parse_action_units(action_units)
    return Sample(
        database=adapter.name,
        subject=subject,
        clip_id=clip_id,
        frames=tuple(path for _number, path in frames),
        frame_numbers=tuple(number for number, _path in frames),
        fps=adapter.fps,
        emotion=emotion,
        onset=onset,
        apex=apex,
        offset=offset,
        action_units=units,
        other_codes=other,
        source=source,
        precropped=precropped,
    )


def require_sheet(adapter: Adapter, root: Path, patterns: Sequence[str], example: str) -> Path:
    """The adapter's annotation sheet under ``root`` (newest by name when several); DataError when none."""
    found = find_files(root, patterns, max_depth=2)
    if not found:
        raise DataError(
            f"{root}: no {adapter.title} annotation sheet ({example}) in this folder or the two levels below; "
            f"{tree_summary(root)}. Point --root at the {adapter.title} top folder ({adapter.layout}), "
            f"or copy the sheet into it."
        )
    return pick_latest(found)


def numbered_dirs(parent: Path, pattern: str) -> dict[int, Path]:
    """Sub-folders whose whole name matches ``pattern`` (ignoring case), keyed by their subject number."""
    regex = re.compile(pattern, re.IGNORECASE)
    found: dict[int, Path] = {}
    for folder in subdirs(parent):
        if regex.fullmatch(folder.name):
            found.setdefault(subject_number(folder.name), folder)
    return found


def place_clip(
    builder: SiteBuilder,
    facts: RowFacts,
    subject: str,
    clip_id: str,
    frames: Sequence[tuple[int, Path]],
    *,
    precropped: bool = False,
    problem: str | None = None,
    interval_only: bool = False,
) -> None:
    """Add the row's sample, or skip it when its frames are missing or do not cover onset..offset.

    ``interval_only`` keeps just the frames from onset to offset (inclusive),
    for folders that hold a whole recording rather than one clip.
    """
    onset, offset = facts.marks["onset"], facts.marks["offset"]
    problem = problem or interval_problem([n for n, _ in frames], onset, facts.marks["apex"], offset)
    if problem is None and interval_only:
        if onset is None or offset is None:
            problem = "onset and offset are needed to cut the clip out of the task recording"
        else:
            frames = [(n, p) for n, p in frames if onset <= n <= offset]
    if problem:
        builder.skip(entry_name(subject, clip_id, facts.source), problem)
        return
    sample = make_sample(
        builder.adapter,
        subject,
        clip_id,
        frames,
        facts.emotion,
        **facts.marks,
        action_units=facts.action_units,
        source=facts.source,
        precropped=precropped,
    )
    builder.add(sample)
