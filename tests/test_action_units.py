"""Action-unit cells as the sheets write them, and the 12-AU target (datasets.md, "Action unit strings")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from partitions.action_units import AU_NODES, au_target, parse_action_units
from partitions.records import ActionUnit, Sample

AU = ActionUnit


@pytest.mark.parametrize(
    ("cell", "units", "other"),
    [
        (12, [AU(12, None, "12")], []),
        (12.0, [AU(12, None, "12")], []),
        ("12", [AU(12, None, "12")], []),
        ("4+7", [AU(4, None, "4"), AU(7, None, "7")], []),
        ("4+L10", [AU(4, None, "4"), AU(10, "L", "L10")], []),
        ("R12", [AU(12, "R", "R12")], []),
        ("1+2+L4", [AU(1, None, "1"), AU(2, None, "2"), AU(4, "L", "L4")], []),
        ("L12+R14", [AU(12, "L", "L12"), AU(14, "R", "R14")], []),
        ("12C", [AU(12, None, "12C")], []),
        ("R14A", [AU(14, "R", "R14A")], []),
        ("AU4", [AU(4, None, "4")], []),
        ("AU 4 + AU12", [AU(4, None, "4"), AU(12, None, "12")], []),
        ("l10", [AU(10, "L", "L10")], []),
        (" 4 + 7 ", [AU(4, None, "4"), AU(7, None, "7")], []),
        ("4+7+A1", [AU(4, None, "4"), AU(7, None, "7")], ["A1"]),
        ("T", [], ["T"]),
        ("L14+T", [AU(14, "L", "L14")], ["T"]),
        ("(12)", [AU(12, None, "12")], []),
        (None, [], []),
        (float("nan"), [], []),
        ("", [], []),
        ("/", [], []),
    ],
)
def test_parse_action_units(cell: object, units: list[ActionUnit], other: list[str]) -> None:
    assert parse_action_units(cell) == (tuple(units), tuple(other))


def _sample(units: tuple[ActionUnit, ...]) -> Sample:
    return Sample("casme2", "sub01", "EP01_01", (Path("a.jpg"),), (1,), 200.0, "happiness", action_units=units)


def test_au_nodes_are_the_graph_aus() -> None:
    assert AU_NODES == (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17)


def test_au_target_is_side_agnostic_and_ignores_aus_outside_the_graph() -> None:
    units, _ = parse_action_units("L12+R14+4+43")
    target = au_target(_sample(units))
    assert target.shape == (12,)
    assert target.dtype == np.float32
    expected = np.zeros(12, dtype=np.float32)
    expected[[AU_NODES.index(4), AU_NODES.index(12), AU_NODES.index(14)]] = 1.0
    np.testing.assert_array_equal(target, expected)


def test_au_target_of_a_sample_without_aus_is_all_zero() -> None:
    assert not au_target(_sample(())).any()
