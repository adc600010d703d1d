"""Synthetic identities: a 68-point face geometry and a shaded face image drawn from it.

The geometry follows the iBUG-300W 68-point layout that dlib's predictor uses
(jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67), so the synthetic
ground-truth landmarks and the predictor's output are directly comparable.
Identities vary in geometry, skin tone, texture, hair and lighting; none of it
depends on a label, so identity carries no label.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

N_LANDMARKS = 68
JAW = slice(0, 17)
RIGHT_BROW = slice(17, 22)
LEFT_BROW = slice(22, 27)
NOSE_BRIDGE = slice(27, 31)
NOSTRILS = slice(31, 36)
RIGHT_EYE = slice(36, 42)
LEFT_EYE = slice(42, 48)
OUTER_LIPS = slice(48, 60)
INNER_LIPS = slice(60, 68)

SUPERSAMPLE = 2


@dataclass(frozen=True)
class Identity:
    """What makes one synthetic subject look like nobody else.

    Geometry parameters are in face-width units (the jaw spans about 1.0).
    """

    jaw_half_width: float
    chin_depth: float
    jaw_squareness: float
    brow_height: float
    brow_arch: float
    brow_thickness: float
    eye_spacing: float
    eye_width: float
    eye_open: float
    nose_length: float
    nose_width: float
    mouth_width: float
    mouth_height: float
    lip_thickness: float
    resting: np.ndarray  # (4,) resting-face offsets along AU directions: corner lift, inner-brow lift, knit, lip
    jitter: np.ndarray  # (68, 2) small asymmetric offsets
    skin_bgr: tuple[float, float, float]
    hair_level: float
    hairline: float
    texture_seed: int
    texture_strength: float
    light_direction: tuple[float, float]
    light_strength: float
    ambient: float
    background_level: float


def random_identity(rng: np.random.Generator) -> Identity:
    """Draw one identity; every parameter independent of any emotion."""
    skin = rng.uniform(80, 215)
    tint = rng.uniform(0.9, 1.15)
    background = _contrasting_level(rng, skin, min_gap=45.0)
    return Identity(
        jaw_half_width=rng.uniform(0.43, 0.5),
        chin_depth=rng.uniform(0.66, 0.78),
        jaw_squareness=rng.uniform(0.75, 1.15),
        brow_height=rng.uniform(0.16, 0.23),
        brow_arch=rng.uniform(0.01, 0.045),
        brow_thickness=rng.uniform(0.025, 0.045),
        eye_spacing=rng.uniform(0.2, 0.25),
        eye_width=rng.uniform(0.13, 0.17),
        eye_open=rng.uniform(0.035, 0.055),
        nose_length=rng.uniform(0.23, 0.3),
        nose_width=rng.uniform(0.07, 0.1),
        mouth_width=rng.uniform(0.17, 0.22),
        mouth_height=rng.uniform(0.72, 0.8),
        lip_thickness=rng.uniform(0.03, 0.05),
        resting=rng.uniform([-0.035, -0.035, 0.0, -0.02], [0.035, 0.035, 0.025, 0.02]),
        jitter=rng.normal(0.0, 0.006, size=(N_LANDMARKS, 2)),
        skin_bgr=(skin * tint * 0.85, skin * tint * 0.95, min(skin * 1.1, 255.0)),
        hair_level=rng.uniform(10, 90),
        hairline=rng.uniform(0.0, 0.08),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
        texture_strength=rng.uniform(3.0, 10.0),
        light_direction=(rng.uniform(-0.6, 0.6), rng.uniform(-0.5, 0.2)),
        light_strength=rng.uniform(0.25, 0.5),
        ambient=rng.uniform(0.55, 0.75),
        background_level=background,
    )


def _contrasting_level(rng: np.random.Generator, level: float, min_gap: float) -> float:
    """A grey level in [25, 235] at least ``min_gap`` away from ``level``: real recordings light the face apart from
    the wall, and a detector needs that edge."""
    candidates = np.concatenate([np.arange(25.0, level - min_gap), np.arange(level + min_gap, 235.0)])
    return float(rng.choice(candidates))


def _arc(x0: float, x1: float, y: float, arch: float, n: int) -> np.ndarray:
    """``n`` points from x0 to x1 on a parabola that rises ``arch`` in the middle."""
    t = np.linspace(0.0, 1.0, n)
    return np.stack([x0 + (x1 - x0) * t, y - arch * (1 - (2 * t - 1) ** 2)], axis=1)


def _eye(inner_x: float, outer_x: float, y: float, opening: float) -> np.ndarray:
    """Six eye points in iBUG order for an eye whose outer corner is ``outer_x``."""
    t = np.array([0.0, 1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3])
    x = outer_x + (inner_x - outer_x) * t
    lid = np.array([0.0, -1.0, -1.0, 0.0, 0.8, 0.8]) * opening
    return np.stack([x, y + lid], axis=1)


def landmarks_unit(identity: Identity) -> np.ndarray:
    """The identity's neutral 68 landmarks in face units, x right, y down, face centred on x=0.5."""
    idt = identity
    phi = np.linspace(0.0, np.pi, 17)
    cos = np.cos(phi)
    jaw_x = 0.5 - idt.jaw_half_width * np.sign(cos) * np.abs(cos) ** idt.jaw_squareness
    jaw = np.stack([jaw_x, 0.33 + idt.chin_depth * np.sin(phi)], axis=1)

    eye_y = 0.33
    half = idt.eye_spacing / 2 + 0.5 * 0.0
    right_eye = _eye(0.5 - half + 0.02, 0.5 - half - idt.eye_width + 0.02, eye_y, idt.eye_open)
    left_eye = _eye(0.5 + half - 0.02, 0.5 + half + idt.eye_width - 0.02, eye_y, idt.eye_open)
    left_eye = left_eye[[3, 2, 1, 0, 5, 4]]  # iBUG order runs inner to outer on the image-right eye

    brow_y = eye_y - idt.brow_height + 0.07
    right_brow = _arc(0.5 - half - idt.eye_width - 0.04, 0.5 - 0.05, brow_y, idt.brow_arch, 5)
    left_brow = _arc(0.5 + 0.05, 0.5 + half + idt.eye_width + 0.04, brow_y, idt.brow_arch, 5)

    tip_y = eye_y + idt.nose_length
    bridge = np.stack([np.full(4, 0.5), np.linspace(eye_y - 0.01, tip_y, 4)], axis=1)
    nostril_x = 0.5 + idt.nose_width * np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    nostrils = np.stack([nostril_x, tip_y + 0.05 + np.array([0.0, 0.012, 0.018, 0.012, 0.0])], axis=1)

    outer, inner = _mouth(idt.mouth_width, idt.mouth_height, idt.lip_thickness)
    points = np.concatenate([jaw, right_brow, left_brow, bridge, nostrils, right_eye, left_eye, outer, inner])
    return points + _resting_face(identity.resting) + identity.jitter


def _resting_face(resting: np.ndarray) -> np.ndarray:
    """Offsets that make a neutral face look slightly smiling, raised, knit or sneering.

    People's resting faces differ along the very directions AUs move, by as
    much as a micro-expression's amplitude; without this a single apex frame
    would give the label away.
    """
    corner_lift, inner_brow_lift, knit, lip_lift = resting
    offsets = np.zeros((N_LANDMARKS, 2))
    offsets[[48, 54, 60, 64], 1] -= corner_lift
    offsets[[49, 53, 59, 55], 1] -= 0.5 * corner_lift
    offsets[[21, 22], 1] -= inner_brow_lift
    offsets[[20, 23], 1] -= 0.5 * inner_brow_lift
    offsets[[20, 21], 0] += knit
    offsets[[22, 23], 0] -= knit
    offsets[[19, 20, 21, 22, 23, 24], 1] += 0.6 * knit
    offsets[[50, 51, 52, 61, 62, 63], 1] -= lip_lift
    return offsets


def _mouth(half_width: float, y: float, lip: float) -> tuple[np.ndarray, np.ndarray]:
    """Outer (12) and inner (8) lip contours in iBUG order, starting at the image-left corner."""
    w = half_width
    outer = np.array(
        [
            (-w, 0.0),
            (-0.6 * w, -0.8 * lip),
            (-0.2 * w, -1.1 * lip),
            (0.0, -0.9 * lip),
            (0.2 * w, -1.1 * lip),
            (0.6 * w, -0.8 * lip),
            (w, 0.0),
            (0.6 * w, 1.0 * lip),
            (0.2 * w, 1.3 * lip),
            (0.0, 1.35 * lip),
            (-0.2 * w, 1.3 * lip),
            (-0.6 * w, 1.0 * lip),
        ]
    )
    inner = np.array(
        [
            (-0.85 * w, 0.0),
            (-0.3 * w, -0.15 * lip),
            (0.0, -0.12 * lip),
            (0.3 * w, -0.15 * lip),
            (0.85 * w, 0.0),
            (0.3 * w, 0.15 * lip),
            (0.0, 0.12 * lip),
            (-0.3 * w, 0.15 * lip),
        ]
    )
    offset = np.array([0.5, y])
    return outer + offset, inner + offset


def place_landmarks(unit: np.ndarray, face_width: float, centre: tuple[float, float]) -> np.ndarray:
    """Map face-unit landmarks to image pixels: the face is ``face_width`` px wide, its middle at ``centre``."""
    return (unit - np.array([0.5, 0.66])) * face_width + np.asarray(centre)


def render_face(identity: Identity, landmarks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Draw the neutral face (BGR uint8) for the given pixel landmarks.

    Drawn with Lambert-like shading over an ellipsoid head so that gradients
    look like a face to a HOG detector; supersampled, then blurred, for soft edges.
    """
    h, w = shape
    s = SUPERSAMPLE
    pts = landmarks * s
    canvas = _background(identity, (h * s, w * s))
    head = _head_polygon(pts)
    face_mask = np.zeros(canvas.shape[:2], np.uint8)
    cv2.fillPoly(face_mask, [np.round(head).astype(np.int32)], 255)
    _draw_hair(canvas, identity, pts, head)
    shading = _shading(identity, pts, canvas.shape[:2])
    skin = np.asarray(identity.skin_bgr, np.float32) * shading[..., None]
    canvas = np.where(face_mask[..., None] > 0, skin, canvas)
    _draw_features(canvas, identity, pts)
    canvas = cv2.GaussianBlur(canvas, (0, 0), 1.2 * s)
    canvas += _texture(identity, canvas.shape[:2]) * (face_mask[..., None] / 255.0)
    small = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA)
    return np.clip(np.round(small), 0, 255).astype(np.uint8)


def _background(identity: Identity, shape: tuple[int, int]) -> np.ndarray:
    """A plain wall with a soft vertical gradient."""
    h, w = shape
    ramp = np.linspace(-12.0, 12.0, h, dtype=np.float32)[:, None]
    level = identity.background_level + ramp + np.zeros((h, w), np.float32)
    return np.repeat(level[..., None], 3, axis=2)


def _head_polygon(pts: np.ndarray) -> np.ndarray:
    """Jaw line closed by a forehead arc above the brows."""
    jaw = pts[JAW]
    left, right = jaw[0], jaw[-1]
    centre_x = (left[0] + right[0]) / 2
    half = (right[0] - left[0]) / 2
    brow_top = pts[17:27, 1].min()
    top = brow_top - 0.55 * (pts[8, 1] - brow_top) * 0.5
    theta = np.linspace(0.0, np.pi, 25)
    forehead = np.stack([centre_x + half * np.cos(theta), left[1] + (top - left[1]) * np.sin(theta)], axis=1)
    return np.concatenate([jaw, forehead[1:-1]])


def _draw_hair(canvas: np.ndarray, identity: Identity, pts: np.ndarray, head: np.ndarray) -> None:
    """Hair as a darker cap around the top of the head, and a neck below the chin."""
    centre_x = (pts[0, 0] + pts[16, 0]) / 2
    half = (pts[16, 0] - pts[0, 0]) / 2
    top = head[:, 1].min()
    cap_centre = (int(centre_x), int(pts[0, 1]))
    axes = (int(half * 1.12), int((pts[0, 1] - top) * (1.12 + identity.hairline)))
    cv2.ellipse(canvas, cap_centre, axes, 0, 180, 360, (identity.hair_level,) * 3, -1, cv2.LINE_AA)
    neck_half = half * 0.55
    neck = np.array(
        [
            [centre_x - neck_half, pts[6, 1]],
            [centre_x + neck_half, pts[6, 1]],
            [centre_x + neck_half * 1.1, canvas.shape[0]],
            [centre_x - neck_half * 1.1, canvas.shape[0]],
        ]
    )
    neck_colour = tuple(float(c) * 0.7 for c in identity.skin_bgr)
    cv2.fillPoly(canvas, [np.round(neck).astype(np.int32)], neck_colour, cv2.LINE_AA)


def _shading(identity: Identity, pts: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Lambert shading of an ellipsoid fitted to the face, plus eye-socket and cheek shadows."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx = (pts[0, 0] + pts[16, 0]) / 2
    cy = (pts[27, 1] + pts[8, 1]) / 2
    ax = (pts[16, 0] - pts[0, 0]) / 2 * 1.05
    ay = (pts[8, 1] - pts[19, 1]) * 0.75
    nx, ny = (xx - cx) / ax, (yy - cy) / ay
    nz = np.sqrt(np.clip(1.0 - nx**2 - ny**2, 0.02, 1.0))
    lx, ly = identity.light_direction
    lz = np.sqrt(max(1.0 - lx**2 - ly**2, 0.1))
    lambert = np.clip(nx * lx + ny * ly + nz * lz, 0.0, 1.0)
    shade = identity.ambient + identity.light_strength * lambert
    eye_size = (pts[39, 0] - pts[36, 0]) * 1.1
    for eye in (RIGHT_EYE, LEFT_EYE):
        centre = pts[eye].mean(axis=0)
        shade -= 0.22 * _blob(xx, yy, centre, eye_size, eye_size * 0.8)
    shade -= 0.15 * _blob(xx, yy, pts[33] + np.array([0.0, 0.25 * eye_size]), eye_size * 0.8, eye_size * 0.25)
    shade -= 0.12 * _blob(xx, yy, pts[57] + np.array([0.0, 0.45 * eye_size]), eye_size * 0.7, eye_size * 0.25)
    side = np.sign(lx) if lx != 0 else 1.0
    shade -= 0.12 * _blob(xx, yy, pts[30] - np.array([side * 0.35 * eye_size, 0.0]), eye_size * 0.3, eye_size)
    return np.clip(shade, 0.15, 1.3).astype(np.float32)


def _blob(xx: np.ndarray, yy: np.ndarray, centre: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """An axis-aligned Gaussian bump of height 1."""
    return np.exp(-0.5 * (((xx - centre[0]) / sx) ** 2 + ((yy - centre[1]) / sy) ** 2))


def _draw_features(canvas: np.ndarray, identity: Identity, pts: np.ndarray) -> None:
    """Eyes, brows, nose and lips, in colours relative to the skin so every tone keeps its contrast."""
    skin = np.asarray(identity.skin_bgr)
    dark = tuple(float(c) for c in skin * 0.25)
    lip = (float(skin[0] * 0.55), float(skin[1] * 0.5), float(min(skin[2] * 0.8, 255.0)))
    sclera = tuple(float(min(c * 1.25 + 25, 235)) for c in skin)
    scale = pts[16, 0] - pts[0, 0]
    for eye in (RIGHT_EYE, LEFT_EYE):
        contour = np.round(pts[eye]).astype(np.int32)
        cv2.fillPoly(canvas, [contour], sclera, cv2.LINE_AA)
        centre = pts[eye].mean(axis=0)
        radius = round((pts[eye][:, 1].max() - pts[eye][:, 1].min()) * 0.75)
        cv2.circle(canvas, (int(centre[0]), int(centre[1])), max(radius, 2), dark, -1, cv2.LINE_AA)
        cv2.polylines(canvas, [contour[:4]], False, dark, max(int(scale * 0.012), 2), cv2.LINE_AA)
    thickness = max(int(identity.brow_thickness * scale), 2)
    hair = tuple(float(min(identity.hair_level, c * 0.4)) for c in skin)
    for brow in (RIGHT_BROW, LEFT_BROW):
        cv2.polylines(canvas, [np.round(pts[brow]).astype(np.int32)], False, hair, thickness, cv2.LINE_AA)
    nose_line = tuple(float(c) for c in skin * 0.65)
    cv2.polylines(canvas, [np.round(pts[[27, 28, 29, 30, 32]]).astype(np.int32)], False, nose_line, 2, cv2.LINE_AA)
    for nostril in (pts[32], pts[34]):
        axes = (max(int(scale * 0.02), 2), max(int(scale * 0.012), 1))
        cv2.ellipse(canvas, (int(nostril[0]), int(nostril[1])), axes, 0, 0, 360, dark, -1, cv2.LINE_AA)
    cv2.fillPoly(canvas, [np.round(pts[OUTER_LIPS]).astype(np.int32)], lip, cv2.LINE_AA)
    cv2.polylines(canvas, [np.round(pts[[60, 61, 62, 63, 64]]).astype(np.int32)], False, dark, 2, cv2.LINE_AA)


def _texture(identity: Identity, shape: tuple[int, int]) -> np.ndarray:
    """Skin texture: smooth blotches plus fine grain, fixed per identity."""
    rng = np.random.default_rng(identity.texture_seed)
    h, w = shape
    coarse = cv2.resize(rng.normal(0, 1, (h // 16 + 1, w // 16 + 1)).astype(np.float32), (w, h))
    fine = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 1.5)
    texture = identity.texture_strength * (0.7 * coarse + 0.6 * fine)
    return np.repeat(texture[..., None], 3, axis=2)
