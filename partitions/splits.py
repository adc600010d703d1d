"""Subject-grouped splits: leave-one-subject-out, k folds, and a held-out validation split.

From ``/work/shared/reference/datasets.md`` ("Protocols"): evaluation is
leave-one-subject-out, and splitting by sample so that one subject lands in
train and test is a known pitfall; every split here groups by subject, so a
subject is never on both sides. Subjects are keyed ``database/subject`` so
samples pooled from several sites never merge two people who share an id.
Splits return index arrays into the sample list they were given; :func:`site_loso_folds` takes several
sites' lists (MEGC2019's composite evaluation) and returns indices into each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .records import Sample


@dataclass(frozen=True)
class Fold:
    """One split: indices of training and held-out samples, and the held-out subjects."""

    index: int
    train: np.ndarray
    test: np.ndarray
    test_subjects: tuple[str, ...]


@dataclass(frozen=True)
class SiteFold:
    """One leave-one-subject-out fold over several sites: per site, the indices of its training samples."""

    index: int
    site: int  # position of the held-out subject's site in the list of sites
    subject: str  # the held-out subject, as its site names it
    train: tuple[np.ndarray, ...]  # one array per site, indices into that site's samples
    test: np.ndarray  # indices into the held-out subject's site's samples


@dataclass(frozen=True)
class Holdout:
    """A train/validation split with whole subjects held out for validation."""

    train: np.ndarray
    val: np.ndarray
    val_subjects: tuple[str, ...]


def subject_groups(samples: Sequence[Sample]) -> dict[str, np.ndarray]:
    """Sample indices per subject (``database/subject``), subjects in sorted order."""
    groups: dict[str, list[int]] = {}
    for position, sample in enumerate(samples):
        groups.setdefault(f"{sample.database}/{sample.subject}", []).append(position)
    return {key: np.asarray(groups[key], dtype=np.int64) for key in sorted(groups)}


def _fold(number: int, groups: dict[str, np.ndarray], held_out: Sequence[str]) -> Fold:
    """A fold whose test side is exactly the ``held_out`` subjects."""
    out = set(held_out)
    test = [groups[k] for k in groups if k in out]
    train = [groups[k] for k in groups if k not in out]
    empty = np.zeros(0, dtype=np.int64)
    return Fold(
        number,
        np.sort(np.concatenate(train)) if train else empty,
        np.sort(np.concatenate(test)) if test else empty,
        tuple(sorted(out)),
    )


def _check_loso(subjects: int) -> None:
    if subjects < 2:
        raise DataError(
            f"leave-one-subject-out needs at least 2 subjects, the samples hold {subjects}. "
            f"Add subjects to the site or evaluate on another site."
        )


def _each_subject(groups: dict[str, np.ndarray]) -> list[Fold]:
    """One fold per subject of ``groups``, in their (sorted) order."""
    return [_fold(i, groups, [subject]) for i, subject in enumerate(groups)]


def loso_folds(samples: Sequence[Sample]) -> list[Fold]:
    """One fold per subject, in sorted subject order (no seed: LOSO has a single answer)."""
    groups = subject_groups(samples)
    _check_loso(len(groups))
    return _each_subject(groups)


def site_loso_folds(sites: Sequence[Sequence[Sample]]) -> list[SiteFold]:
    """Leave-one-subject-out over several sites at once (MEGC2019 composite): one fold per subject of every site,
    sites in order and subjects sorted within a site; a fold trains on every other subject of every site.

    Subjects are told apart by site, so two sites of one database never merge two people; one site alone gives
    :func:`loso_folds`'s folds. A site may hold a single subject as long as the sites hold two together.
    """
    groups = [subject_groups(samples) for samples in sites]
    _check_loso(sum(len(site) for site in groups))
    everything = [np.arange(len(samples), dtype=np.int64) for samples in sites]
    folds: list[SiteFold] = []
    for position, (samples, site) in enumerate(zip(sites, groups, strict=True)):
        for fold in _each_subject(site):
            train = tuple(fold.train if other == position else whole for other, whole in enumerate(everything))
            folds.append(SiteFold(len(folds), position, samples[fold.test[0]].subject, train, fold.test))
    return folds


def subject_k_folds(samples: Sequence[Sample], k: int, seed: int = 0) -> list[Fold]:
    """``k`` folds of whole subjects with sample counts as even as the subjects allow; deterministic by ``seed``.

    Subjects are shuffled by the seed, then each in turn goes to the fold
    holding the fewest samples so far (so the seed always matters).
    """
    groups = subject_groups(samples)
    if k < 2 or k > len(groups):
        raise DataError(
            f"cannot make {k} subject folds from {len(groups)} subjects: k must be between 2 and the number of "
            f"subjects. Use a k in that range, or leave-one-subject-out."
        )
    names = list(groups)
    members: list[list[str]] = [[] for _ in range(k)]
    sizes = [0] * k
    for i in np.random.default_rng(seed).permutation(len(names)):
        target = min(range(k), key=lambda f: (len(members[f]) > 0, sizes[f], f))
        members[target].append(names[i])
        sizes[target] += len(groups[names[i]])
    return [_fold(i, groups, held) for i, held in enumerate(members)]


def subject_holdout(
    samples: Sequence[Sample], fraction: float | None = None, count: int | None = None, seed: int = 0
) -> Holdout:
    """Hold out whole subjects for validation: ``count`` of them, or ``fraction`` of them (at least one).

    At least one subject always stays in training. Deterministic by ``seed``.
    """
    groups = subject_groups(samples)
    wanted = _holdout_count(len(groups), fraction, count)
    chosen = [list(groups)[i] for i in np.random.default_rng(seed).permutation(len(groups))[:wanted]]
    fold = _fold(0, groups, chosen)
    return Holdout(fold.train, fold.test, fold.test_subjects)


def _holdout_count(subjects: int, fraction: float | None, count: int | None) -> int:
    """How many subjects to hold out; DataError when the request cannot leave both sides non-empty."""
    if (fraction is None) == (count is None):
        raise DataError("give exactly one of fraction (e.g. 0.2) or count (e.g. 2) for the validation subjects.")
    if fraction is not None:
        if not 0 < fraction < 1:
            raise DataError(f"validation fraction {fraction} must lie strictly between 0 and 1.")
        count = max(1, round(fraction * subjects))
    if count is None or count < 1 or count >= subjects:
        raise DataError(
            f"cannot hold out {count} of {subjects} subjects for validation: at least one must stay on each side. "
            f"Ask for between 1 and {subjects - 1} subjects, or add subjects."
        )
    return count
