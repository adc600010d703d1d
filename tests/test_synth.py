"""The synthetic-database writer (``partitions/synth``): determinism, reuse, readers, exact motion, FACS locality,
ME timing, detectable identities, non-IID sites and the sheet quirks the readers rely on.

Facts checked against ``shared/reference/datasets.md``: frame rates, layouts, sheet shapes and the emotion
counts of CASME II and SAMM. Synthetic trees are tiny (2 subjects, 1-2 clips) and written once per module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from openpyxl import load_workbook

from partitions.adapters import get_adapter
from partitions.errors import DataError
from partitions.labels import load_site
from partitions.records import Sample
from partitions.synth.clips import ClipPlan, build_motion, draw_timeline, neutral_image, plan_clip
from partitions.synth.databases import SPECS, SynthSpec, combo
from partitions.synth.face import landmarks_unit, place_landmarks, random_identity, render_face
from partitions.synth.ground_truth import load_ground_truth, save_ground_truth
from partitions.synth.layouts import LAYOUTS, ClipRecord
from partitions.synth.motion import AU_MOVES, MotionModel, warp
from partitions.synth.writer import MANIFEST, SITE_ORDER, detectable, subject_identity, synthesise

SEED = 2024
SITES = ("casme2", "samm", "smic", "casme3")
FRAME_SUFFIXES = {".jpg", ".bmp"}
BROWS = list(range(17, 27))
EYES = list(range(36, 48))
MOUTH = list(range(48, 68))
STILL = 0.05  # px: "does not move"


# ----------------------------------------------------------------------------- shared trees


def write_sites(out: Path, seed: int = SEED, workers: int = 2) -> dict[str, Path]:
    """CASME II, SAMM and SMIC with 2 subjects x 1 clip; CAS(ME)^3 with 2 subjects x 2 clips (two MEs per task)."""
    paths = synthesise(out, seed, ("casme2", "samm", "smic"), 2, 1, workers=workers, progress=False)
    paths |= synthesise(out, seed, ("casme3",), 2, 2, workers=workers, progress=False)
    return paths


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sites(tmp_path_factory.mktemp("synth") / "out")


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same arguments written again to another folder."""
    return write_sites(tmp_path_factory.mktemp("twin") / "out")


@pytest.fixture(scope="module")
def single_worker(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sites(tmp_path_factory.mktemp("single") / "out", workers=1)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


def records(root: Path) -> list[ClipRecord]:
    """The manifest's clips as the layouts' records."""
    return [
        ClipRecord(**{**clip, "action_units": tuple((n, side) for n, side in clip["action_units"])})
        for clip in manifest(root)["clips"]
    ]


def clip_frame(site: str, root: Path, record: ClipRecord, number: int) -> Path:
    layout = LAYOUTS[site]
    return layout.clip_dir(root, record) / layout.frame_name(record, number)


# ----------------------------------------------------------------------------- 1. determinism


def assert_same_trees(a: dict[str, Path], b: dict[str, Path]) -> None:
    assert a.keys() == b.keys() == set(SITES)
    for site in SITES:
        left, right = tree_bytes(a[site]), tree_bytes(b[site])
        assert left.keys() == right.keys(), site
        assert any(name.endswith(".xlsx") for name in left) or site == "smic"
        differing = [name for name in left if left[name] != right[name]]
        assert not differing, f"{site}: files differ: {differing[:5]}"


def test_same_arguments_give_byte_identical_trees(sites: dict[str, Path], twin: dict[str, Path]) -> None:
    assert_same_trees(sites, twin)


def test_worker_count_does_not_change_bytes(sites: dict[str, Path], single_worker: dict[str, Path]) -> None:
    assert_same_trees(sites, single_worker)


def test_different_seed_gives_different_frames(sites: dict[str, Path], tmp_path: Path) -> None:
    other = synthesise(tmp_path, SEED + 1, ("casme3",), 2, 2, workers=1, progress=False)["casme3"]

    def frame_hashes(root: Path) -> set[str]:
        return {hashlib.sha1(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.suffix in FRAME_SUFFIXES}

    base = frame_hashes(sites["casme3"])
    assert base and frame_hashes(other) and not base & frame_hashes(other)
    first = records(sites["casme3"])[0]
    first_other = records(other)[0]
    a = cv2.imread(str(clip_frame("casme3", sites["casme3"], first, first.onset)), cv2.IMREAD_GRAYSCALE)
    b = cv2.imread(str(clip_frame("casme3", other, first_other, first_other.onset)), cv2.IMREAD_GRAYSCALE)
    assert np.abs(a.astype(float) - b).mean() > 5.0  # another identity, not just other noise


# ----------------------------------------------------------------------------- 2. reuse and safety


def mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_same_settings_reuse_the_written_sites(sites: dict[str, Path]) -> None:
    out = sites["casme2"].parent
    before = mtimes(out)
    assert len(before) > 50
    again = write_sites(out)
    assert again == sites
    assert mtimes(out) == before


def test_other_settings_on_an_existing_site_are_refused(tmp_path: Path) -> None:
    root = synthesise(tmp_path, SEED, ("casme3",), 1, 1, workers=1, progress=False)["casme3"]
    before = tree_bytes(root)
    for seed, subjects, clips in ((SEED + 1, 1, 1), (SEED, 2, 1), (SEED, 1, 2)):
        with pytest.raises(DataError) as error:
            synthesise(tmp_path, seed, ("casme3",), subjects, clips, workers=1, progress=False)
        assert str(root) in str(error.value)
    assert tree_bytes(root) == before


def test_a_folder_not_written_by_synth_is_refused_and_left_alone(tmp_path: Path) -> None:
    real = tmp_path / "samm"
    (real / "006").mkdir(parents=True)
    (real / "006" / "keep.txt").write_text("real data")
    with pytest.raises(DataError) as error:
        synthesise(tmp_path, SEED, ("samm",), 1, 1, workers=1, progress=False)
    assert str(real) in str(error.value)
    assert sorted(p.name for p in real.rglob("*")) == ["006", "keep.txt"]
    assert (real / "006" / "keep.txt").read_text() == "real data"


def test_unknown_site_is_refused_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(DataError, match="casme4"):
        synthesise(out, SEED, ("casme3", "casme4"), 1, 1, workers=1, progress=False)
    assert not out.exists()
    with pytest.raises(DataError):
        synthesise(out, SEED, ("casme3",), 0, 1, workers=1, progress=False)


def test_no_partial_folder_remains(sites: dict[str, Path], tmp_path: Path) -> None:
    assert sorted(p.name for p in sites["casme2"].parent.iterdir()) == sorted(SITES)
    stale = tmp_path / ".casme3.partial"
    (stale / "spNO.9").mkdir(parents=True)  # left by an interrupted run
    synthesise(tmp_path, SEED, ("casme3",), 1, 1, workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["casme3"]


# ----------------------------------------------------------------------------- 3. readers


def sample_of(site: str, root: Path, record: ClipRecord, samples: list[Sample]) -> Sample:
    """The one sample whose frames lie in the record's folder and within its first..last frames."""
    folder = LAYOUTS[site].clip_dir(root, record).resolve()
    found = [
        s
        for s in samples
        if s.frames
        and {p.parent.resolve() for p in s.frames} == {folder}
        and record.first <= min(s.frame_numbers) <= max(s.frame_numbers) <= record.last
    ]
    assert len(found) == 1, f"{site} clip {record}: {len(found)} matching samples"
    return found[0]


@pytest.mark.parametrize("site", SITES)
def test_readers_see_every_written_clip_as_recorded(site: str, sites: dict[str, Path]) -> None:
    root = sites[site]
    written = records(root)
    labelled = load_site(site, root, labels="native")
    assert labelled.skipped == []
    assert len(labelled.samples) == len(labelled.targets) == len(written) == len(manifest(root)["clips"])
    assert len({s.key for s in labelled.samples}) == len(written)
    for record in written:
        sample = sample_of(site, root, record, labelled.samples)
        target = labelled.targets[labelled.samples.index(sample)]
        assert sample.emotion == record.emotion.lower()
        assert labelled.space.classes[target] == record.emotion.lower()
        assert sample.fps == SPECS[site].fps == manifest(root)["fps"]
        numbers = list(sample.frame_numbers)
        assert numbers == list(range(numbers[0], numbers[-1] + 1))  # ordered, no gap
        assert set(range(record.onset, record.offset + 1)) <= set(numbers)
        if site == "casme3":  # a task folder holds the whole recording: the reader cuts onset..offset
            assert numbers == list(range(record.onset, record.offset + 1))
        else:
            assert numbers == list(range(record.first, record.last + 1))
        assert [p.name for p in sample.frames] == [LAYOUTS[site].frame_name(record, n) for n in numbers]
        assert all(p.is_file() for p in sample.frames)
        if site == "smic":  # no apex annotation and no AUs in SMIC
            assert (sample.onset, sample.apex, sample.offset, sample.action_units) == (None, None, None, ())
        else:
            assert (sample.onset, sample.apex, sample.offset) == (record.onset, record.apex, record.offset)
            assert [(au.number, au.side) for au in sample.action_units] == list(record.action_units)


# ----------------------------------------------------------------------------- 4. exact motion


def make_clip(
    code: str = "12", intensity: float = 1.0, spec: SynthSpec = SPECS["casme2"], seed: int = 0, width: float = 128.0
) -> tuple[ClipPlan, np.ndarray, MotionModel]:
    """A clip with chosen AUs at a chosen intensity, no blink; head motion as drawn."""
    rng = np.random.default_rng(seed)
    identity = random_identity(rng)
    plan = plan_clip(spec, rng, width, first=1)
    units = combo(code)
    plan = dataclasses.replace(
        plan, action_units=units, au_intensity={au: intensity for au, _ in units}, blink=None, face_width=width
    )
    neutral, landmarks = neutral_image(spec, identity, plan)
    return plan, neutral, build_motion(plan, landmarks, spec.frame_size)


def pixel_grid(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx, yy], axis=-1).astype(np.float64)


@pytest.fixture(scope="module")
def clip() -> tuple[ClipPlan, np.ndarray, MotionModel]:
    return make_clip("1+2+12", seed=3)


def test_forward_inverts_pullback(clip: tuple[ClipPlan, np.ndarray, MotionModel]) -> None:
    plan, _neutral, motion = clip
    h, w = (int(v) for v in motion.image_shape)
    grid = pixel_grid(h, w)
    apex = motion.frame_row(plan.timeline.apex)
    assert np.abs(motion.rigid[apex]).max() > 0.05  # head motion is part of what is inverted
    for row in (motion.frame_row(plan.timeline.onset + 1), apex, len(motion.frame_numbers) - 1):
        pullback = motion.pullback(row)
        assert np.abs(pullback - grid).max() > (1.0 if row == apex else 0.0)  # the frame does move
        back = motion.forward(pullback.reshape(-1, 2).astype(np.float64), row).reshape(h, w, 2)
        assert np.abs(back - grid).max() < 1e-3


@pytest.mark.parametrize("site", SITES)
def test_pullback_stays_exact_at_the_strongest_drawn_intensity(site: str) -> None:
    """Renderer and ground truth must agree for every clip the spec can draw, including its strongest AU10."""
    spec = SPECS[site]
    rng = np.random.default_rng(4)
    top = max(max(plan_clip(spec, rng, 128.0, first=1).au_intensity.values()) for _ in range(300))
    code = next(code for options in spec.rules.values() for _w, code in options if code in ("9+10", "10"))
    errors = []
    for seed in range(3):
        plan, _neutral, motion = make_clip(code, top, spec=spec, seed=seed)
        row = motion.frame_row(plan.timeline.apex)
        h, w = (int(v) for v in motion.image_shape)
        back = motion.forward(motion.pullback(row).reshape(-1, 2).astype(np.float64), row).reshape(h, w, 2)
        errors.append(float(np.abs(back - pixel_grid(h, w)).max()))
    assert max(errors) < 1e-3, f"{site} AU {code} at intensity {top:.2f}: forward(pullback) off by {errors} px"


def test_flow_warps_one_noise_free_frame_onto_another(clip: tuple[ClipPlan, np.ndarray, MotionModel]) -> None:
    plan, neutral, motion = clip
    neutral_f = neutral.astype(np.float32)
    a, b = 0, motion.frame_row(plan.timeline.apex)
    frame_a, frame_b = (warp(neutral_f, motion.pullback(row)) for row in (a, b))
    flow = motion.flow(a, b)
    h, w = frame_a.shape[:2]
    grid = pixel_grid(h, w).astype(np.float32)
    warped = cv2.remap(frame_b, grid[..., 0] + flow[..., 0], grid[..., 1] + flow[..., 1], cv2.INTER_LINEAR)
    inner = np.zeros((h, w), bool)
    inner[8:-8, 8:-8] = True
    region = inner & (np.abs(frame_b - frame_a).max(axis=-1) > 2.0)  # the pixels the motion changes
    assert region.sum() > 500
    with_flow = np.abs(warped - frame_a)[region].mean()
    without = np.abs(frame_b - frame_a)[region].mean()
    assert with_flow < 0.3 * without, (with_flow, without)
    # flow at a landmark of frame a leads to the same landmark in frame b
    landmarks_a, landmarks_b = motion.landmarks(a), motion.landmarks(b)
    at = cv2.remap(flow, landmarks_a[:, 0:1], landmarks_a[:, 1:2], cv2.INTER_LINEAR)[:, 0]
    assert np.abs(landmarks_a + at - landmarks_b).max() < 0.1


def test_flow_at_any_point_is_the_pixel_flow_and_lands_where_the_point_moves(
    clip: tuple[ClipPlan, np.ndarray, MotionModel],
) -> None:
    """``flow_at`` (the exact flow at a crop's pixels, which are not frame pixels) agrees with ``flow`` on pixels,
    and off the pixel grid its flows from a to b and back compose to no motion."""
    plan, _neutral, motion = clip
    a, b = motion.frame_row(plan.timeline.onset), motion.frame_row(plan.timeline.apex)
    h, w = (int(v) for v in motion.image_shape)
    pixels = pixel_grid(h, w).reshape(-1, 2)[::7]
    flow = motion.flow(a, b).reshape(-1, 2)[::7]
    assert np.abs(flow).max() > 1.0  # the clip moves between these frames
    assert np.abs(motion.flow_at(pixels, a, b) - flow).max() < 1e-3

    between = pixels + np.array([0.37, 0.61])  # off the grid, where a pixel flow would be interpolated
    there = between + motion.flow_at(between, a, b)
    back = there + motion.flow_at(there, b, a)  # exact flow both ways: the round trip ends where it began
    assert np.abs(back - between).max() < 1e-3


def test_landmarks_are_the_forward_map_of_the_neutral_ones(clip: tuple[ClipPlan, np.ndarray, MotionModel]) -> None:
    plan, _neutral, motion = clip
    for row in range(len(motion.frame_numbers)):
        expected = motion.forward(motion.neutral_landmarks, row)
        assert np.abs(motion.landmarks(row) - expected).max() < 1e-4
    np.testing.assert_allclose(motion.landmarks(0), motion.neutral_landmarks, atol=1e-4)  # first frame: neutral
    apex = motion.frame_row(plan.timeline.apex)
    assert np.abs(motion.landmarks(apex) - motion.neutral_landmarks).max() > 2.0


def test_ground_truth_round_trip(clip: tuple[ClipPlan, np.ndarray, MotionModel], tmp_path: Path) -> None:
    plan, _neutral, motion = clip
    assert load_ground_truth(tmp_path) is None  # real data has no ground truth
    save_ground_truth(tmp_path / "ground_truth.npz", motion)
    loaded = load_ground_truth(tmp_path)
    assert loaded is not None
    tl = plan.timeline
    with np.load(tmp_path / "ground_truth.npz") as arrays:
        stored = arrays["landmarks"]
    assert stored.shape == (len(tl.frame_numbers), 68, 2)
    for number in (tl.first, tl.onset, tl.apex, tl.offset, tl.last):
        row = motion.frame_row(number)
        np.testing.assert_array_equal(loaded.landmarks(number), motion.landmarks(row))
        np.testing.assert_array_equal(stored[row], motion.landmarks(row))
    np.testing.assert_allclose(
        loaded.flow(tl.onset, tl.apex),
        motion.flow(motion.frame_row(tl.onset), motion.frame_row(tl.apex)),
        atol=1e-4,
    )
    with pytest.raises(KeyError):
        loaded.landmarks(tl.last + 1)


def test_casme3_task_folder_answers_for_both_mes(sites: dict[str, Path]) -> None:
    root = sites["casme3"]
    by_folder: dict[Path, list[ClipRecord]] = {}
    for record in records(root):
        by_folder.setdefault(LAYOUTS["casme3"].clip_dir(root, record), []).append(record)
    assert by_folder and all(len(group) == 2 for group in by_folder.values())
    for folder, (first, second) in by_folder.items():
        assert sorted(p.name for p in folder.glob("ground_truth*.npz")) == sorted(
            [f"ground_truth_{first.onset}.npz", f"ground_truth_{second.onset}.npz"]
        )
        truth = load_ground_truth(folder)
        assert truth is not None
        for record in (first, second):
            with np.load(folder / f"ground_truth_{record.onset}.npz") as arrays:
                stored = arrays["landmarks"]
            for offset_in_clip, number in enumerate(range(record.first, record.last + 1)):
                np.testing.assert_allclose(truth.landmarks(number), stored[offset_in_clip], atol=1e-5)
            h, w = SPECS["casme3"].frame_size
            assert truth.flow(record.onset, record.apex).shape == (h, w, 2)
        with pytest.raises(KeyError):
            truth.flow(first.apex, second.apex)
        with pytest.raises(KeyError):
            truth.flow(second.onset, first.onset)
        if first.last + 1 < second.first:
            with pytest.raises(KeyError):
                truth.landmarks(first.last + 1)


@pytest.mark.parametrize("site", SITES)
def test_written_ground_truth_explains_the_written_frames(site: str, sites: dict[str, Path]) -> None:
    """The flow saved beside the frames warps the apex frame file onto the onset frame file (noise and JPEG kept)."""
    root = sites[site]
    for record in records(root):
        truth = load_ground_truth(LAYOUTS[site].clip_dir(root, record))
        assert truth is not None
        onset, apex = (
            cv2.imread(str(clip_frame(site, root, record, n)), cv2.IMREAD_GRAYSCALE).astype(np.float32)
            for n in (record.onset, record.apex)
        )
        flow = truth.flow(record.onset, record.apex)
        grid = pixel_grid(*onset.shape).astype(np.float32)
        warped = cv2.remap(apex, grid[..., 0] + flow[..., 0], grid[..., 1] + flow[..., 1], cv2.INTER_LINEAR)
        moving = np.linalg.norm(flow, axis=-1) > 1.0
        assert moving.sum() > 50, record
        with_flow = np.abs(warped - onset)[moving].mean()
        without = np.abs(apex - onset)[moving].mean()
        assert with_flow < 0.7 * without, (record, with_flow, without)
        model = next(m for m in truth.models if record.onset in m.frame_numbers)
        np.testing.assert_allclose(truth.landmarks(record.first), model.neutral_landmarks, atol=1e-3)  # neutral start


# ----------------------------------------------------------------------------- 5. FACS locality and scale


def still_head(code: str, intensity: float = 1.0) -> tuple[ClipPlan, MotionModel, np.ndarray]:
    """A clip with the head held still; returns the landmark displacement at apex (68, 2)."""
    plan, _neutral, motion = make_clip(code, intensity, seed=5)
    motion.rigid[:] = 0.0
    apex = motion.frame_row(plan.timeline.apex)
    return plan, motion, motion.landmarks(apex) - motion.neutral_landmarks


def test_au12_moves_the_lip_corners_and_not_the_brows() -> None:
    _plan, motion, moved = still_head("12")
    assert motion.neutral_landmarks[48, 0] < motion.neutral_landmarks[54, 0]  # 48 is the subject's right (image left)
    norms = np.linalg.norm(moved, axis=1)
    assert norms[48] > 2.0 and norms[54] > 2.0
    assert moved[48, 0] < 0 and moved[54, 0] > 0  # pulled outwards
    assert moved[48, 1] < 0 and moved[54, 1] < 0  # and up
    assert norms[BROWS + EYES].max() < STILL


def test_unilateral_r12_moves_only_the_subjects_right_corner() -> None:
    _plan, _motion, moved = still_head("R12")
    norms = np.linalg.norm(moved, axis=1)
    assert norms[48] > 2.0
    assert norms[54] < STILL
    assert norms[BROWS + EYES].max() < STILL


UPPER = (1, 2, 4, 5, 6, 7)
LOWER = (10, 12, 14, 15, 17)


@pytest.mark.parametrize("au", UPPER + LOWER)
def test_each_au_moves_its_own_region_only(au: int) -> None:
    _plan, _motion, moved = still_head(str(au))
    norms = np.linalg.norm(moved, axis=1)
    own = sorted({index for index, _vector, _radius, _side in AU_MOVES[au]})
    assert norms[own].max() > 1.0, f"AU{au} barely moves its control landmarks {own}"
    far = MOUTH if au in UPPER else BROWS + EYES
    assert norms[far].max() < STILL, f"AU{au} moves landmark {far[int(np.argmax(norms[far]))]}"


def apex_field(spec: SynthSpec, plan: ClipPlan, identity_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """|D| and det(I + J) at every pixel of the face (landmark box + 16 px) at the apex, AUs only (no blink)."""
    identity = random_identity(np.random.default_rng(identity_seed))
    landmarks = place_landmarks(landmarks_unit(identity), plan.face_width, plan.face_centre)
    motion = build_motion(dataclasses.replace(plan, blink=None), landmarks, spec.frame_size)
    x0, y0 = np.floor(landmarks.min(axis=0)).astype(int) - 16
    x1, y1 = np.ceil(landmarks.max(axis=0)).astype(int) + 16
    points = pixel_grid(y1 - y0, x1 - x0).reshape(-1, 2) + np.array([x0, y0])
    displacement, jacobian = motion.displacement_at(points, motion.frame_row(plan.timeline.apex))
    det = (1 + jacobian[:, 0, 0]) * (1 + jacobian[:, 1, 1]) - jacobian[:, 0, 1] * jacobian[:, 1, 0]
    return np.linalg.norm(displacement, axis=1), det


DRAWN = 80


@pytest.fixture(scope="module")
def drawn_apexes() -> dict[str, list[tuple[str, float, float, float]]]:
    """Per database, clips as ``plan_clip`` draws them for a 128 px face: (AUs, top AU intensity, peak px, min det)."""
    found = {}
    for name, spec in SPECS.items():
        rng = np.random.default_rng(99)
        rows = []
        for index in range(DRAWN):
            plan = plan_clip(spec, rng, 128.0, first=1)
            peak, det = apex_field(spec, plan, index)
            code = "+".join(f"{side or ''}{au}" for au, side in plan.action_units)
            rows.append((code, max(plan.au_intensity.values()), float(peak.max()), float(det.min())))
        found[name] = rows
    return found


@pytest.mark.parametrize("au", sorted(AU_MOVES))
def test_each_au_at_nominal_intensity_moves_a_few_pixels(au: int) -> None:
    spec = SPECS["casme2"]
    plan = make_clip(str(au), 1.0, seed=5)[0]
    peak, _det = apex_field(spec, plan, 5)
    assert 1.5 <= peak.max() <= 6.0, f"AU{au} peaks at {peak.max():.2f} px on a 128 px face"


@pytest.mark.parametrize("site", SITES)
def test_drawn_clips_move_a_few_pixels_at_apex(site: str, drawn_apexes: dict) -> None:
    bad = [(code, round(i, 2), round(p, 2)) for code, i, p, _d in drawn_apexes[site] if not 1.5 <= p <= 6.0]
    assert not bad, f"{len(bad)}/{len(drawn_apexes[site])} {site} clips peak outside 1.5-6 px: {bad[:6]}"


@pytest.mark.parametrize("site", SITES)
def test_drawn_clips_never_fold_the_warp(site: str, drawn_apexes: dict) -> None:
    bad = [(code, round(i, 2), round(d, 2)) for code, i, _p, d in drawn_apexes[site] if d <= 0.3]
    assert not bad, f"{len(bad)}/{len(drawn_apexes[site])} {site} clips reach det(I+J) <= 0.3: {bad[:6]}"


# ----------------------------------------------------------------------------- 6. timing


@pytest.mark.parametrize("site", SITES)
def test_timelines_have_micro_expression_durations(site: str) -> None:
    spec = SPECS[site]
    frame_ms = 1000.0 / spec.fps
    rng = np.random.default_rng(7)
    rises, wholes = [], []
    for _ in range(500):
        tl = draw_timeline(spec, rng, first=10)
        assert tl.first == 10
        assert tl.first < tl.onset < tl.apex < tl.offset < tl.last
        rise, whole = (tl.apex - tl.onset) * frame_ms, (tl.offset - tl.onset) * frame_ms
        assert 40.0 - frame_ms <= rise <= 150.0 + frame_ms, tl
        assert whole < 500.0 + frame_ms, tl
        rises.append(rise)
        wholes.append(whole)
    assert max(rises) - min(rises) >= 60.0 - 2 * frame_ms  # durations vary, not one fixed timeline


# ----------------------------------------------------------------------------- 7. identities


def similarity_residual(a: np.ndarray, b: np.ndarray) -> float:
    """RMS distance (in b's units) between point sets after the best rotation, scale and shift of a onto b."""
    a0, b0 = a - a.mean(axis=0), b - b.mean(axis=0)
    u, s, vt = np.linalg.svd(a0.T @ b0)
    rotation = u @ vt
    scale = s.sum() / (a0**2).sum()
    return float(np.sqrt(((scale * a0 @ rotation - b0) ** 2).sum(axis=1).mean()))


def test_identities_are_distinct_beyond_per_clip_variation() -> None:
    spec = SPECS["casme2"]
    rng = np.random.default_rng(1)
    identities = [random_identity(rng) for _ in range(20)]
    faces = [place_landmarks(landmarks_unit(idt), 128.0, (120.0, 120.0)) for idt in identities]
    # the same identity in two clips: other face width and placement, same geometry
    per_clip = []
    for idt in identities[:5]:
        plans = [plan_clip(spec, np.random.default_rng(seed), 128.0, first=1) for seed in (1, 2)]
        placed = [place_landmarks(landmarks_unit(idt), p.face_width, p.face_centre) for p in plans]
        per_clip.append(similarity_residual(placed[0], placed[1]))
    between = [similarity_residual(faces[i], faces[j]) for i, j in itertools.combinations(range(20), 2)]
    assert max(per_clip) < 1e-6
    assert min(between) > 1.0, f"two identities differ by only {min(between):.2f} px RMS on a 128 px face"
    assert len({round(idt.skin_bgr[2], 3) for idt in identities}) == 20


@pytest.mark.parametrize("site", SITES)
def test_written_subjects_are_detectable_identities(site: str, sites: dict[str, Path]) -> None:
    spec, root = SPECS[site], sites[site]
    settings = manifest(root)["settings"]
    drawn = [subject_identity(settings["seed"], SITE_ORDER.index(site), s, spec) for s in range(settings["subjects"])]
    for identity, width in drawn:
        assert detectable(identity, spec, width)
    for record in records(root):
        truth = load_ground_truth(LAYOUTS[site].clip_dir(root, record))
        model = next(m for m in truth.models if record.onset in m.frame_numbers)
        residuals = [similarity_residual(landmarks_unit(idt), model.neutral_landmarks) for idt, _w in drawn]
        # the clip shows its own subject's identity (scaled and placed), not another subject's
        assert residuals[record.subject] < 1e-3
        assert all(r > 0.5 for s, r in enumerate(residuals) if s != record.subject)


def onset_and_apex_frames(site: str, root: Path) -> list[tuple[Path, np.ndarray]]:
    found = []
    for record in records(root):
        for number in (record.onset, record.apex):
            path = clip_frame(site, root, record, number)
            grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            assert grey is not None, path
            found.append((path.relative_to(root), grey))
    return found


@pytest.mark.parametrize("site", SITES)
def test_accepted_subjects_are_detectable_at_their_own_face_width(site: str) -> None:
    """``subject_identity`` draws a face width with the identity; the face must be found at that width."""
    import dlib

    detector = dlib.get_frontal_face_detector()
    spec = SPECS[site]
    h, w = spec.frame_size
    missed = []
    for subject in range(6):
        identity, width = subject_identity(SEED, SITE_ORDER.index(site), subject, spec)
        assert spec.face_width[0] <= width <= spec.face_width[1]
        landmarks = place_landmarks(landmarks_unit(identity), width, (w / 2, h / 2))
        grey = cv2.cvtColor(render_face(identity, landmarks, spec.frame_size), cv2.COLOR_BGR2GRAY)
        if len(detector(grey, 0)) != 1:
            missed.append((subject, round(width, 1)))
    assert not missed, f"{site}: subjects accepted as detectable but not found at their face width: {missed}"


@pytest.mark.parametrize("site", SITES)
def test_dlib_finds_the_face_in_written_frames_as_the_pipeline_looks(site: str, sites: dict[str, Path]) -> None:
    """As ``partitions.face`` does: HOG at the frame's own size, then once upsampled."""
    import dlib

    detector = dlib.get_frontal_face_detector()
    for path, grey in onset_and_apex_frames(site, sites[site]):
        assert len(detector(grey, 0)) == 1 or len(detector(grey, 1)) == 1, f"no face found in {path}"


@pytest.mark.parametrize("site", SITES)
def test_written_frames_pass_the_writers_own_detection_criterion(site: str, sites: dict[str, Path]) -> None:
    """``writer.detectable`` accepts a subject when HOG finds it without upsampling; its clips should pass too."""
    import dlib

    detector = dlib.get_frontal_face_detector()
    missed = [str(path) for path, grey in onset_and_apex_frames(site, sites[site]) if len(detector(grey, 0)) != 1]
    assert not missed, f"HOG (upsample 0) finds no face in {missed}"


# ----------------------------------------------------------------------------- 8. non-IID sites and formats


def test_emotion_priors_follow_datasets_md() -> None:
    assert SPECS["casme2"].emotion_prior == {
        "others": 99,
        "disgust": 63,
        "happiness": 32,
        "surprise": 28,
        "repression": 27,
        "sadness": 4,
        "fear": 2,
    }
    assert SPECS["samm"].emotion_prior == {
        "Anger": 57,
        "Other": 26,
        "Happiness": 26,
        "Surprise": 15,
        "Contempt": 12,
        "Disgust": 9,
        "Fear": 8,
        "Sadness": 6,
    }
    assert SPECS["smic"].emotion_prior == {"negative": 70, "positive": 51, "surprise": 43}  # SMIC-HS, MEGC2019
    for site in SITES:
        assert SPECS[site].fps == get_adapter(site).fps


COMPOSITE = {
    **dict.fromkeys(("repression", "anger", "contempt", "disgust", "fear", "sadness", "sad", "negative"), "negative"),
    **dict.fromkeys(("happiness", "happy", "positive"), "positive"),
    "surprise": "surprise",
}


def test_emotion_priors_differ_between_sites() -> None:
    def composite(spec: SynthSpec) -> np.ndarray:
        counts = dict.fromkeys(("negative", "positive", "surprise", "other"), 0.0)
        for emotion, count in spec.emotion_prior.items():
            counts[COMPOSITE.get(emotion.lower(), "other")] += count
        total = sum(counts.values())
        return np.array([c / total for c in counts.values()])

    for a, b in itertools.combinations(SITES, 2):
        distance = 0.5 * np.abs(composite(SPECS[a]) - composite(SPECS[b])).sum()
        assert distance > 0.1, f"{a} and {b} draw composite classes alike (total variation {distance:.3f})"


@pytest.mark.parametrize("site", SITES)
def test_rules_and_priors_name_the_same_emotions(site: str) -> None:
    spec = SPECS[site]
    assert set(spec.rules) == set(spec.emotion_prior)
    assert {e.lower() for e in spec.emotion_prior} == set(get_adapter(site).emotions)  # the reader's vocabulary
    for emotion, options in spec.rules.items():
        assert options and abs(sum(weight for weight, _code in options) - 1.0) < 1e-9, emotion
        for _weight, code in options:
            assert all(au in AU_MOVES and side in (None, "L", "R") for au, side in combo(code)), code


def test_smic_clips_are_bmp_under_emotion_folders(sites: dict[str, Path]) -> None:
    root = sites["smic"]
    pattern = re.compile(r"HS/s(\d+)/micro/(negative|positive|surprise)/s\1_(ne|po|sur)_\d{2}/image\d{6}\.bmp")
    written = records(root)
    frames = [p for p in root.rglob("*") if p.is_file() and p.suffix in FRAME_SUFFIXES]
    assert len(frames) == sum(r.last - r.first + 1 for r in written)
    for path in frames:
        assert pattern.fullmatch(path.relative_to(root).as_posix()), path
        assert path.read_bytes()[:2] == b"BM"
    for record in written:
        folder = LAYOUTS["smic"].clip_dir(root, record)
        assert folder.parent.name == record.emotion
        assert folder.name.startswith(f"s{record.subject + 1}_{record.emotion[:2]}")


def test_samm_frames_are_single_channel_and_casme_frames_colour(sites: dict[str, Path]) -> None:
    for site, channels in (("samm", 1), ("casme2", 3), ("casme3", 3)):
        root = sites[site]
        for record in records(root):
            image = cv2.imread(str(clip_frame(site, root, record, record.apex)), cv2.IMREAD_UNCHANGED)
            assert image.shape[:2] == SPECS[site].frame_size
            assert (1 if image.ndim == 2 else image.shape[2]) == channels, site
    samm = records(sites["samm"])[0]
    assert re.fullmatch(
        r"SAMM/006/006_1_1/006_\d{5}\.jpg",
        clip_frame("samm", sites["samm"], samm, samm.onset).relative_to(sites["samm"]).as_posix(),
    )


# ----------------------------------------------------------------------------- 9. sheet quirks


def test_casme2_sheet_has_blank_header_columns_and_int_subjects(sites: dict[str, Path]) -> None:
    root = sites["casme2"]
    sheet = load_workbook(root / "CASME2-coding-20190701.xlsx").active
    rows = list(sheet.iter_rows(values_only=True))
    header = rows[0]
    assert header[:2] == ("Subject", "Filename") and header[3:6] == ("OnsetFrame", "ApexFrame", "OffsetFrame")
    assert header[2] is None and header[6] is None
    assert header[7:9] == ("Action Units", "Estimated Emotion")
    written = records(root)
    assert len(rows) - 1 == len(written)
    for row, record in zip(rows[1:], written, strict=True):
        assert type(row[0]) is int and row[0] == record.subject + 1  # folder is sub01, sheet says 1
        assert (row[3], row[4], row[5]) == (record.onset, record.apex, record.offset)


def test_samm_sheet_has_notes_above_header_and_duration_formula(sites: dict[str, Path]) -> None:
    root = sites["samm"]
    workbook = load_workbook(root / "SAMM_Micro_FACS_Codes_v2.xlsx")
    assert "MICRO_ONLY" in workbook.sheetnames
    rows = list(workbook["MICRO_ONLY"].iter_rows(values_only=True))
    top = next(i for i, row in enumerate(rows) if row[0] == "Subject")
    assert top >= 10 and sum(1 for row in rows[:top] if row[0]) >= 10  # about 13 rows of notes
    header = rows[top]
    onset_col, offset_col, duration_col = (header.index(n) for n in ("Onset Frame", "Offset Frame", "Duration"))
    letters = "ABCDEFGHIJKL"
    written = records(root)
    assert len(rows) - top - 1 == len(written)
    for excel_row, (row, record) in enumerate(zip(rows[top + 1 :], written, strict=True), start=top + 2):
        assert row[duration_col] == f"={letters[offset_col]}{excel_row}-{letters[onset_col]}{excel_row}"
        assert row[offset_col] - row[onset_col] == record.offset - record.onset
        assert type(row[0]) is int and f"{row[0]:03d}" == f"{record.subject + 6:03d}"


def test_casme3_sheet_is_named_label(sites: dict[str, Path]) -> None:
    root = sites["casme3"]
    workbook = load_workbook(root / "cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx")
    assert workbook.sheetnames == ["label"]
    rows = list(workbook["label"].iter_rows(values_only=True))
    assert rows[0] == ("Subject", "Filename", "Onset", "Apex", "Offset", "AU", "Objective class", "emotion")
    written = records(root)
    assert len(rows) - 1 == len(written)
    keys = {(row[0], row[1], int(row[2])) for row in rows[1:]}
    assert len(keys) == len(written)  # (Subject, Filename, Onset) is the key
    assert len({(row[0], row[1]) for row in rows[1:]}) < len(written)  # one task holds several MEs
