"""Shared readers for annotation sheets and native folder trees.

Every adapter finds its sheet and frame folders by name pattern and reads its
sheet through :func:`read_table`, so the quirks listed in
``/work/shared/reference/datasets.md`` (notes above the header, blank header
columns, numbers stored as text, case that differs between copies) are handled
once, here, and every message names the file, the row and the fix.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import DataError

HEADER_SCAN_ROWS = 40
"""How many rows from the top of a sheet may hold notes before the header (SAMM has about 13)."""

BLANK_MARKS = frozenset({"", "/", "-", "--", "?", "n/a", "na", "nan", "none", "null"})
"""Cell texts that mean "not annotated" (CASME II writes ``/`` for a missing apex)."""


def normalise_name(text: object) -> str:
    """Column-name key that ignores case, spaces and punctuation, so ``Onset Frame`` == ``OnsetFrame``."""
    return re.sub(r"[^0-9a-z]", "", cell_text(text).lower())


def cell_text(value: object) -> str:
    """A cell as stripped text; empty for blank cells (None, NaN)."""
    if value is None or (not isinstance(value, str) and bool(pd.isna(value))):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def cell_int(value: object) -> int | None:
    """A frame number from a cell that may hold an int, a float or text (``"355"``); None when not annotated.

    Raises ValueError for text that is neither a number nor a blank mark, so the
    caller can name the row.
    """
    text = cell_text(value)
    if text.lower() in BLANK_MARKS:
        return None
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a frame number") from None
    if not number.is_integer():
        raise ValueError(f"{text!r} is not a whole frame number")
    return int(number)


# ----------------------------------------------------------------------------- folder search


def walk_limited(root: Path, max_depth: int) -> Iterator[tuple[Path, list[str], list[str]]]:
    """``os.walk`` that stops ``max_depth`` folders below ``root`` (frame folders hold thousands of files)."""
    base_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        path = Path(dirpath)
        if len(path.parts) - base_depth >= max_depth:
            dirnames[:] = []
        dirnames.sort()
        yield path, dirnames, sorted(filenames)


def find_files(root: Path, patterns: Sequence[str], max_depth: int = 2) -> list[Path]:
    """Files under ``root`` whose name matches one of the glob ``patterns``, ignoring case; sorted by path."""
    lowered = [p.lower() for p in patterns]
    found = []
    for path, _dirs, files in walk_limited(root, max_depth):
        for name in files:
            if name.startswith("~$"):  # Excel's lock file next to an open sheet
                continue
            if any(fnmatch.fnmatchcase(name.lower(), p) for p in lowered):
                found.append(path / name)
    return sorted(found)


def find_dirs(root: Path, patterns: Sequence[str], max_depth: int = 2) -> list[Path]:
    """Folders under ``root`` (itself included) whose name matches a glob pattern, ignoring case."""
    lowered = [p.lower() for p in patterns]
    found = []
    for path, dirs, _files in walk_limited(root, max_depth):
        candidates = [path] if path == root else []
        candidates += [path / d for d in dirs]
        found += [c for c in candidates if any(fnmatch.fnmatchcase(c.name.lower(), p) for p in lowered)]
    return sorted(set(found))


def child_dir(parent: Path, name: str) -> Path | None:
    """The sub-folder of ``parent`` called ``name``, matched exactly first and then ignoring case."""
    exact = parent / name
    if exact.is_dir():
        return exact
    wanted = name.lower()
    for entry in sorted(parent.iterdir()) if parent.is_dir() else []:
        if entry.is_dir() and entry.name.lower() == wanted:
            return entry
    return None


def subdirs(parent: Path) -> list[Path]:
    """Immediate sub-folders, sorted by name (hidden ones left out)."""
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))


def tree_summary(root: Path, limit: int = 8) -> str:
    """A one-line picture of what a folder holds, for messages about a wrong ``--root``."""
    if not root.is_dir():
        return "it does not exist"
    entries = sorted(root.iterdir())
    if not entries:
        return "it is empty"
    names = [e.name + ("/" if e.is_dir() else "") for e in entries[:limit]]
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return "it holds " + ", ".join(names) + more


def pick_latest(paths: Sequence[Path]) -> Path:
    """The last path by name: sheets are dated ``YYYYMMDD`` or versioned ``_v2``, so the newest sorts last."""
    return sorted(paths, key=lambda p: p.name.lower())[-1]


# ----------------------------------------------------------------------------- sheets


@dataclass(frozen=True)
class SheetRow:
    """One data row: ``number`` is the row number a spreadsheet program shows (1-based)."""

    number: int
    cells: dict[str, object]

    def text(self, key: str) -> str:
        """The cell of a named column as stripped text ('' when blank or when the column is absent)."""
        return cell_text(self.cells.get(key))


@dataclass
class SheetTable:
    """The data rows of one sheet, with columns renamed to the adapter's field names."""

    path: Path
    sheet: str
    header_row: int
    columns: dict[str, str]
    rows: list[SheetRow] = field(default_factory=list)

    def where(self, row: SheetRow, key: str | None = None) -> str:
        """``file (sheet 'x') row N, column 'Name'`` for messages."""
        place = f"{self.path} (sheet {self.sheet!r}) row {row.number}"
        return f"{place}, column {self.columns[key]!r}" if key in self.columns else place


def read_table(
    path: Path,
    columns: Mapping[str, Sequence[str]],
    prefer_sheet: str | None = None,
    what: str = "annotation sheet",
) -> SheetTable:
    """Read a sheet with ``header=None`` and locate its header row by column names, never by offset.

    ``columns`` maps a field name to the header spellings accepted for it
    (compared with :func:`normalise_name`); all are required, and other
    columns (blank headers, ``Objective Classes``, ``Duration``) are ignored.
    Rows whose cells are all blank are dropped. Raises :class:`DataError`
    naming the file, the columns it lacks and what to do.
    """
    sheets = _load_sheets(path, what)
    order = _sheet_order(list(sheets), prefer_sheet)
    closest: tuple[int, str, int, list[str]] = (-1, "", 0, [])
    for name in order:
        frame = sheets[name]
        for index in range(min(HEADER_SCAN_ROWS, len(frame))):
            found = _match_header(frame.iloc[index].tolist(), columns)
            hits = sum(1 for key in columns if key in found)
            if hits == len(columns):
                return _table(path, name, frame, index, found)
            if hits > closest[0]:
                closest = (hits, name, index + 1, [cell_text(v) for v in frame.iloc[index].tolist() if cell_text(v)])
    wanted = " | ".join(spellings[0] for spellings in columns.values())
    seen = f"; the closest row is sheet {closest[1]!r} row {closest[2]}: {' | '.join(closest[3])}" if closest[3] else ""
    raise DataError(
        f"{path}: no header row with the columns {wanted} in the first {HEADER_SCAN_ROWS} rows of sheet(s) "
        f"{', '.join(repr(s) for s in order)}{seen}. Use the {what} as distributed, or rename the header cells "
        f"to those column names."
    )


def _load_sheets(path: Path, what: str) -> dict[str, pd.DataFrame]:
    """All sheets of a workbook as raw cells; unreadable files become a DataError, not a traceback."""
    try:
        return pd.read_excel(path, header=None, sheet_name=None, dtype=object)
    except Exception as error:  # openpyxl/xlrd raise many types for a damaged or mis-named file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(
            f"{path}: cannot read the {what} ({reason}). Save it again as .xlsx from a spreadsheet program "
            f"or replace it with the copy from the database's distribution."
        ) from None


def _sheet_order(names: list[str], prefer: str | None) -> list[str]:
    """The preferred sheet (matched ignoring case) alone when present, else every sheet in workbook order."""
    if prefer is not None:
        chosen = [n for n in names if str(n).strip().lower() == prefer.lower()]
        if chosen:
            return chosen
    return names


def _match_header(cells: list[object], spellings: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Field name -> column position for the header cells of one candidate row (first match wins)."""
    keys = [normalise_name(c) for c in cells]
    found: dict[str, int] = {}
    for field_name, names in spellings.items():
        accepted = {normalise_name(n) for n in names}
        for position, key in enumerate(keys):
            if key and key in accepted:
                found[field_name] = position
                break
    return found


def _table(path: Path, sheet: str, frame: pd.DataFrame, header: int, found: dict[str, int]) -> SheetTable:
    """Data rows under the header, keyed by field name; blank rows left out."""
    header_cells = frame.iloc[header].tolist()
    table = SheetTable(path, str(sheet), header + 1, {k: cell_text(header_cells[i]) for k, i in found.items()})
    for index in range(header + 1, len(frame)):
        values = frame.iloc[index].tolist()
        cells = {key: values[position] for key, position in found.items()}
        if all(cell_text(v) == "" for v in cells.values()):
            continue
        table.rows.append(SheetRow(index + 1, cells))
    return table
