"""The learning-rate schedule: its curve, and federated rounds that follow the same curve as one central run."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from client.schedule import LearningRateSchedule, ScheduledSteps
from client.site import RunSettings
from partitions.errors import DataError


def test_warm_up_then_cosine_to_zero() -> None:
    schedule = LearningRateSchedule(peak=1e-3, kind="cosine", warmup_epochs=2, total_epochs=10)
    assert schedule.at(0) == pytest.approx(1e-3 * 1e-3 / 2)  # small but not zero: the first step moves
    assert schedule.at(1) == pytest.approx(0.5e-3, rel=1e-3)
    assert schedule.at(2) == pytest.approx(1e-3)
    assert schedule.at(6) == pytest.approx(0.5e-3)  # half-way through the decay
    assert schedule.at(10) == pytest.approx(0.0, abs=1e-12)
    decay = [schedule.at(2 + 0.5 * i) for i in range(17)]
    assert all(a > b for a, b in itertools.pairwise(decay))


def test_constant_ignores_warm_up_and_length() -> None:
    schedule = LearningRateSchedule(peak=3e-4, kind="constant", warmup_epochs=5, total_epochs=2)
    assert {schedule.at(e) for e in (0, 0.5, 1.9, 7)} == {3e-4}


@pytest.mark.parametrize(
    ("options", "word"),
    [({"kind": "step"}, "lr-schedule"), ({"peak": 0.0}, "positive"), ({"warmup_epochs": -1.0}, "warm-up")],
)
def test_bad_schedules_are_refused(options: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        LearningRateSchedule(**{"peak": 1e-3, "total_epochs": 4, **options})


def rates_seen(options, steps_per_epoch: int) -> list[float]:
    """The rate before each optimiser step of one call's epochs, as ``client.task`` sets them."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    steps = ScheduledSteps(optimizer, options.schedule, steps_per_epoch, options.first_epoch)
    seen = []
    for epoch in range(options.first_epoch, options.first_epoch + options.epochs):
        steps.start_epoch(epoch)
        for _ in range(steps_per_epoch):
            seen.append(optimizer.param_groups[0]["lr"])
            steps.advance()
    return seen


def test_federated_rounds_follow_the_central_run_curve() -> None:
    """Three rounds of two local epochs, each with a fresh optimiser, see the rates of one six-epoch run."""
    recipe = {"lr": 1e-3, "lr_schedule": "cosine", "warmup_epochs": 1.0, "local_epochs": 2}
    federated = RunSettings(rounds=3, **recipe)
    rounds = [rates_seen(federated.local_training(r, seed=0, device="cpu"), 4) for r in (1, 2, 3)]
    central = rates_seen(RunSettings(rounds=1, **{**recipe, "local_epochs": 6}).local_training(1, 0, "cpu"), 4)
    assert [rate for one in rounds for rate in one] == pytest.approx(central)
    assert max(central) == pytest.approx(1e-3, rel=0.05)
    assert central[-1] < 0.02 * 1e-3
    assert rounds[1][0] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 1 / 5)))  # epoch 2 of 1 + 5


def test_the_run_config_reads_and_checks_the_recipe() -> None:
    settings = RunSettings.from_config(
        {
            "lr": 0.002,
            "lr-schedule": "cosine",
            "warmup-epochs": 0.5,
            "weight-decay": 0.01,
            "class-balance": "true",
            "label-smoothing": 0.2,
        }
    )
    options = settings.local_training(2, seed=5, device="cpu")
    assert (options.lr, options.lr_schedule, options.warmup_epochs) == (0.002, "cosine", 0.5)
    assert (options.weight_decay, options.balance_classes, options.label_smoothing) == (0.01, True, 0.2)
    bad = (("lr-schedule", "step"), ("warmup-epochs", -1), ("weight-decay", -0.1), ("lr", 0), ("label-smoothing", 1))
    for key, value in bad:
        with pytest.raises(DataError, match=key):
            RunSettings.from_config({key: value})
