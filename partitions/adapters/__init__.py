"""The registry of database adapters and :func:`read_site`, the one way a native tree is read.

Database names (``--dataset``) and their aliases follow
``/work/shared/reference/datasets.md``: ``casme2``, ``samm``, ``smic`` (HS),
``smic-vis``, ``smic-nir`` and ``casme3`` (CAS(ME)^3 Part A).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import DataError
from ..records import SiteIndex
from . import casme2, casme3, samm, smic
from .base import Adapter

ADAPTERS: dict[str, Adapter] = {
    "casme2": casme2.ADAPTER,
    "samm": samm.ADAPTER,
    **smic.ADAPTERS,
    "casme3": casme3.ADAPTER,
}
"""Adapters by canonical database name, in the order trees are sniffed."""

ALIASES: dict[str, str] = {
    "casme2": "casme2",
    "casmeii": "casme2",
    "samm": "samm",
    "smic": "smic",
    "smichs": "smic",
    "hs": "smic",
    "smicvis": "smic-vis",
    "vis": "smic-vis",
    "smicnir": "smic-nir",
    "nir": "smic-nir",
    "casme3": "casme3",
    "casmeiii": "casme3",
    "casme3a": "casme3",
    "casme3parta": "casme3",
}
"""Spellings seen in sample lists and papers (compared without case or punctuation) -> canonical name."""


def canonical_database(name: str) -> str | None:
    """The canonical database name for a spelling such as ``CASME_2``, ``CAS(ME)^3`` or ``SMIC-HS``; else None."""
    return ALIASES.get(re.sub(r"[^0-9a-z]", "", name.lower()))


def get_adapter(dataset: str) -> Adapter:
    """The adapter for a ``--dataset`` value (aliases accepted); DataError listing the valid names otherwise."""
    name = canonical_database(dataset)
    if name is None:
        raise DataError(f"unknown --dataset {dataset!r}; use one of {', '.join(ADAPTERS)}.")
    return ADAPTERS[name]


def read_site(dataset: str, root: Path) -> SiteIndex:
    """Index one site: every clip the adapter can pair with frames, and every entry it had to leave out.

    A root that looks like another database is refused with a message that says
    what the tree holds and which ``--dataset`` to use.
    """
    adapter = get_adapter(dataset)
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"--root {root} is not a folder; point it at the {adapter.title} top folder ({adapter.layout})."
        )
    if adapter.sniff(root) is None:
        check_other_database(adapter, root)
    return adapter.read(root)


def check_other_database(adapter: Adapter, root: Path) -> None:
    """Raise when ``root`` is recognisably another database's tree; return quietly when it is no known tree."""
    for other in ADAPTERS.values():
        if other is adapter:
            continue
        evidence = other.sniff(root)
        if evidence:
            raise DataError(
                f"--dataset {adapter.name} expects a {adapter.title} tree ({adapter.layout}), but {root} looks like "
                f"a {other.title} tree: {evidence}. Use --dataset {other.name}, or point --root at the "
                f"{adapter.title} folder."
            )


__all__ = ["ADAPTERS", "Adapter", "canonical_database", "get_adapter", "read_site"]
