"""Sample records: what an adapter reads from a database's native layout.

A record points at frames on disk and carries the annotation; it never holds
pixels, so a whole site can be indexed without decoding an image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError


@dataclass(frozen=True)
class ActionUnit:
    """One coded FACS action unit; ``side`` is ``"L"``, ``"R"`` or None (bilateral)."""

    number: int
    side: str | None = None
    code: str = ""


@dataclass(frozen=True)
class Sample:
    """One micro-expression clip as the database annotates it.

    ``onset``/``apex``/``offset`` are frame numbers as written in the sheet
    (the numbers in the frame file names), None where not annotated.
    """

    database: str
    subject: str
    clip_id: str
    frames: tuple[Path, ...]
    frame_numbers: tuple[int, ...]
    fps: float
    emotion: str
    onset: int | None = None
    apex: int | None = None
    offset: int | None = None
    action_units: tuple[ActionUnit, ...] = ()
    other_codes: tuple[str, ...] = ()
    source: str = ""
    precropped: bool = False

    @property
    def key(self) -> str:
        """Identifier unique across all sites: ``database/subject/clip_id``."""
        return f"{self.database}/{self.subject}/{self.clip_id}"

    @property
    def has_action_units(self) -> bool:
        """Whether the database codes AUs at all (SMIC-HS, -VIS and -NIR do not)."""
        return not self.database.startswith("smic")


@dataclass(frozen=True)
class Skipped:
    """An entry left out of a site, with the reason a person can act on."""

    entry: str
    reason: str


@dataclass
class SiteIndex:
    """Everything one adapter found under one root."""

    database: str
    root: Path
    samples: list[Sample] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def subject_number(subject: object) -> int:
    """The number inside a subject id, so ``sub01``, ``1``, ``"01"``, ``s1`` and ``spNO.1`` compare equal."""
    digits = re.findall(r"\d+", str(subject))
    if not digits:
        raise DataError(f"subject id {subject!r} holds no number; subject ids look like sub01, 006, s1 or spNO.1")
    return int(digits[-1])
