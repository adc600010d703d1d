"""Label spaces, the MEGC2019 subset list, and :func:`load_site`, the one entry point to a labelled site.

Facts from ``/work/shared/reference/datasets.md`` ("Protocols"): the MEGC2019
composite maps repression, anger, contempt, disgust, fear and sadness to
negative, happiness to positive, surprise to surprise, and drops the rest
(SMIC's folders already are negative/positive/surprise; CAS(ME)^3 writes
``sad`` and ``happy``); CASME II 5 classes drop fear and sadness; SAMM 5
classes drop disgust, fear and sadness. The official sample list is CSV
``db,subject,filename,label`` with 0 negative, 1 positive, 2 surprise, and a
reader must be able to restrict itself to it.

Choices: ``native`` classes are the database's whole emotion vocabulary,
sorted, so class indices do not depend on which emotions a copy happens to
hold; samples outside a subset list are left out silently (they are not
errors), while list rows that match no sample are reported as skipped.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .adapters import ADAPTERS, canonical_database, get_adapter, read_site
from .adapters.base import entry_name
from .errors import DataError
from .records import Sample, Skipped, subject_number

COMPOSITE_CLASSES = ("negative", "positive", "surprise")
"""MEGC2019 composite classes; a subset list's label is an index into this tuple."""

_COMPOSITE = {
    **dict.fromkeys(("repression", "anger", "contempt", "disgust", "fear", "sadness", "sad", "negative"), "negative"),
    **dict.fromkeys(("happiness", "happy", "positive"), "positive"),
    "surprise": "surprise",
}

_SPACES: dict[str, tuple[tuple[str, ...], tuple[str, ...], Mapping[str, str]]] = {
    "composite3": (COMPOSITE_CLASSES, tuple(ADAPTERS), _COMPOSITE),
    "casme2-5": (
        ("happiness", "disgust", "repression", "surprise", "others"),
        ("casme2",),
        {e: e for e in ("happiness", "disgust", "repression", "surprise", "others")},
    ),
    "samm-5": (
        ("anger", "contempt", "happiness", "surprise", "other"),
        ("samm",),
        {e: e for e in ("anger", "contempt", "happiness", "surprise", "other")},
    ),
    "smic-3": (COMPOSITE_CLASSES, ("smic", "smic-vis", "smic-nir"), {e: e for e in COMPOSITE_CLASSES}),
    "casme3-7": (
        ("happy", "disgust", "fear", "anger", "sad", "surprise", "others"),
        ("casme3",),
        {e: e for e in ("happy", "disgust", "fear", "anger", "sad", "surprise", "others")},
    ),
}
"""Space name -> (classes in index order, databases it applies to, raw emotion -> class)."""

LABEL_SPACES: tuple[str, ...] = (*_SPACES, "native")
"""Every ``--labels`` value."""


@dataclass(frozen=True)
class LabelSpace:
    """A set of classes and how one database's raw emotions map into them (unmapped emotions are dropped)."""

    name: str
    classes: tuple[str, ...]
    mapping: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def label_of(self, emotion: str) -> str | None:
        """The class of a raw (lowercased) emotion, or None when this space drops it."""
        return self.mapping.get(emotion)


def spaces_for(database: str) -> tuple[str, ...]:
    """The label spaces that apply to a database (``native`` always does)."""
    return (*(name for name, (_c, databases, _m) in _SPACES.items() if database in databases), "native")


def label_space(name: str, database: str) -> LabelSpace:
    """The label space ``name`` for ``database``; DataError naming the spaces that do apply when it does not."""
    adapter = get_adapter(database)
    if name not in LABEL_SPACES:
        raise DataError(f"unknown --labels {name!r}; use one of {', '.join(LABEL_SPACES)}.")
    if name == "native":
        return LabelSpace("native", tuple(sorted(adapter.emotions)), {e: e for e in adapter.emotions})
    classes, databases, mapping = _SPACES[name]
    if adapter.name not in databases:
        raise DataError(
            f"--labels {name} does not apply to {adapter.title} (--dataset {adapter.name}): it is defined for "
            f"{', '.join(databases)}. Use one of {', '.join(spaces_for(adapter.name))}."
        )
    return LabelSpace(name, classes, mapping)


@dataclass
class LabelledSite:
    """A site's samples with one class index each, plus every entry left out and why."""

    database: str
    root: Path
    space: LabelSpace
    samples: list[Sample] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    subset: Path | None = None

    @property
    def subjects(self) -> list[str]:
        """Distinct subjects, sorted, among the kept samples."""
        return sorted({s.subject for s in self.samples})


# ----------------------------------------------------------------------------- subset list


@dataclass(frozen=True)
class SubsetRow:
    """One row of a sample list: which clip, and its composite label (0 negative, 1 positive, 2 surprise)."""

    database: str | None
    subject: int
    filename: str
    label: int
    line: int
    raw_database: str


def read_subset(path: Path) -> list[SubsetRow]:
    """Parse a ``db,subject,filename,label`` list (header optional); DataError naming the line to fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--subset {path} is not a file; give the CSV sample list (rows db,subject,filename,label).")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        lines = [(n, row) for n, row in enumerate(csv.reader(handle), start=1) if any(c.strip() for c in row)]
    if lines and _is_header(lines[0][1]):
        lines = lines[1:]
    return [_subset_row(path, number, cells) for number, cells in lines]


def _is_header(cells: list[str]) -> bool:
    """A first row that names no known database and has no numeric label is the header (``db,...,label``)."""
    return bool(cells) and canonical_database(cells[0]) is None and not cells[-1].strip().isdigit()


def _subset_row(path: Path, number: int, cells: list[str]) -> SubsetRow:
    """One checked list row."""
    if len(cells) < 4:
        raise DataError(
            f"{path} line {number}: expected 4 columns db,subject,filename,label but found {len(cells)} "
            f"({','.join(cells)}). Fix or delete the line."
        )
    db, subject, filename, label = (c.strip() for c in cells[:4])
    if label not in {"0", "1", "2"}:
        raise DataError(
            f"{path} line {number}, column label: {label!r} is not 0 (negative), 1 (positive) or 2 (surprise). "
            f"Fix the label."
        )
    try:
        number_of_subject = subject_number(subject)
    except DataError:
        raise DataError(
            f"{path} line {number}, column subject: {subject!r} holds no number. Write it as the database does "
            f"(sub01, 006, s1)."
        ) from None
    return SubsetRow(canonical_database(db), number_of_subject, filename, int(label), number, db)


def restrict_to_subset(
    samples: list[Sample], rows: list[SubsetRow], database: str, path: Path
) -> tuple[list[tuple[Sample, int]], list[Skipped]]:
    """The samples the list names for this database, each with the list's label; list rows not found are skipped.

    Rows for other databases are ignored; a list with no row for this database
    is a DataError (most likely the wrong list, or a db spelling not understood).
    """
    mine = [row for row in rows if row.database == database]
    if not mine:
        seen = sorted({row.raw_database for row in rows})
        raise DataError(
            f"--subset {path} has no row for {database} (db names in the list: {', '.join(seen) or 'none'}). "
            f"Use the list that covers this database, or write its db column as {database}."
        )
    by_key = {(subject_number(s.subject), s.clip_id.lower()): s for s in samples}
    kept: list[tuple[Sample, int]] = []
    skipped: list[Skipped] = []
    taken: set[str] = set()
    for row in mine:
        sample = by_key.get((row.subject, row.filename.lower()))
        if sample is None:
            skipped.append(
                Skipped(
                    f"{row.raw_database}/{row.subject}/{row.filename} ({path.name} line {row.line})",
                    "named in the subset list but not found among the site's readable clips",
                )
            )
        elif sample.key not in taken:
            taken.add(sample.key)
            kept.append((sample, row.label))
    return kept, skipped


# ----------------------------------------------------------------------------- entry point


def load_site(dataset: str, root: Path, labels: str = "native", subset: Path | None = None) -> LabelledSite:
    """Read a site, optionally restrict it to a sample list, and give every kept sample a class index.

    Under ``composite3`` a subset list's label wins over the sheet's emotion;
    under other spaces the list only restricts. Samples whose emotion the space
    drops are returned as skipped entries with the reason.
    """
    adapter = get_adapter(dataset)
    space = label_space(labels, adapter.name)
    rows = read_subset(Path(subset)) if subset is not None else None
    index = read_site(adapter.name, Path(root))
    site = LabelledSite(adapter.name, index.root, space, skipped=list(index.skipped), subset=subset)
    if rows is None:
        candidates: list[tuple[Sample, int | None]] = [(s, None) for s in index.samples]
    else:
        kept, missing = restrict_to_subset(index.samples, rows, adapter.name, Path(subset))
        candidates = list(kept)
        site.skipped += missing
    for sample, listed in candidates:
        label = COMPOSITE_CLASSES[listed] if listed is not None and space.name == "composite3" else None
        label = label or space.label_of(sample.emotion)
        if label is None:
            site.skipped.append(
                Skipped(
                    entry_name(sample.subject, sample.clip_id, sample.source),
                    f"emotion {sample.emotion!r} is not a class of --labels {space.name}",
                )
            )
            continue
        site.samples.append(sample)
        site.targets.append(space.classes.index(label))
    return site
