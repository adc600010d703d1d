"""Temporal sampling: which T frames of a clip the model sees.

As in MOL (Shao et al., TPAMI 2025) and most ME pipelines, a clip becomes a
fixed number T of frames spread evenly over the micro-expression interval
(onset..offset where the sheet annotates it, else the whole clip). A clip with
fewer than T frames in its interval is stretched by linear interpolation
between neighbouring frames, and the plan records that it was, so a caller can
tell resampled frames from real ones (and skip exact ground truth for them).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .records import Sample


class TooFewFrames(Exception):
    """The clip cannot give T frames even by interpolation; ``str`` is the reason."""


@dataclass(frozen=True)
class SamplingPlan:
    """Where the T sampled frames sit in the clip.

    ``positions`` are fractional indices into ``sample.frames`` (length T);
    ``needed`` the frame indices that must be decoded to build them;
    ``lo``/``hi`` the first and last index of the interval used.
    """

    positions: np.ndarray
    needed: tuple[int, ...]
    interpolated: bool
    lo: int
    hi: int
    whole_clip: bool

    def frame_numbers(self, sample: Sample) -> np.ndarray:
        """The (possibly fractional) frame numbers of the sampled frames, for the cache and ground truth."""
        numbers = np.asarray(sample.frame_numbers, dtype=np.float64)
        lower = np.floor(self.positions).astype(int)
        upper = np.minimum(lower + 1, len(numbers) - 1)
        weight = self.positions - lower
        return numbers[lower] * (1.0 - weight) + numbers[upper] * weight


def interval(sample: Sample) -> tuple[int, int, bool]:
    """Index range ``(lo, hi)`` of the ME interval in ``sample.frames`` and whether it is the whole clip.

    Onset/offset are frame numbers as written in the sheet (datasets.md); a
    missing offset, or one before the onset (some CASME II rows), falls back
    to the end of the clip rather than dropping the sample.
    """
    numbers = np.asarray(sample.frame_numbers)
    if len(numbers) == 0:
        raise TooFewFrames(f"{sample.key}: the clip lists no frames")
    if sample.onset is None:
        return 0, len(numbers) - 1, True
    end = sample.offset if sample.offset is not None and sample.offset >= sample.onset else int(numbers[-1])
    inside = np.flatnonzero((numbers >= sample.onset) & (numbers <= end))
    if len(inside) == 0:
        raise TooFewFrames(
            f"{sample.key}: no frame on disk lies in the annotated interval {sample.onset}..{end} "
            f"(frames on disk: {int(numbers[0])}..{int(numbers[-1])}); check the sheet row or the frame folder"
        )
    return int(inside[0]), int(inside[-1]), False


def plan_sampling(sample: Sample, t: int) -> SamplingPlan:
    """T positions spread evenly over the ME interval; interpolated where it holds fewer than T frames."""
    lo, hi, whole = interval(sample)
    count = hi - lo + 1
    if count < 2:
        raise TooFewFrames(
            f"{sample.key}: too few frames: the interval holds {count} frame(s), at least 2 are needed "
            f"to interpolate {t} frames"
        )
    if count >= t:
        # Spacing (count-1)/(t-1) >= 1, so rounding keeps the indices distinct.
        positions = np.round(np.linspace(lo, hi, t)).astype(np.float64)
        return SamplingPlan(positions, tuple(int(p) for p in positions), False, lo, hi, whole)
    positions = np.linspace(lo, hi, t)
    lower = np.floor(positions).astype(int)
    upper = np.minimum(lower + 1, hi)
    needed = tuple(sorted({int(i) for i in np.concatenate([lower, upper])}))
    return SamplingPlan(positions, needed, True, lo, hi, whole)


def assemble(plan: SamplingPlan, decoded: dict[int, np.ndarray]) -> list[np.ndarray]:
    """Build the T frames from the decoded ones, blending neighbours linearly at fractional positions."""
    frames = []
    for position in plan.positions:
        lower = int(np.floor(position))
        weight = float(position - lower)
        if weight < 1e-9:
            frames.append(decoded[lower])
        else:
            frames.append(cv2.addWeighted(decoded[lower], 1.0 - weight, decoded[lower + 1], weight, 0.0))
    return frames
