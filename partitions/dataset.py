"""A torch ``Dataset`` over the prepared clip cache (see :mod:`.cache` for the layout).

Each item is a dict of tensors: the T aligned grayscale crops, TV-L1 flow
between consecutive crops (MOL's pseudo ground truth, Shao et al. TPAMI 2025),
68 landmarks per frame, the class label, the 12-AU multi-label target and,
for synthetic sites, the exact flow and landmarks with a mask.

Augmentation happens here, at load time, in train mode only, so the cache stays
one entry per clip. A horizontal flip moves every modality together: frames
are mirrored, flow is mirrored and its x-component negated, and landmarks are
mirrored and renumbered with the iBUG-68 left/right permutation. A shift
translates every frame, flow field and landmark by the same whole pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .action_units import AU_NODES, au_target
from .cache import PrepareConfig, entry_path, read_entry, report_path
from .errors import DataError
from .face import mirror_landmarks
from .records import Sample


@dataclass(frozen=True)
class Augment:
    """Load-time augmentation: flip probability, brightness/contrast jitter ranges (intensities in [0, 1]) and the
    largest shift, in pixels of the prepared crop, along each axis.

    The shift stands for where alignment puts different people's faces in the crop. Without it the network
    learned where each training subject's features sit (FCC's positional embeddings can) and held-out subjects
    scored 0.15 UF1 lower (README "A recipe that learns").
    """

    flip: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1
    shift: int = 6


def flip_arrays(item: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mirror one item horizontally, keeping frames, flow and landmarks consistent.

    Frames/flow are channel-first with width last; landmarks are normalised
    (x in [0, 1] spans the crop's pixel centres), so a mirrored x is ``1 - x``.
    """
    out = dict(item)
    out["clip"] = item["clip"][..., ::-1].copy()
    for name in ("flow", "gt_flow"):
        if name in item:
            flow = item[name][..., ::-1].copy()
            flow[:, 0] *= -1.0
            out[name] = flow
    for name in ("landmarks", "gt_landmarks"):
        if name in item:
            out[name] = mirror_landmarks(item[name], 1.0)
    return out


def shift_arrays(item: dict[str, np.ndarray], dy: int, dx: int) -> dict[str, np.ndarray]:
    """Translate one item by (dy, dx) whole pixels (down, right): frames and flow move with edge pixels repeated
    into the gap, landmarks (normalised by ``size - 1``) move by the same amount."""
    out = dict(item)
    size = item["clip"].shape[-1]
    for name in ("clip", "flow", "gt_flow"):
        if name in item:
            out[name] = translate(item[name], dy, dx)
    for name in ("landmarks", "gt_landmarks"):
        if name in item:
            out[name] = item[name] + np.array([dx, dy], np.float32) / np.float32(size - 1)
    return out


def translate(maps: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """(..., H, W) maps moved by (dy, dx) pixels, the border pixels repeated into the uncovered strip."""
    height, width = maps.shape[-2:]
    pad = max(abs(dy), abs(dx))
    padded = np.pad(maps, [(0, 0)] * (maps.ndim - 2) + [(pad, pad), (pad, pad)], mode="edge")
    return padded[..., pad - dy : pad - dy + height, pad - dx : pad - dx + width].copy()


def jitter_intensity(clip: np.ndarray, rng: np.random.Generator, augment: Augment) -> np.ndarray:
    """Same brightness/contrast change on every frame (a per-frame change would look like motion)."""
    contrast = rng.uniform(1.0 - augment.contrast, 1.0 + augment.contrast)
    brightness = rng.uniform(-augment.brightness, augment.brightness)
    mean = float(clip.mean())
    return np.clip((clip - mean) * contrast + mean + brightness, 0.0, 1.0).astype(np.float32)


class ClipDataset(Dataset):
    """Cached clips of some samples of a site, with their class targets.

    ``samples``/``targets`` usually come from a ``LabelledSite`` restricted to
    a split's indices (:meth:`from_site`). With ``drop_missing`` samples that
    ``prepare`` skipped (no face, bad frame) are left out and listed in
    ``dropped``; otherwise any missing entry is a :class:`DataError`.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        targets: Sequence[int],
        cache: Path,
        config: PrepareConfig | None = None,
        train: bool = False,
        seed: int = 0,
        augment: Augment | None = None,
        drop_missing: bool = False,
    ) -> None:
        if len(samples) != len(targets):
            raise DataError(f"{len(samples)} samples but {len(targets)} targets: give one target per sample")
        self.config = config or PrepareConfig()
        self.folder = self.config.folder(Path(cache))
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.augment = augment or Augment()
        paths = [entry_path(self.folder, sample) for sample in samples]
        present = [path.is_file() for path in paths]
        self.dropped: list[Sample] = [s for s, ok in zip(samples, present, strict=True) if not ok]
        if self.dropped and not drop_missing:
            raise DataError(self._missing_message(paths, present, Path(cache)))
        keep = [i for i, ok in enumerate(present) if ok]
        self.samples = [samples[i] for i in keep]
        self.targets = [int(targets[i]) for i in keep]
        self.paths = [paths[i] for i in keep]

    @classmethod
    def from_site(cls, site: Any, indices: Sequence[int] | None, cache: Path, **options: Any) -> ClipDataset:
        """Dataset over ``site.samples[i]`` for ``i`` in ``indices`` (all samples when None)."""
        chosen = range(len(site.samples)) if indices is None else indices
        return cls([site.samples[i] for i in chosen], [site.targets[i] for i in chosen], cache, **options)

    def _missing_message(self, paths: list[Path], present: list[bool], cache: Path) -> str:
        """Name the first missing entry and the command that makes it."""
        first = self.dropped[0]
        database = first.database
        return (
            f"{len(self.dropped)} of {len(paths)} samples have no prepared clip in {self.folder} "
            f"(first: {first.key}, expected {paths[present.index(False)]}); run `fedmer prepare --dataset "
            f"{database} --root <site root> --cache {cache}` with these settings first. Samples that prepare "
            f"skipped are listed with the reason in {report_path(self.folder, database)}; "
            "pass drop_missing=True to leave them out"
        )

    def set_epoch(self, epoch: int) -> None:
        """Vary augmentation per epoch while staying reproducible for a given seed."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def load_arrays(self, index: int) -> dict[str, np.ndarray]:
        """The un-augmented item as numpy arrays: intensities in [0, 1], landmarks as ``pixel / (size - 1)``.

        Landmarks are not clipped: a point of a face that pokes out of the crop stays slightly outside [0, 1].
        """
        entry = read_entry(self.paths[index])
        scale = np.float32(self.config.size - 1)
        item = {
            "clip": entry["frames"][:, None].astype(np.float32) / np.float32(255.0),
            "flow": entry["flow"].astype(np.float32),
            "landmarks": entry["landmarks"].astype(np.float32) / scale,
        }
        if "gt_flow" in entry:
            item["gt_flow"] = entry["gt_flow"].astype(np.float32)
            item["gt_landmarks"] = entry["gt_landmarks"].astype(np.float32) / scale
        return item

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.load_arrays(index)
        flipped = False
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            flipped = bool(rng.random() < self.augment.flip)
            if flipped:
                item = flip_arrays(item)
            item["clip"] = jitter_intensity(item["clip"], rng, self.augment)
            if self.augment.shift:
                dy, dx = (int(v) for v in rng.integers(-self.augment.shift, self.augment.shift + 1, size=2))
                item = shift_arrays(item, dy, dx)
        sample = self.samples[index]
        has_truth = "gt_flow" in item
        return {
            "clip": torch.from_numpy(np.ascontiguousarray(item["clip"])),
            "flow": torch.from_numpy(np.ascontiguousarray(item["flow"])),
            "landmarks": torch.from_numpy(np.ascontiguousarray(item["landmarks"])),
            "label": torch.tensor(self.targets[index], dtype=torch.int64),
            "au": torch.from_numpy(au_target(sample).astype(np.float32)),
            "au_mask": torch.tensor(sample.has_action_units),
            "gt_flow": torch.from_numpy(np.ascontiguousarray(item["gt_flow"]))
            if has_truth
            else torch.zeros_like(torch.from_numpy(item["flow"])),
            "gt_landmarks": torch.from_numpy(np.ascontiguousarray(item["gt_landmarks"]))
            if has_truth
            else torch.zeros_like(torch.from_numpy(item["landmarks"])),
            "gt_mask": torch.tensor(has_truth),
            "flipped": torch.tensor(flipped),
            "index": torch.tensor(index, dtype=torch.int64),
        }


__all__ = ["AU_NODES", "Augment", "ClipDataset", "flip_arrays", "jitter_intensity", "shift_arrays"]
