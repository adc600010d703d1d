"""The learning rate over a whole run: linear warm-up, then cosine decay to zero (or constant).

A federated run is ``rounds x local-epochs`` epochs of one schedule: round r trains epochs
``[(r - 1) E, r E)`` of it, with its optimiser fresh each round, so central training (one long round) and
federated training (many short ones) follow the same curve over the same epochs. Warm-up matters because the
recognition head starts on a tiny motion signal (see ``models.recognition``); the cosine tail lets the last
epochs settle instead of hopping between minima of a 100-clip training set (README "A recipe that learns").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class LearningRateSchedule:
    """``peak`` after ``warmup_epochs`` of linear warm-up; ``cosine`` then decays to 0 at ``total_epochs``."""

    peak: float
    kind: str = "cosine"
    warmup_epochs: float = 1.0
    total_epochs: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"lr-schedule={self.kind!r}: choose one of {', '.join(SCHEDULES)}")
        if self.peak <= 0 or self.total_epochs <= 0 or self.warmup_epochs < 0:
            raise ValueError(
                f"lr={self.peak}, warm-up {self.warmup_epochs} and {self.total_epochs} epochs: the rate and the "
                "run's length must be positive and the warm-up not negative"
            )

    def at(self, epoch: float) -> float:
        """The rate at a fractional epoch of the run (0 = its first step)."""
        if self.kind == "constant":
            return self.peak
        warmup = min(self.warmup_epochs, self.total_epochs)
        if epoch < warmup:
            return self.peak * (epoch + 1e-3) / warmup  # never exactly 0: the first step still moves
        progress = min((epoch - warmup) / max(self.total_epochs - warmup, 1e-9), 1.0)
        return self.peak * 0.5 * (1.0 + math.cos(math.pi * progress))


class ScheduledSteps:
    """Sets an optimiser's rate before each of its steps: ``first_epoch`` + the steps taken / steps per epoch."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, schedule: LearningRateSchedule, steps_per_epoch: int, first_epoch: int
    ) -> None:
        self.optimizer = optimizer
        self.schedule = schedule
        self.steps_per_epoch = max(steps_per_epoch, 1)
        self.position = float(first_epoch)
        self.apply()

    def apply(self) -> None:
        rate = self.schedule.at(self.position)
        for group in self.optimizer.param_groups:
            group["lr"] = rate

    def advance(self) -> None:
        """After one optimiser step (an empty DP step included): move on and set the next step's rate."""
        self.position += 1.0 / self.steps_per_epoch
        self.apply()

    def start_epoch(self, epoch: int) -> None:
        """Snap to the epoch's start, so a Poisson epoch with more or fewer steps than expected does not drift."""
        self.position = float(epoch)
        self.apply()
