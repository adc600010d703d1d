"""Face detection, 68 landmarks and eye-centre alignment (dlib + OpenCV).

The geometry follows common ME pipelines (MOL, Shao et al., TPAMI 2025): dlib's
HOG frontal detector finds the face on one reference frame, the 68-point
shape predictor (iBUG-68 layout) marks it, and a similarity transform built
from the two eye centres maps every frame of the clip into a square crop.
The transform is computed once per clip: re-aligning each frame would move
the crop by more than a micro-expression moves the face.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from .errors import DataError

# iBUG-68: indices 36-41 outline the eye on the image's left (the subject's right), 42-47 the other one.
IMAGE_LEFT_EYE = slice(36, 42)
IMAGE_RIGHT_EYE = slice(42, 48)

# Horizontal mirror of the iBUG-68 layout: point i of a flipped face is point FLIP_PERMUTATION[i] of the original.
FLIP_PERMUTATION: tuple[int, ...] = (
    *range(16, -1, -1),  # jaw 0..16
    26, 25, 24, 23, 22, 21, 20, 19, 18, 17,  # brows 17..26
    27, 28, 29, 30,  # nose bridge
    35, 34, 33, 32, 31,  # nose base 31..35
    45, 44, 43, 42, 47, 46,  # eye 36..41 <-> 42..47
    39, 38, 37, 36, 41, 40,
    54, 53, 52, 51, 50, 49, 48,  # outer lip 48..54
    59, 58, 57, 56, 55,  # outer lip 55..59
    64, 63, 62, 61, 60,  # inner lip 60..64
    67, 66, 65,  # inner lip 65..67
)


@dataclass(frozen=True)
class AlignConfig:
    """Where the eye centres land in the crop, as fractions of its side (image-left eye first).

    The defaults put the eye centres 0.30 of the side apart at 0.34 from the top, so brows, the jaw line and
    the chin (AU17) stay inside the crop: eye-to-chin is about 1.9 inter-ocular distances on adult faces.
    """

    size: int = 128
    left_eye: tuple[float, float] = (0.35, 0.34)
    right_eye: tuple[float, float] = (0.65, 0.34)


@dataclass(frozen=True)
class FaceRect:
    """A face box in frame pixels (dlib's rectangle, kept as plain ints so it pickles)."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def area(self) -> int:
        """Box area; the largest face wins when several are found."""
        return max(0, self.right - self.left) * max(0, self.bottom - self.top)


def shape_predictor_path() -> Path:
    """The 68-landmark model shipped by ``face-recognition-models``.

    Found through the import system without importing the package: its
    ``__init__`` needs ``pkg_resources``, which modern setuptools no longer has.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "models" / "shape_predictor_68_face_landmarks.dat"
        if path.is_file():
            return path
    raise DataError(
        "shape_predictor_68_face_landmarks.dat not found: install the face-recognition-models package "
        "(pip install face-recognition-models==0.3.0) into this environment"
    )


class FaceModels:
    """dlib's HOG detector and 68-point predictor, loaded once per process (about a second)."""

    def __init__(self, predictor_path: Path | None = None) -> None:
        import dlib

        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(predictor_path or shape_predictor_path()))

    def detect(self, gray: np.ndarray, upsamples: tuple[int, ...] = (0, 1)) -> FaceRect | None:
        """Largest frontal face, trying each upsampling level in turn (0 is fast, 1 finds small faces)."""
        for upsample in upsamples:
            found = self.detector(gray, upsample)
            if len(found):
                best = max(found, key=lambda r: r.width() * r.height())
                return FaceRect(best.left(), best.top(), best.right(), best.bottom())
        return None

    def landmarks(self, gray: np.ndarray, rect: FaceRect) -> np.ndarray:
        """68 (x, y) points in frame pixels, float32, for the face inside ``rect``."""
        shape = self.predictor(gray, self._dlib.rectangle(rect.left, rect.top, rect.right, rect.bottom))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


@lru_cache(maxsize=1)
def face_models() -> FaceModels:
    """This process's models: a worker loads them on its first clip and keeps them."""
    return FaceModels()


def whole_frame_rect(gray: np.ndarray) -> FaceRect:
    """The whole frame as face box: the fallback for pre-cropped releases where HOG finds nothing."""
    height, width = gray.shape[:2]
    return FaceRect(0, 0, width - 1, height - 1)


def eye_centres(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of each eye's six iBUG-68 points, image-left eye first (as MOL's ``align_face``)."""
    return landmarks[IMAGE_LEFT_EYE].mean(axis=0), landmarks[IMAGE_RIGHT_EYE].mean(axis=0)


def similarity_from_eyes(left: np.ndarray, right: np.ndarray, config: AlignConfig) -> np.ndarray:
    """2x3 similarity (rotation, uniform scale, shift) sending the eye centres to their configured spots.

    Uses complex arithmetic: ``z = dst_vector / src_vector`` is the scaled rotation.
    """
    src_left, src_right = complex(*map(float, left)), complex(*map(float, right))
    dst_left = complex(*config.left_eye) * config.size
    dst_right = complex(*config.right_eye) * config.size
    if abs(src_right - src_left) < 1e-6:
        raise ValueError("eye centres coincide: no alignment is defined")
    z = (dst_right - dst_left) / (src_right - src_left)
    shift = dst_left - z * src_left
    return np.array([[z.real, -z.imag, shift.real], [z.imag, z.real, shift.imag]], dtype=np.float64)


def resize_transform(shape: tuple[int, ...], size: int) -> np.ndarray:
    """2x3 transform squeezing a whole frame into the crop: last resort when the eyes give no alignment."""
    height, width = shape[:2]
    return np.array([[size / width, 0.0, 0.0], [0.0, size / height, 0.0]], dtype=np.float64)


def warp(gray: np.ndarray, transform: np.ndarray, size: int) -> np.ndarray:
    """Apply the clip's crop transform to one frame (bilinear; borders replicate so no black wedges)."""
    return cv2.warpAffine(gray, transform, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def to_crop(points: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Points in frame pixels -> crop pixels, as a new array.

    Each crop gets its own copy: MOL's release subtracts the crop offset from
    an aliased array, so every crop inherits the offsets of the ones before.
    """
    points = np.asarray(points, dtype=np.float64)
    return (points @ transform[:, :2].T + transform[:, 2]).astype(np.float32)


def mirror_landmarks(points: np.ndarray, width: float) -> np.ndarray:
    """Landmarks of the horizontally flipped image: x -> width - x, then swap left/right points.

    ``width`` is the mirror span: ``size - 1`` for pixel coordinates, ``1`` for normalised ones.
    Works on (..., 68, 2) arrays or tensors.
    """
    mirrored = points[..., list(FLIP_PERMUTATION), :].clone() if hasattr(points, "clone") else (
        points[..., list(FLIP_PERMUTATION), :].copy()
    )
    mirrored[..., 0] = width - mirrored[..., 0]
    return mirrored
