"""Face geometry: eye alignment, per-crop landmark copies, iBUG-68 mirroring, dlib on synthetic faces."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from partitions.cache import PrepareConfig, process_sample
from partitions.face import (
    FLIP_PERMUTATION,
    AlignConfig,
    mirror_landmarks,
    shape_predictor_path,
    similarity_from_eyes,
    to_crop,
    warp,
)
from partitions.flow import endpoint_error, flow_to_crop
from partitions.records import Sample
from partitions.sampling import plan_sampling

SMALL = PrepareConfig(t=4, align=AlignConfig(size=64))


def test_shape_predictor_found_without_importing_the_package() -> None:
    path = shape_predictor_path()
    assert path.name == "shape_predictor_68_face_landmarks.dat" and path.stat().st_size > 1_000_000


@pytest.mark.parametrize("angle", [-20.0, 0.0, 13.0])
def test_eyes_land_where_configured(angle: float) -> None:
    config = AlignConfig(size=128, left_eye=(0.3, 0.4), right_eye=(0.7, 0.4))
    theta = np.deg2rad(angle)
    left = np.array([210.0, 180.0])
    right = left + 85.0 * np.array([np.cos(theta), np.sin(theta)])
    transform = similarity_from_eyes(left, right, config)
    mapped = to_crop(np.stack([left, right]), transform)
    np.testing.assert_allclose(mapped, [[38.4, 51.2], [89.6, 51.2]], atol=1e-4)
    assert transform[0, 0] == pytest.approx(transform[1, 1]) and transform[0, 1] == pytest.approx(-transform[1, 0])

    # The pixels follow: two dots drawn at the eyes end up at the configured spots in the crop.
    frame = np.zeros((480, 640), np.uint8)
    for x, y in (left, right):
        cv2.circle(frame, (round(x), round(y)), 4, 255, -1)
    crop = warp(frame, transform, config.size)
    for target in ((38.4, 51.2), (89.6, 51.2)):
        x0, y0 = int(target[0]) - 8, int(target[1]) - 8
        window = crop[y0 : y0 + 17, x0 : x0 + 17].astype(float)
        ys, xs = np.mgrid[y0 : y0 + 17, x0 : x0 + 17]
        centroid = ((xs * window).sum() / window.sum(), (ys * window).sum() / window.sum())
        np.testing.assert_allclose(centroid, target, atol=0.75)


def test_landmarks_are_copied_per_crop() -> None:
    points = np.random.default_rng(0).uniform(50, 300, size=(68, 2)).astype(np.float32)
    original = points.copy()
    transform = similarity_from_eyes(points[36:42].mean(0), points[42:48].mean(0), AlignConfig())
    crops = [to_crop(points, transform) for _ in range(8)]
    for crop in crops[1:]:
        np.testing.assert_array_equal(crop, crops[0])  # no offset carried from one crop to the next
    crops[0] += 100.0
    np.testing.assert_array_equal(points, original)  # the source is never modified
    np.testing.assert_array_equal(crops[1], crops[2])


def test_static_clip_gives_identical_landmarks_in_every_crop(tmp_path: Path) -> None:
    """End to end: identical frames must give identical crop landmarks (MOL's release drifts them)."""
    texture = cv2.GaussianBlur((np.random.default_rng(1).random((150, 130)) * 255).astype(np.uint8), (0, 0), 2)
    frames = []
    for n in range(1, 7):
        path = tmp_path / f"img{n}.png"
        cv2.imwrite(str(path), texture)
        frames.append(path)
    sample = Sample("casme2", "sub01", "EP01", tuple(frames), tuple(range(1, 7)), 200.0, "others", precropped=True)
    arrays = process_sample(sample, SMALL)
    assert bool(arrays["face_fallback"])  # noise has no face: pre-cropped frames fall back to the whole frame
    for landmarks in arrays["landmarks"][1:]:
        np.testing.assert_array_equal(landmarks, arrays["landmarks"][0])
    assert np.abs(arrays["flow"].astype(np.float32)).max() < 0.05


def test_exact_flow_moves_into_crop_coordinates() -> None:
    """Frame flow p -> F p (affine) seen through the crop transform M is c -> M F M^-1 c, exactly."""
    forward = np.vstack([cv2.getRotationMatrix2D((200.0, 150.0), 1.5, 1.02), [0, 0, 1]])
    forward[:2, 2] += (2.0, -1.0)
    ys, xs = np.mgrid[0:480, 0:640].astype(np.float64)  # large enough that the crop never leaves the frame
    frame_flow = np.stack([forward[0, 0] * xs + forward[0, 1] * ys + forward[0, 2] - xs,
                           forward[1, 0] * xs + forward[1, 1] * ys + forward[1, 2] - ys], axis=-1)
    crop = similarity_from_eyes(np.array([160.0, 130.0]), np.array([235.0, 118.0]), AlignConfig())
    crop3 = np.vstack([crop, [0, 0, 1]])
    expected_map = crop3 @ forward @ np.linalg.inv(crop3)
    cy, cx = np.mgrid[0:128, 0:128].astype(np.float64)
    expected = np.stack([expected_map[0, 0] * cx + expected_map[0, 1] * cy + expected_map[0, 2] - cx,
                         expected_map[1, 0] * cx + expected_map[1, 1] * cy + expected_map[1, 2] - cy])
    moved = flow_to_crop(frame_flow.astype(np.float32), crop, 128)
    assert moved.shape == (2, 128, 128)
    np.testing.assert_allclose(moved, expected, atol=2e-3)
    assert endpoint_error(moved[None], expected[None]) < 1e-3


def test_flip_permutation_is_a_mirror_involution() -> None:
    permutation = np.array(FLIP_PERMUTATION)
    assert sorted(permutation) == list(range(68))
    np.testing.assert_array_equal(permutation[permutation], np.arange(68))
    assert FLIP_PERMUTATION[36] == 45 and FLIP_PERMUTATION[48] == 54 and FLIP_PERMUTATION[0] == 16
    assert FLIP_PERMUTATION[30] == 30 and FLIP_PERMUTATION[8] == 8
    points = np.random.default_rng(2).uniform(0, 1, size=(3, 68, 2)).astype(np.float32)
    np.testing.assert_allclose(mirror_landmarks(mirror_landmarks(points, 1.0), 1.0), points, atol=1e-6)
    mirrored = mirror_landmarks(points, 1.0)
    np.testing.assert_allclose(mirrored[:, 45, 0], 1.0 - points[:, 36, 0])
    np.testing.assert_allclose(mirrored[:, 45, 1], points[:, 36, 1])


def test_dlib_pipeline_finds_synthetic_faces(tmp_path: Path) -> None:
    """HOG finds the synthetic face on every clip's reference frame, and the 68 points land near the exact ones."""
    from partitions.face import face_models
    from partitions.labels import load_site
    from partitions.synth.ground_truth import load_ground_truth
    from partitions.synth.writer import synthesise

    written = synthesise(tmp_path / "synth", seed=3, sites=["casme2", "samm", "smic"], subjects=2,
                         clips_per_subject=2, progress=False)
    models = face_models()
    found, nmes = [], []
    for database, root in written.items():
        for sample in load_site(database, root).samples:
            reference = plan_sampling(sample, 8).lo
            gray = cv2.imread(str(sample.frames[reference]), cv2.IMREAD_GRAYSCALE)
            rect = models.detect(gray, (0, 1))
            found.append(rect is not None)
            if rect is None:
                continue
            exact = load_ground_truth(sample.frames[reference].parent).landmarks(sample.frame_numbers[reference])
            centre = exact.mean(axis=0)
            assert rect.left <= centre[0] <= rect.right and rect.top <= centre[1] <= rect.bottom, sample.key
            predicted = models.landmarks(gray, rect)
            nmes.append(np.linalg.norm(predicted - exact, axis=1).mean() / np.linalg.norm(exact[36] - exact[45]))
    assert len(found) == 12 and all(found), f"faces found on {sum(found)} of {len(found)} clips"
    assert max(nmes) < 0.15, f"landmark NME per clip {np.round(nmes, 3)}"
