"""Exact ground truth beside synthetic frames: per-frame landmarks and the dense displacement between any frames.

Each clip folder holds ``ground_truth.npz`` (``ground_truth_<onset>.npz`` when
one folder holds several MEs, as CAS(ME)^3 task folders do): the clip's
motion model, from which flow between any two frames is recomputed exactly
instead of being stored for every pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .motion import MotionModel

FILE_PATTERN = "ground_truth*.npz"


def ground_truth_name(onset: int | None = None) -> str:
    """File name of a clip's ground truth; ``onset`` distinguishes several MEs in one folder."""
    return "ground_truth.npz" if onset is None else f"ground_truth_{onset}.npz"


def save_ground_truth(path: Path, motion: MotionModel) -> None:
    """Write the motion model and, for convenience, every frame's landmarks."""
    landmarks = np.stack([motion.landmarks(row) for row in range(len(motion.frame_numbers))])
    with path.open("wb") as handle:
        np.savez_compressed(handle, landmarks=landmarks, **motion.to_arrays())


@dataclass
class ClipGroundTruth:
    """The motion of every ME whose frames lie in one folder."""

    models: list[MotionModel]

    def _model(self, frame_number: int) -> tuple[MotionModel, int]:
        for model in self.models:
            if frame_number in model.frame_numbers:
                return model, model.frame_row(frame_number)
        raise KeyError(f"frame {frame_number} has no ground truth here")

    def landmarks(self, frame_number: int) -> np.ndarray:
        """The 68 landmarks (x, y) of a frame, in frame pixels."""
        model, row = self._model(frame_number)
        return model.landmarks(row)

    def _pair(self, frame_a: int, frame_b: int) -> tuple[MotionModel, int, int]:
        """The model holding both frames, and their rows."""
        model, row_a = self._model(frame_a)
        if frame_b not in model.frame_numbers:
            raise KeyError(f"frames {frame_a} and {frame_b} belong to different MEs")
        return model, row_a, model.frame_row(frame_b)

    def flow(self, frame_a: int, frame_b: int) -> np.ndarray:
        """Displacement (H, W, 2) of each pixel of frame a to frame b: I_a(p) = I_b(p + flow(p))."""
        model, row_a, row_b = self._pair(frame_a, frame_b)
        return model.flow(row_a, row_b)

    def flow_at(self, points: np.ndarray, frame_a: int, frame_b: int) -> np.ndarray:
        """Displacement (N, 2) of points (N, 2) of frame a, anywhere in frame pixels, to frame b."""
        model, row_a, row_b = self._pair(frame_a, frame_b)
        return model.flow_at(points, row_a, row_b)


def load_ground_truth(clip_dir: Path) -> ClipGroundTruth | None:
    """The folder's ground truth, or None for real data (no ground-truth file)."""
    files = sorted(Path(clip_dir).glob(FILE_PATTERN))
    if not files:
        return None
    models = []
    for file in files:
        with np.load(file) as arrays:
            models.append(MotionModel.from_arrays(dict(arrays)))
    return ClipGroundTruth(models)
