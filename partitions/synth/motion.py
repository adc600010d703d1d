"""Facial motion of a synthetic clip: action units, blinks and head motion as one displacement model.

A neutral point x of the face moves, at frame t, to

    P_t(x) = R_t (x + D_t(x) - c) + c + s_t,   D_t(x) = sum_k a_{g(k)}(t) v_k exp(-|x - c_k|^2 / 2 r_k^2)

where each control point k (placed on a landmark) pushes its facial region
along v_k, a_g(t) is the onset-apex-offset intensity of the group (an AU or a
blink) the point belongs to, and (R_t, s_t) is a small rigid head motion about
the face centre c. Frames are rendered by pulling the neutral image back
through P_t, landmarks are P_t(neutral landmarks), and the exact flow between
any two frames follows from the same parameters, so renderer and ground truth
can never disagree.

AU regions follow FACS (Ekman & Friesen): e.g. AU1 raises the inner brows,
AU12 pulls the lip corners up and out, AU17 pushes the chin boss up.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

# Control points per AU: (landmark index, displacement (dx, dy) in face-width units, radius in face-width units,
# side). Side "R" is the subject's right (image left: iBUG landmarks 17-21, 36-41, 48), "L" the subject's left.
Move = tuple[int, tuple[float, float], float, str | None]

AU_MOVES: dict[int, tuple[Move, ...]] = {
    # Amplitudes are set so each AU alone peaks near 3 px on a 128 px face (micro-expression scale) and
    # overlapping bumps never make the warp fold (det(I + J) stays well above 0).
    1: ((21, (0.002, -0.015), 0.06, "R"), (22, (-0.002, -0.015), 0.06, "L")),
    2: (
        (17, (0.0, -0.016), 0.065, "R"),
        (18, (0.0, -0.011), 0.06, "R"),
        (26, (0.0, -0.016), 0.065, "L"),
        (25, (0.0, -0.011), 0.06, "L"),
    ),
    4: (
        (20, (0.0075, 0.0135), 0.06, "R"),
        (21, (0.01, 0.011), 0.05, "R"),
        (23, (-0.0075, 0.0135), 0.06, "L"),
        (22, (-0.01, 0.011), 0.05, "L"),
    ),
    5: (
        (37, (0.0, -0.0145), 0.035, "R"),
        (38, (0.0, -0.0145), 0.035, "R"),
        (43, (0.0, -0.0145), 0.035, "L"),
        (44, (0.0, -0.0145), 0.035, "L"),
    ),
    6: (
        (41, (0.0, -0.015), 0.05, "R"),
        (1, (0.0066, -0.022), 0.08, "R"),
        (46, (0.0, -0.015), 0.05, "L"),
        (15, (-0.0066, -0.022), 0.08, "L"),
    ),
    7: (
        (40, (0.0, -0.016), 0.035, "R"),
        (41, (0.0, -0.016), 0.035, "R"),
        (47, (0.0, -0.016), 0.035, "L"),
        (46, (0.0, -0.016), 0.035, "L"),
        (37, (0.0, 0.008), 0.035, "R"),
        (44, (0.0, 0.008), 0.035, "L"),
    ),
    9: ((31, (0.004, -0.022), 0.045, "R"), (35, (-0.004, -0.022), 0.045, "L"), (28, (0.0, -0.01), 0.04, None)),
    10: ((50, (0.0, -0.0095), 0.045, "R"), (51, (0.0, -0.0105), 0.045, None), (52, (0.0, -0.0095), 0.045, "L")),
    12: ((48, (-0.015, -0.019), 0.05, "R"), (54, (0.015, -0.019), 0.05, "L")),
    14: ((48, (0.022, -0.006), 0.045, "R"), (54, (-0.022, -0.006), 0.045, "L")),
    15: ((48, (-0.004, 0.024), 0.05, "R"), (54, (0.004, 0.024), 0.05, "L")),
    17: ((57, (0.0, -0.022), 0.055, None), (8, (0.0, -0.016), 0.07, None)),
}
BLINK_MOVES: tuple[Move, ...] = (
    (37, (0.0, 0.013), 0.045, "R"),
    (38, (0.0, 0.013), 0.045, "R"),
    (43, (0.0, 0.013), 0.045, "L"),
    (44, (0.0, 0.013), 0.045, "L"),
)
MAX_NEWTON_STEPS = 10
NEWTON_TOLERANCE = 1e-4  # pixels
SUPPORT_RADII = 4.5  # beyond this, a bump moves a point by under exp(-10) (5e-5) of its amplitude


def ease_curve(frames: np.ndarray, onset: float, apex: float, offset: float) -> np.ndarray:
    """Intensity 0 -> 1 -> 0 over onset..apex..offset with smooth (sin^2) rise and fall."""
    t = np.asarray(frames, np.float64)
    rise = np.sin(0.5 * np.pi * np.clip((t - onset) / max(apex - onset, 1e-6), 0.0, 1.0)) ** 2
    fall = np.cos(0.5 * np.pi * np.clip((t - apex) / max(offset - apex, 1e-6), 0.0, 1.0)) ** 2
    return np.where(t <= apex, rise, fall)


def control_points(
    moves: tuple[Move, ...], landmarks: np.ndarray, face_width: float, sides: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres (K, 2), vectors (K, 2) and radii (K,) in pixels for one group; ``sides`` keeps one side only."""
    kept = [m for m in moves if sides is None or m[3] is None or m[3] == sides]
    centres = landmarks[[m[0] for m in kept]]
    vectors = np.array([m[1] for m in kept], np.float64) * face_width
    radii = np.array([m[2] for m in kept], np.float64) * face_width
    return centres, vectors, radii


@dataclass
class MotionModel:
    """All motion of one clip; arrays only, so it saves to and loads from an ``.npz`` losslessly.

    ``curves`` is (F, G): the intensity of each group at each written frame;
    ``group`` maps each control point to its group; ``rigid`` is (F, 3):
    rotation (radians), tx, ty per frame.
    """

    frame_numbers: np.ndarray
    neutral_landmarks: np.ndarray
    centres: np.ndarray
    vectors: np.ndarray
    radii: np.ndarray
    group: np.ndarray
    curves: np.ndarray
    rigid: np.ndarray
    face_centre: np.ndarray
    image_shape: np.ndarray

    def frame_row(self, frame_number: int) -> int:
        """Row of the arrays for a frame number (as in the file names)."""
        rows = np.flatnonzero(self.frame_numbers == frame_number)
        if rows.size == 0:
            raise KeyError(f"frame {frame_number} is not part of this clip")
        return int(rows[0])

    def _active(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Centres, weighted vectors and radii of the control points that move at frame ``row``."""
        weights = self.curves[row, self.group] if self.group.size else np.zeros(0)
        keep = weights != 0
        return self.centres[keep], weights[keep, None] * self.vectors[keep], self.radii[keep]

    def displacement_at(self, points: np.ndarray, row: int) -> tuple[np.ndarray, np.ndarray]:
        """D_t and its Jacobian at arbitrary points: (N, 2) and (N, 2, 2), evaluated analytically.

        Computed in float32 (about 2e-5 px at these coordinates), which makes
        rendering five times faster than float64. The (K, N) terms are laid out one control point per row, so
        numpy's loops run along the N points rather than the few control points.
        """
        centres, vectors, radii = (a.astype(np.float32) for a in self._active(row))
        x, y = np.array(points.T, np.float32)
        dx = x - centres[:, 0:1]  # (K, N)
        dy = y - centres[:, 1:2]
        inverse_r2 = (1.0 / radii**2)[:, None]
        bumps = dx * dx  # then in place: exp(-0.5 * (dx^2 + dy^2) / r^2), the same operations in the same order
        bumps += dy * dy
        bumps *= -0.5
        bumps *= inverse_r2
        np.exp(bumps, out=bumps)
        moves = vectors.T
        displacement = (moves @ bumps).T
        dx *= bumps  # dx, dy become bumps * d / r^2, the slopes' terms
        dx *= inverse_r2
        dy *= bumps
        dy *= inverse_r2
        slope_x, slope_y = (moves @ dx).T, (moves @ dy).T
        jacobian = -np.stack([slope_x, slope_y], axis=-1)  # [n, i, j] = d D_i / d x_j
        return displacement.astype(np.float64, order="C"), jacobian.astype(np.float64)

    def _rigid(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        angle, tx, ty = self.rigid[row]
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        return rotation, np.array([tx, ty])

    def forward(self, points: np.ndarray, row: int) -> np.ndarray:
        """P_t: where neutral points (N, 2) are at frame ``row``."""
        rotation, shift = self._rigid(row)
        moved = points + self.displacement_at(points, row)[0]
        centred = _add_columns(moved, -self.face_centre) @ rotation.T
        return _add_columns(_add_columns(centred, self.face_centre), shift)

    def landmarks(self, row: int) -> np.ndarray:
        """Exact 68 landmarks (x, y) of frame ``row``."""
        return self.forward(self.neutral_landmarks, row).astype(np.float32)

    def pullback(self, row: int, start: np.ndarray | None = None) -> np.ndarray:
        """For every pixel y of frame ``row``, the neutral point x with P_t(x) = y: (H, W, 2) float32.

        Undoes the head pose, then solves x + D_t(x) = z by Newton's method,
        only where D_t is not negligible (within SUPPORT_RADII radii of a
        moving control point); D_t's gradient stays well below 1, so the map
        is invertible and a few steps reach NEWTON_TOLERANCE. ``start``, the
        previous frame's pullback, is a close first guess when rendering in order.
        """
        h, w = (int(v) for v in self.image_shape)
        z = self._unposed(_pixel_grid(h, w), row)
        x = z.copy()
        near = self._support(row).ravel()
        if near.any():
            targets = z[near]
            guess = targets if start is None else start.reshape(-1, 2)[near].astype(np.float64)
            x[near] = self._solve(targets, guess, row)
        return x.reshape(h, w, 2).astype(np.float32)

    def _unposed(self, points: np.ndarray, row: int) -> np.ndarray:
        """Frame points (N, 2) with frame ``row``'s head pose undone: the z of x + D_t(x) = z."""
        rotation, shift = self._rigid(row)
        centred = _add_columns(_add_columns(points, -self.face_centre), -shift)
        return _add_columns(centred @ rotation, self.face_centre)

    def flow_at(self, points: np.ndarray, row_a: int, row_b: int) -> np.ndarray:
        """Exact displacement (N, 2) of points (N, 2) of frame a, anywhere (not only on pixels), to frame b.

        What :meth:`flow` gives on the pixel grid, for just the points asked (e.g. a crop's pixels).
        """
        points = np.asarray(points, np.float64)
        z = self._unposed(points, row_a)
        return self.forward(self._solve(z, z, row_a), row_b) - points

    def _support(self, row: int) -> np.ndarray:
        """(H, W) mask of frame pixels that a moving control point can reach (a box per point, padded for pose)."""
        h, w = (int(v) for v in self.image_shape)
        mask = np.zeros((h, w), bool)
        centres, vectors, radii = self._active(row)
        pose_margin = np.abs(self.rigid[row, 1:]).max() + abs(self.rigid[row, 0]) * max(h, w) + 1.0
        reach = SUPPORT_RADII * radii + np.linalg.norm(vectors, axis=1) + pose_margin
        low = np.floor(centres - reach[:, None]).clip(0).astype(int)
        high = np.ceil(centres + reach[:, None]).astype(int) + 1
        for (x0, y0), (x1, y1) in zip(low, high, strict=True):  # a few boxes per clip, not pixels
            mask[y0:y1, x0:x1] = True
        return mask

    def _solve(self, z: np.ndarray, guess: np.ndarray, row: int) -> np.ndarray:
        """Newton iterations for x + D_t(x) = z, dropping points once they have converged.

        The unconverged points are kept as compact arrays, gathered anew only when some converge.
        """
        x = guess.copy()
        todo = np.arange(len(x))
        points, targets = x, z
        for _ in range(MAX_NEWTON_STEPS):
            displacement, jacobian = self.displacement_at(points, row)
            residual = points + displacement - targets
            a, b = 1.0 + jacobian[:, 0, 0], jacobian[:, 0, 1]
            c, d = jacobian[:, 1, 0], 1.0 + jacobian[:, 1, 1]
            step = np.stack([d * residual[:, 0] - b * residual[:, 1], a * residual[:, 1] - c * residual[:, 0]], 1)
            step /= (a * d - b * c)[:, None]  # (I + J)^-1 residual, 2x2 in closed form
            points = points - step
            moving = np.maximum(np.abs(step[:, 0]), np.abs(step[:, 1])) >= NEWTON_TOLERANCE
            if not moving.all():
                x[todo] = points
                todo, points, targets = todo[moving], points[moving], targets[moving]
                if todo.size == 0:
                    break
        x[todo] = points
        return x

    def flow(self, row_a: int, row_b: int) -> np.ndarray:
        """Exact displacement of each pixel of frame a to frame b (H, W, 2): I_a(p) = I_b(p + flow(p))."""
        h, w = (int(v) for v in self.image_shape)
        neutral = self.pullback(row_a).reshape(-1, 2).astype(np.float64)
        return (self.forward(neutral, row_b) - _pixel_grid(h, w)).reshape(h, w, 2).astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The model as named arrays, for ``np.savez``."""
        return {name: np.asarray(getattr(self, name)) for name in self.__dataclass_fields__}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> MotionModel:
        """Inverse of :meth:`to_arrays`."""
        return cls(**{name: np.asarray(arrays[name]) for name in cls.__dataclass_fields__})


@lru_cache(maxsize=8)
def _pixel_grid(h: int, w: int) -> np.ndarray:
    """(x, y) of every pixel, row-major, (H*W, 2) float64; one read-only copy per frame size."""
    yy, xx = np.mgrid[0:h, 0:w]
    grid = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64)
    grid.flags.writeable = False
    return grid


def _add_columns(points: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """``points + vector`` for (N, 2) points and a (2,) vector, one column at a time.

    The same sums as numpy's broadcast (so the same bits; ``p - v`` is ``p + (-v)`` exactly), about four times
    faster: a broadcast over a last axis of 2 runs numpy's inner loop two elements at a time.
    """
    out = np.empty(points.shape, np.result_type(points, vector))
    for column in range(points.shape[1]):
        np.add(points[:, column], vector[column], out=out[:, column])
    return out


def warp(neutral: np.ndarray, pullback: np.ndarray) -> np.ndarray:
    """The frame whose pixel y shows the neutral image at ``pullback[y]``."""
    return cv2.remap(neutral, pullback[..., 0], pullback[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
