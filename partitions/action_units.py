"""Action-unit strings as the sheets write them, and the 12-AU multi-label target.

From ``/work/shared/reference/datasets.md`` ("Action unit strings"): cells look
like ``12`` (possibly loaded as an int), ``4+7``, ``4+L10``, ``R12``,
``1+2+L4``, ``L12+R14``; ``L``/``R`` mark the side; SAMM adds head and eye
codes such as ``A1`` or ``T``. Copies also write ``AU4`` and intensity letters
(``12C``). The AU graph uses AU1, 2, 4, 5, 6, 7 (upper face) and AU9, 10, 12,
14, 15, 17 (lower face).
"""

from __future__ import annotations

import re

import numpy as np

from .records import ActionUnit, Sample
from .sheets import cell_text

AU_NODES: tuple[int, ...] = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17)
"""The AUs of the multi-label target, in target order."""

_AU_TOKEN = re.compile(r"^([LR])?(\d+)([A-E])?$")
_EMPTY = frozenset({"", "-", "/", "?", "none", "nan", "n/a", "na"})


def parse_action_units(value: object) -> tuple[tuple[ActionUnit, ...], tuple[str, ...]]:
    """Split an AU cell into action units and the other (head/eye) codes, keeping their order.

    Each AU is ``ActionUnit(number, side, code)`` with ``side`` ``"L"``, ``"R"``
    or None and ``code`` the token as normalised (upper case, ``AU`` prefix
    dropped: ``"L10"``, ``"12C"``, ``"4"``). Tokens that are not ``[L|R]<n>[A-E]``
    (``A1``, ``T``) go to the second tuple as written, so no code is lost.
    """
    text = cell_text(value)
    if text.lower() in _EMPTY:
        return (), ()
    units: list[ActionUnit] = []
    other: list[str] = []
    for raw in re.split(r"[+,;&\s]+", re.sub(r"(?i)\bAU\s*", "", text)):
        token = raw.strip().strip("()[]{}").strip()
        if not token or token.lower() in _EMPTY:
            continue
        match = _AU_TOKEN.match(token.upper())
        if match:
            side, number, intensity = match.groups()
            units.append(ActionUnit(int(number), side, f"{side or ''}{int(number)}{intensity or ''}"))
        else:
            other.append(token)
    return tuple(units), tuple(other)


def au_target(sample: Sample) -> np.ndarray:
    """Shape (12,) float32, 1 where the sample codes that AU on either side, in :data:`AU_NODES` order."""
    target = np.zeros(len(AU_NODES), dtype=np.float32)
    coded = {unit.number for unit in sample.action_units}
    for position, number in enumerate(AU_NODES):
        if number in coded:
            target[position] = 1.0
    return target
