"""The cache-backed Dataset: tensor shapes, flip consistency across modalities, determinism, missing entries."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from partitions.cache import PrepareConfig, entry_path, write_entry
from partitions.dataset import Augment, ClipDataset
from partitions.errors import DataError
from partitions.face import AlignConfig
from partitions.records import ActionUnit, Sample

T, SIZE = 4, 64
CONFIG = PrepareConfig(t=T, align=AlignConfig(size=SIZE))


def affine_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two frames related by a known, spatially varying flow: I_a(p) = I_b(p + flow(p)), flow = M p - p."""
    texture = cv2.GaussianBlur((rng.random((SIZE, SIZE)) * 255).astype(np.float32), (0, 0), 2.5)
    texture = cv2.normalize(texture, None, 20, 200, cv2.NORM_MINMAX)
    forward = cv2.getRotationMatrix2D((20.0, 30.0), 2.0, 1.04)  # rotation + zoom about an off-centre point
    forward[:, 2] += (1.5, -0.5)
    second = cv2.warpAffine(texture, forward, (SIZE, SIZE), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    flow = np.stack(
        [
            forward[0, 0] * xs + forward[0, 1] * ys + forward[0, 2] - xs,
            forward[1, 0] * xs + forward[1, 1] * ys + forward[1, 2] - ys,
        ]
    )
    return texture.astype(np.uint8), second.astype(np.uint8), flow.astype(np.float32)


def make_entry(cache: Path, clip_id: str, database: str = "casme2", seed: int = 0, truth: bool = True) -> Sample:
    """Write a cache entry by hand: frames alternate between an affine pair, flow is exact, one bright landmark."""
    sample = Sample(
        database,
        "sub01",
        clip_id,
        (Path(f"/data/{clip_id}/img1.jpg"),),
        (1,),
        200.0,
        "happiness",
        action_units=(ActionUnit(4), ActionUnit(12, "L")) if database != "smic" else (),
    )
    rng = np.random.default_rng(seed)
    first, second, flow = affine_pair(rng)
    frames = np.stack([first, second] * (T // 2))
    flows = np.stack([flow] * (T - 1))
    landmarks = rng.uniform(8, SIZE - 8, size=(T, 68, 2)).astype(np.float32)
    landmarks[:, 36] = (10.0, 20.0)  # image-left eye corner, marked in the first frame below
    frames[0, 19:22, 9:12] = 255
    arrays = {
        "frames": frames,
        "flow": flows.astype(np.float16),
        "landmarks": landmarks,
        "interpolated": np.array(False),
        "face_fallback": np.array(False),
    }
    if truth:
        arrays |= {"gt_flow": flows.astype(np.float16), "gt_landmarks": landmarks + 0.5}
    write_entry(entry_path(CONFIG.folder(cache), sample), arrays)
    return sample


def photometric_residual(item: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Residual of I_a(p) - I_b(p + flow(p)) with the item's flow, and with its x-component negated."""
    a = item["clip"][0, 0].numpy()
    b = item["clip"][1, 0].numpy()
    flow = item["flow"][0].numpy()
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    inner = slice(8, SIZE - 8)

    def residual(dx: np.ndarray) -> float:
        warped = cv2.remap(b, xs + dx, ys + flow[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        return float(np.abs(a - warped)[inner, inner].mean())

    return residual(flow[0]), residual(-flow[0])


def test_shapes_dtypes_and_ranges(tmp_path: Path) -> None:
    samples = [make_entry(tmp_path, "EP01"), make_entry(tmp_path, "s1_ne_01", database="smic", truth=False)]
    dataset = ClipDataset(samples, [2, 0], tmp_path, config=CONFIG)
    item = dataset[0]
    assert item["clip"].shape == (T, 1, SIZE, SIZE) and item["clip"].dtype == torch.float32
    assert float(item["clip"].min()) >= 0.0 and float(item["clip"].max()) <= 1.0
    assert item["flow"].shape == (T - 1, 2, SIZE, SIZE) and item["flow"].dtype == torch.float32
    assert item["landmarks"].shape == (T, 68, 2) and item["landmarks"].dtype == torch.float32
    assert float(item["landmarks"].min()) >= 0.0 and float(item["landmarks"].max()) <= 1.0
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 2
    assert item["au"].shape == (12,) and item["au"].dtype == torch.float32
    assert item["au"].tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0]  # AU4 and AU12 (L side counts)
    assert bool(item["au_mask"]) and bool(item["gt_mask"])
    assert item["gt_flow"].shape == item["flow"].shape and item["gt_landmarks"].shape == item["landmarks"].shape
    smic = dataset[1]
    assert not bool(smic["au_mask"]) and not bool(smic["gt_mask"]) and float(smic["gt_flow"].abs().sum()) == 0.0
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    assert batch["clip"].shape == (2, T, 1, SIZE, SIZE) and batch["au_mask"].tolist() == [True, False]


def test_stored_flow_matches_the_frames(tmp_path: Path) -> None:
    item = ClipDataset([make_entry(tmp_path, "EP01")], [0], tmp_path, config=CONFIG)[0]
    right, wrong = photometric_residual(item)
    assert right < 0.02 < wrong


def test_flip_keeps_frames_flow_and_landmarks_consistent(tmp_path: Path) -> None:
    sample = make_entry(tmp_path, "EP01")
    plain = ClipDataset([sample], [0], tmp_path, config=CONFIG)[0]
    always = Augment(flip=1.0, brightness=0.0, contrast=0.0, shift=0)
    flipped = ClipDataset([sample], [0], tmp_path, config=CONFIG, train=True, augment=always)[0]
    assert bool(flipped["flipped"])
    torch.testing.assert_close(flipped["clip"], plain["clip"].flip(-1))

    # Flow: the mirrored flow still carries the mirrored first frame onto the mirrored second one.
    right, wrong = photometric_residual(flipped)
    assert right < 0.02 < wrong
    torch.testing.assert_close(flipped["gt_flow"], flipped["flow"], atol=1e-2, rtol=0)

    # Landmarks: the bright dot marked at point 36 is, after the flip, where point 45 says it is.
    dot_y, dot_x = np.unravel_index(int(flipped["clip"][0, 0].argmax()), (SIZE, SIZE))
    np.testing.assert_allclose(flipped["landmarks"][0, 45].numpy() * (SIZE - 1), (dot_x, dot_y), atol=1.0)
    torch.testing.assert_close(flipped["landmarks"][:, 45, 0], 1.0 - plain["landmarks"][:, 36, 0])
    torch.testing.assert_close(flipped["gt_landmarks"][:, 45, 0], 1.0 - plain["gt_landmarks"][:, 36, 0])


def test_shift_moves_frames_flow_and_landmarks_together(tmp_path: Path) -> None:
    sample = make_entry(tmp_path, "EP01")
    plain = ClipDataset([sample], [0], tmp_path, config=CONFIG)[0]
    only_shift = Augment(flip=0.0, brightness=0.0, contrast=0.0, shift=5)
    moves = set()
    for seed in range(6):
        shifted = ClipDataset([sample], [0], tmp_path, config=CONFIG, train=True, seed=seed, augment=only_shift)[0]
        # Landmarks: the bright dot marked at point 36 is where the shifted point 36 says it is ...
        dot_y, dot_x = np.unravel_index(int(shifted["clip"][0, 0].argmax()), (SIZE, SIZE))
        np.testing.assert_allclose(shifted["landmarks"][0, 36].numpy() * (SIZE - 1), (dot_x, dot_y), atol=1.0)
        dx, dy = ((shifted["landmarks"] - plain["landmarks"])[0, 0].numpy() * (SIZE - 1)).round().astype(int)
        assert max(abs(dx), abs(dy)) <= 5
        moves.add((int(dx), int(dy)))
        # ... the frames and flow fields moved by that many pixels (away from the repeated border) ...
        for name in ("clip", "flow", "gt_flow"):
            moved = shifted[name][..., 8 + dy : SIZE - 8 + dy, 8 + dx : SIZE - 8 + dx]
            torch.testing.assert_close(moved, plain[name][..., 8:-8, 8:-8])
        # ... and the moved flow still carries the moved first frame onto the moved second one.
        right, wrong = photometric_residual(shifted)
        assert right < 0.02 < wrong
        torch.testing.assert_close(
            shifted["gt_landmarks"] - plain["gt_landmarks"], shifted["landmarks"] - plain["landmarks"]
        )
    assert len(moves) > 1  # the seed draws the shift


def test_augmentation_is_deterministic_given_a_seed(tmp_path: Path) -> None:
    samples = [make_entry(tmp_path, f"EP0{i}", seed=i) for i in range(4)]
    make = lambda seed: ClipDataset(samples, [0] * 4, tmp_path, config=CONFIG, train=True, seed=seed)  # noqa: E731
    first, again, other = make(7), make(7), make(8)
    for index in range(4):
        torch.testing.assert_close(first[index]["clip"], again[index]["clip"])
    assert any(not torch.equal(first[i]["clip"], other[i]["clip"]) for i in range(4))
    evaluation = ClipDataset(samples, [0] * 4, tmp_path, config=CONFIG)
    raw = torch.from_numpy(np.load(entry_path(CONFIG.folder(tmp_path), samples[0]))["frames"][:, None] / 255.0)
    torch.testing.assert_close(evaluation[0]["clip"], raw.float())  # no augmentation outside train mode
    first.set_epoch(1)
    assert any(not torch.equal(first[i]["clip"], again[i]["clip"]) for i in range(4))


def test_missing_entries_tell_the_user_to_prepare(tmp_path: Path) -> None:
    present = make_entry(tmp_path, "EP01")
    absent = replace(present, clip_id="EP02")
    with pytest.raises(DataError, match=r"fedmer prepare --dataset casme2") as error:
        ClipDataset([present, absent], [0, 1], tmp_path, config=CONFIG)
    assert "casme2/sub01/EP02" in str(error.value)
    kept = ClipDataset([present, absent], [0, 1], tmp_path, config=CONFIG, drop_missing=True)
    assert len(kept) == 1 and kept.dropped == [absent]
    with pytest.raises(DataError, match="fedmer prepare"):
        ClipDataset([present], [0], tmp_path, config=replace(CONFIG, t=8))  # other settings, other entries
