"""Subject-grouped splits: a subject is never on both sides (datasets.md, "Protocols" pitfalls)."""

from __future__ import annotations

import numpy as np
import pytest
from handmade import assert_user_message, fake_samples

from partitions.errors import DataError
from partitions.splits import loso_folds, site_loso_folds, subject_holdout, subject_k_folds

SIZES = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]


def subjects_at(samples: list, indices: np.ndarray) -> set[str]:
    return {samples[i].subject for i in indices}


def assert_partition(samples: list, train: np.ndarray, test: np.ndarray) -> None:
    """Train and test together cover every sample once, and share no subject."""
    assert sorted([*train.tolist(), *test.tolist()]) == list(range(len(samples)))
    assert not subjects_at(samples, train) & subjects_at(samples, test)


def test_loso_has_one_fold_per_subject() -> None:
    samples = fake_samples(SIZES)
    folds = loso_folds(samples)
    assert len(folds) == len(SIZES)
    assert [f.test_subjects for f in folds] == [(f"casme2/sub{i:02d}",) for i in range(1, len(SIZES) + 1)]
    for fold, size in zip(folds, SIZES, strict=True):
        assert len(fold.test) == size
        assert_partition(samples, fold.train, fold.test)


def test_loso_keys_subjects_by_database() -> None:
    samples = fake_samples([2, 2]) + fake_samples([1], database="samm")
    folds = loso_folds(samples)
    assert len(folds) == 3  # casme2/sub01 and samm/sub01 are different people


def test_loso_needs_two_subjects() -> None:
    with pytest.raises(DataError) as error:
        loso_folds(fake_samples([4]))
    assert_user_message(error, "at least 2 subjects", "hold 1")
    with pytest.raises(DataError) as error:
        site_loso_folds([fake_samples([4]), []])
    assert_user_message(error, "at least 2 subjects", "hold 1")


def test_site_loso_holds_out_each_subject_of_every_site_and_trains_on_all_the_others() -> None:
    sites = [fake_samples([2, 3]), fake_samples([1, 2]), fake_samples([4], database="samm")]  # two casme2 sites
    folds = site_loso_folds(sites)
    assert [(f.index, f.site, f.subject) for f in folds] == [
        (0, 0, "sub01"),
        (1, 0, "sub02"),
        (2, 1, "sub01"),
        (3, 1, "sub02"),
        (4, 2, "sub01"),
    ]  # sites in order; one site's sub01 is not another's, even under one database
    for fold in folds:
        assert_partition(sites[fold.site], fold.train[fold.site], fold.test)
        assert subjects_at(sites[fold.site], fold.test) == {fold.subject}
        others = [other for other in range(len(sites)) if other != fold.site]
        assert all(np.array_equal(fold.train[o], np.arange(len(sites[o]))) for o in others)
    held = sorted((fold.site, i) for fold in folds for i in fold.test.tolist())
    assert held == [(site, i) for site, samples in enumerate(sites) for i in range(len(samples))]  # each once
    alone = site_loso_folds([sites[0]])  # one site: loso_folds's folds
    assert [(f.train[0].tolist(), f.test.tolist()) for f in alone] == [
        (f.train.tolist(), f.test.tolist()) for f in loso_folds(sites[0])
    ]


def test_k_folds_cover_every_sample_once_and_keep_subjects_whole() -> None:
    samples = fake_samples(SIZES)
    folds = subject_k_folds(samples, k=3, seed=7)
    assert len(folds) == 3
    assert sorted(i for f in folds for i in f.test.tolist()) == list(range(len(samples)))
    for fold in folds:
        assert len(fold.test) > 0
        assert_partition(samples, fold.train, fold.test)


def test_k_folds_are_deterministic_by_seed_and_differ_between_seeds() -> None:
    samples = fake_samples(SIZES)
    first = [f.test_subjects for f in subject_k_folds(samples, k=3, seed=1)]
    again = [f.test_subjects for f in subject_k_folds(samples, k=3, seed=1)]
    other = [f.test_subjects for f in subject_k_folds(samples, k=3, seed=2)]
    assert first == again
    assert first != other


def test_k_folds_balance_sample_counts() -> None:
    samples = fake_samples([2] * 12)
    assert [len(f.test) for f in subject_k_folds(samples, k=4, seed=0)] == [6, 6, 6, 6]


@pytest.mark.parametrize("k", [1, 11])
def test_impossible_k(k: int) -> None:
    with pytest.raises(DataError) as error:
        subject_k_folds(fake_samples(SIZES), k=k)
    assert_user_message(error, f"cannot make {k} subject folds from 10 subjects", "Use a k in that range")


def test_holdout_by_fraction_and_by_count() -> None:
    samples = fake_samples(SIZES)
    by_fraction = subject_holdout(samples, fraction=0.2, seed=3)
    assert len(by_fraction.val_subjects) == 2
    assert subjects_at(samples, by_fraction.val) == {s.split("/")[1] for s in by_fraction.val_subjects}
    assert_partition(samples, by_fraction.train, by_fraction.val)
    by_count = subject_holdout(samples, count=3, seed=3)
    assert len(by_count.val_subjects) == 3
    assert_partition(samples, by_count.train, by_count.val)
    assert len(subject_holdout(samples, fraction=0.01).val_subjects) == 1  # at least one subject


def test_holdout_is_deterministic_by_seed() -> None:
    samples = fake_samples(SIZES)
    picks = {subject_holdout(samples, count=2, seed=seed).val_subjects for seed in range(6)}
    assert (
        subject_holdout(samples, count=2, seed=4).val_subjects == subject_holdout(samples, count=2, seed=4).val_subjects
    )
    assert len(picks) > 1


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"count": 10}, "cannot hold out 10 of 10 subjects"),
        ({"count": 0}, "cannot hold out 0 of 10 subjects"),
        ({"fraction": 1.5}, "strictly between 0 and 1"),
        ({}, "exactly one of fraction"),
        ({"fraction": 0.2, "count": 2}, "exactly one of fraction"),
    ],
)
def test_impossible_holdout(kwargs: dict, fragment: str) -> None:
    with pytest.raises(DataError) as error:
        subject_holdout(fake_samples(SIZES), **kwargs)
    assert_user_message(error, fragment)
