"""Temporal sampling: T frames evenly over the ME interval, interpolation for short clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from partitions.records import Sample
from partitions.sampling import TooFewFrames, assemble, interval, plan_sampling


def clip(numbers: list[int], onset: int | None = None, offset: int | None = None) -> Sample:
    """A record with frames named after their numbers (nothing is decoded by the planner)."""
    frames = tuple(Path(f"/nowhere/img{n}.jpg") for n in numbers)
    return Sample("casme2", "sub01", "EP01_01", frames, tuple(numbers), 200.0, "happiness", onset, None, offset)


def test_evenly_spaced_inside_the_annotated_interval() -> None:
    sample = clip(list(range(100, 160)), onset=110, offset=149)
    plan = plan_sampling(sample, 8)
    numbers = plan.frame_numbers(sample)
    assert not plan.interpolated and not plan.whole_clip
    assert numbers[0] == 110 and numbers[-1] == 149
    assert np.all(numbers >= 110) and np.all(numbers <= 149)
    steps = np.diff(numbers)
    assert steps.max() - steps.min() <= 1  # even up to rounding
    assert plan.needed == tuple(int(p) for p in plan.positions)  # only the sampled frames are decoded
    assert len(set(plan.needed)) == 8


def test_whole_clip_without_annotation_and_offset_fallbacks() -> None:
    numbers = list(range(1, 31))
    plan = plan_sampling(clip(numbers), 8)
    assert plan.whole_clip and (plan.lo, plan.hi) == (0, 29)
    # Missing offset, or an offset before the onset (some CASME II rows): onset .. end of clip.
    assert interval(clip(numbers, onset=11))[:2] == (10, 29)
    assert interval(clip(numbers, onset=11, offset=0))[:2] == (10, 29)


def test_sparse_frame_numbers_map_to_indices() -> None:
    numbers = [5562, 5564, 5566, 5568, 5570, 5572, 5574, 5576, 5578, 5580]  # gaps in numbering
    plan = plan_sampling(clip(numbers, onset=5564, offset=5578), 8)
    assert (plan.lo, plan.hi) == (1, 8)
    assert plan.frame_numbers(clip(numbers, onset=5564, offset=5578))[0] == 5564


def test_short_interval_is_interpolated_between_neighbours() -> None:
    sample = clip(list(range(1, 21)), onset=4, offset=8)  # 5 frames in the interval, T = 8
    plan = plan_sampling(sample, 8)
    assert plan.interpolated
    assert plan.positions[0] == 3 and plan.positions[-1] == 7
    assert set(plan.needed) == {3, 4, 5, 6, 7}  # neighbours only, inside the interval
    decoded = {i: np.full((4, 4), 20 * i, dtype=np.uint8) for i in plan.needed}
    frames = assemble(plan, decoded)
    assert len(frames) == 8
    values = np.array([frame[0, 0] for frame in frames], dtype=float)
    np.testing.assert_allclose(values, 20 * plan.positions, atol=0.51)  # linear blend, rounded to uint8
    np.testing.assert_allclose(plan.frame_numbers(sample), np.linspace(4, 8, 8))


def test_too_few_frames_and_empty_interval_say_why() -> None:
    with pytest.raises(TooFewFrames, match="too few frames"):
        plan_sampling(clip([1, 2, 3], onset=2, offset=2), 8)
    with pytest.raises(TooFewFrames, match=r"interval 50\.\.60"):
        plan_sampling(clip(list(range(1, 20)), onset=50, offset=60), 8)
    with pytest.raises(TooFewFrames, match="no frames"):
        plan_sampling(clip([]), 8)
