"""Privacy accounting across federated rounds: RDP accountant state as plain lists, and the run's noise.

A site's epsilon must add up over every round it trains in, but the ClientApp is rebuilt each round. The
RDP accountant's whole state is its ``history`` of (noise multiplier, sample rate, steps) runs, so it
travels as three equal-length lists of ints and floats, which a Flower ConfigRecord or MetricRecord holds
(this module imports no Flower). With a target epsilon, the noise multiplier is fixed once for the whole
run (rounds x local epochs x steps per epoch) so that the budget is spent by the last round, not per round.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

HISTORY_KEYS = ("dp-noise-multiplier", "dp-sample-rate", "dp-steps")
"""Record keys of the accountant's history: one entry per run of steps with the same noise and rate."""

HistoryRecord = dict[str, list[float] | list[int]]


def history_record(accountant: RDPAccountant) -> HistoryRecord:
    """The accountant's history as three parallel plain lists (empty lists for a fresh accountant)."""
    noise, rate, steps = HISTORY_KEYS
    return {
        noise: [float(entry[0]) for entry in accountant.history],
        rate: [float(entry[1]) for entry in accountant.history],
        steps: [int(entry[2]) for entry in accountant.history],
    }


def restore_accountant(record: Mapping[str, Sequence[float] | Sequence[int]] | None) -> RDPAccountant:
    """An RDP accountant carrying the recorded history (a fresh one for None or a record without it)."""
    accountant = RDPAccountant()
    if record is None or not any(key in record for key in HISTORY_KEYS):
        return accountant
    missing = [key for key in HISTORY_KEYS if key not in record]
    if missing:
        raise ValueError(f"privacy accountant record lacks {', '.join(missing)}; it needs all of {HISTORY_KEYS}")
    noise, rate, steps = (list(record[key]) for key in HISTORY_KEYS)
    if not len(noise) == len(rate) == len(steps):
        raise ValueError(f"privacy accountant record has lists of lengths {len(noise)}, {len(rate)}, {len(steps)}")
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in zip(noise, rate, steps, strict=True)]
    return accountant


@dataclass(frozen=True)
class RunLength:
    """How many local epochs a site trains over the whole federation, and how many steps make an epoch."""

    rounds: int
    local_epochs: int
    steps_per_epoch: int  # len(loader): Opacus's Poisson sample rate is 1 / steps_per_epoch

    @property
    def sample_rate(self) -> float:
        return 1.0 / self.steps_per_epoch

    @property
    def steps(self) -> int:
        return self.rounds * self.local_epochs * self.steps_per_epoch


def noise_for_budget(target_epsilon: float, delta: float, run: RunLength) -> float:
    """The smallest noise multiplier (to Opacus's 0.01 epsilon tolerance) that keeps the whole run's epsilon
    at most ``target_epsilon``; the same number every round, since it depends on the run only."""
    with warnings.catch_warnings():
        # the bisection tries noise levels whose best RDP order is the largest Opacus offers: harmless there
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=run.sample_rate, steps=run.steps,
            accountant="rdp",
        )
