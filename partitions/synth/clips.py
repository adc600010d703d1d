"""One synthetic micro-expression clip: timeline, motion, and the rendered frames.

Labelled motion (the AUs) is a few pixels at its apex; unlabelled motion
(blinks, head drift) and nuisance (illumination drift, sensor noise) are mixed
in so that a model has to find the label in the subtle, local part.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from .databases import AUCombo, SynthSpec, combo
from .face import Identity, landmarks_unit, place_landmarks, render_face
from .motion import AU_MOVES, BLINK_MOVES, MotionModel, control_points, ease_curve, warp

MAX_HEAD_ROTATION = np.deg2rad(0.4)
MAX_HEAD_SHIFT = 0.8  # pixels


@dataclass(frozen=True)
class Timeline:
    """Frame numbers of a clip, as they appear in file names and sheets."""

    first: int
    onset: int
    apex: int
    offset: int
    last: int

    @property
    def frame_numbers(self) -> np.ndarray:
        return np.arange(self.first, self.last + 1)


@dataclass
class ClipPlan:
    """Everything random about one clip, drawn up front so rendering is a pure function of it."""

    emotion: str
    action_units: AUCombo
    timeline: Timeline
    face_width: float
    face_centre: tuple[float, float]
    au_intensity: dict[int, float]
    blink: tuple[float, float, float] | None  # onset, apex, offset frame numbers
    head_phase: np.ndarray  # (3, 2): per rigid parameter, amplitude fraction and phase
    noise_sigma: float
    drift_phase: float
    noise_seed: int


def draw_timeline(spec: SynthSpec, rng: np.random.Generator, first: int) -> Timeline:
    """Onset-apex-offset at real ME durations: rise 40-150 ms, whole ME 150-480 ms, neutral margins around it."""
    rise = spec.frames_for(rng.uniform(40, 150))
    fall = spec.frames_for(rng.uniform(110, 330))
    before = spec.frames_for(rng.uniform(40, 120)) + 1
    after = spec.frames_for(rng.uniform(30, 100)) + 1
    onset = first + before
    apex = onset + rise
    offset = apex + fall
    return Timeline(first=first, onset=onset, apex=apex, offset=offset, last=offset + after)


def draw_emotion(spec: SynthSpec, rng: np.random.Generator) -> tuple[str, AUCombo]:
    """An emotion from the database's imbalanced prior, then one of its AU combinations."""
    names = list(spec.emotion_prior)
    prior = np.array([spec.emotion_prior[n] for n in names], np.float64)
    emotion = names[int(rng.choice(len(names), p=prior / prior.sum()))]
    weights, codes = zip(*spec.rules[emotion], strict=True)
    code = codes[int(rng.choice(len(codes), p=np.asarray(weights) / np.sum(weights)))]
    return emotion, combo(code)


def plan_clip(spec: SynthSpec, rng: np.random.Generator, face_width: float, first: int) -> ClipPlan:
    """Draw a clip's emotion, timing and nuisance motion."""
    emotion, action_units = draw_emotion(spec, rng)
    timeline = draw_timeline(spec, rng, first)
    height, width = spec.frame_size
    peak = rng.uniform(*spec.intensity)
    blink = None
    if rng.random() < spec.blink_probability:
        start = rng.uniform(timeline.first, timeline.last)
        blink = (start, start + spec.frames_for(50) + 0.5, start + spec.frames_for(140) + 1.0)
    return ClipPlan(
        emotion=emotion,
        action_units=action_units,
        timeline=timeline,
        face_width=face_width * rng.uniform(0.985, 1.015),
        face_centre=(width / 2 + rng.uniform(-4, 4), height / 2 + rng.uniform(-2, 6)),
        au_intensity={au: peak * rng.uniform(0.9, 1.1) for au, _ in action_units},
        blink=blink,
        head_phase=np.stack([rng.uniform(0.2, 1.0, 3), rng.uniform(0, 2 * np.pi, 3)], axis=1),
        noise_sigma=rng.uniform(*spec.noise_sigma),
        drift_phase=rng.uniform(0, 2 * np.pi),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def build_motion(plan: ClipPlan, neutral_landmarks: np.ndarray, image_shape: tuple[int, int]) -> MotionModel:
    """The clip's motion model: one group per AU, one for the blink, plus the head's rigid drift."""
    groups = [(AU_MOVES[au], side) for au, side in plan.action_units]
    frames = plan.timeline.frame_numbers
    tl = plan.timeline
    curves = [ease_curve(frames, tl.onset, tl.apex, tl.offset) * plan.au_intensity[au] for au, _ in plan.action_units]
    if plan.blink is not None:
        groups.append((BLINK_MOVES, None))
        curves.append(ease_curve(frames, *plan.blink))
    parts = [control_points(moves, neutral_landmarks, plan.face_width, side) for moves, side in groups]
    sizes = [len(p[2]) for p in parts]
    span = max(len(frames) - 1, 1)
    phase = 2 * np.pi * (frames - frames[0]) / (2.5 * span)
    amplitudes = np.array([MAX_HEAD_ROTATION, MAX_HEAD_SHIFT, MAX_HEAD_SHIFT]) * plan.head_phase[:, 0]
    rigid = amplitudes[None] * np.sin(phase[:, None] + plan.head_phase[None, :, 1])
    rigid -= rigid[:1]  # the first frame is the neutral pose
    return MotionModel(
        frame_numbers=frames,
        neutral_landmarks=neutral_landmarks,
        centres=np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 2)),
        vectors=np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, 2)),
        radii=np.concatenate([p[2] for p in parts]) if parts else np.zeros(0),
        group=np.repeat(np.arange(len(parts)), sizes),
        curves=np.stack(curves, axis=1) if curves else np.zeros((len(frames), 0)),
        rigid=rigid,
        face_centre=np.asarray(plan.face_centre, np.float64),
        image_shape=np.asarray(image_shape),
    )


def neutral_image(spec: SynthSpec, identity: Identity, plan: ClipPlan) -> tuple[np.ndarray, np.ndarray]:
    """The identity's neutral face for this clip's placement (grey for SAMM), and its 68 landmarks."""
    landmarks = place_landmarks(landmarks_unit(identity), plan.face_width, plan.face_centre)
    image = render_face(identity, landmarks, spec.frame_size)
    if not spec.colour:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return image, landmarks


def render_frames(spec: SynthSpec, neutral: np.ndarray, motion: MotionModel, plan: ClipPlan) -> Iterator[np.ndarray]:
    """Yield the clip's frames (uint8) in order: warp, then illumination drift, then sensor noise."""
    rng = np.random.default_rng(plan.noise_seed)
    ramp = np.linspace(-1.0, 1.0, spec.frame_size[1], dtype=np.float32)[None, :]
    count = len(motion.frame_numbers)
    neutral_f = neutral.astype(np.float32)
    pullback = None
    for row in range(count):
        pullback = motion.pullback(row, start=pullback)
        frame = warp(neutral_f, pullback)
        drift = spec.illumination_drift * np.sin(2 * np.pi * row / (3.0 * count) + plan.drift_phase)
        gain = 1.0 + drift + 0.5 * drift * ramp
        if frame.ndim == 3:  # one gain per channel laid out, so the product's inner loop runs along the row
            gain = np.repeat(gain[..., None], frame.shape[2], axis=2)
        noise = rng.normal(0.0, plan.noise_sigma, frame.shape).astype(np.float32)
        lit = frame * gain  # then in place: round(frame * gain + noise) clipped to 0..255
        lit += noise
        yield np.clip(np.round(lit, out=lit), 0, 255, out=lit).astype(np.uint8)
