"""A site's privacy spending across federated rounds: RDP accounting kept as plain lists, and the run's noise.

A site's epsilon must add up over every release it makes in a run, but the ClientApp is rebuilt for every
message. Everything the RDP accountant needs is its history of (noise multiplier, sample rate, steps) runs,
so a :class:`PrivacyLedger` holds that history as parallel lists of floats and ints, which the site's state
file keeps on disk between messages and restarts (:mod:`client.state`; this module imports no Flower).
Two kinds of release are counted:

- training: DP-SGD steps, each a subsampled Gaussian mechanism (Opacus's ``RDPAccountant`` history);
- the AU-count query: one Gaussian mechanism on the whole training split (sample rate 1, one step) per query
  (:mod:`client.privacy.statistics`).

With a target epsilon, the training noise multiplier is fixed at the site's first training round, for the
whole run (rounds x local epochs x steps per epoch) and after the queries already made, so that the budget is
spent by the last round and not per round. RDP composes by adding the orders' divergences (Mironov, CSF 2017);
Opacus's ``RDPAccountant`` converts them to (epsilon, delta).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opacus.accountants import RDPAccountant

HISTORY_KEYS = ("history-noise-multiplier", "history-sample-rate", "history-steps")
"""Record keys of the DP-SGD accountant's history: one entry per run of steps with the same noise and rate."""
QUERY_NOISE = "query-noise-multiplier"  # one entry per noised AU-count release
NOISE_MULTIPLIER = "noise-multiplier"  # the run's training noise, once fixed
DELTA = "delta"

HistoryRecord = dict[str, list[float] | list[int]]
Entry = tuple[float, float, int]  # (noise multiplier, sample rate, steps), as in RDPAccountant.history

EPSILON_TOLERANCE = 0.01
"""How far below a target epsilon the chosen noise may leave the run (Opacus's ``get_noise_multiplier`` default)."""


def history_record(accountant: RDPAccountant) -> HistoryRecord:
    """The accountant's history as three parallel plain lists (empty lists for a fresh accountant)."""
    return _entries_record(accountant.history)


def _entries_record(entries: Sequence[Entry]) -> HistoryRecord:
    noise, rate, steps = HISTORY_KEYS
    return {
        noise: [float(entry[0]) for entry in entries],
        rate: [float(entry[1]) for entry in entries],
        steps: [int(entry[2]) for entry in entries],
    }


def history_entries(record: Mapping[str, Any] | None) -> list[Entry]:
    """The history in ``record`` (none when it has no history keys); ValueError for a partial or ragged one."""
    if record is None or not any(key in record for key in HISTORY_KEYS):
        return []
    missing = [key for key in HISTORY_KEYS if key not in record]
    if missing:
        raise ValueError(f"privacy accountant record lacks {', '.join(missing)}; it needs all of {HISTORY_KEYS}")
    noise, rate, steps = (list(record[key]) for key in HISTORY_KEYS)
    if not len(noise) == len(rate) == len(steps):
        raise ValueError(f"privacy accountant record has lists of lengths {len(noise)}, {len(rate)}, {len(steps)}")
    return [(float(s), float(q), int(n)) for s, q, n in zip(noise, rate, steps, strict=True)]


def restore_accountant(record: Mapping[str, Any] | None) -> RDPAccountant:
    """An RDP accountant carrying the recorded DP-SGD history (a fresh one for None or a record without it)."""
    accountant = RDPAccountant()
    accountant.history = history_entries(record)
    return accountant


def epsilon_of(entries: Sequence[Entry], delta: float) -> float:
    """Epsilon at ``delta`` of the composed releases (0 for none)."""
    if not entries:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = list(entries)
    with warnings.catch_warnings():
        # very large noise makes the best RDP order the largest Opacus offers: the bound stays valid
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(accountant.get_epsilon(delta))


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


def noise_for_budget(target_epsilon: float, delta: float, run: RunLength, spent: Sequence[Entry] = ()) -> float:
    """The smallest noise multiplier (within :data:`EPSILON_TOLERANCE` of the target) that keeps the releases
    already ``spent`` plus the whole run's training at most ``target_epsilon``; ValueError when ``spent``
    alone has used the budget. Bisection, since epsilon falls monotonically as the noise grows."""

    def epsilon(noise: float) -> float:
        return epsilon_of([*spent, (noise, run.sample_rate, run.steps)], delta)

    if epsilon_of(spent, delta) >= target_epsilon:
        raise ValueError(
            f"target epsilon {target_epsilon} is already spent before training (epsilon "
            f"{epsilon_of(spent, delta):.3f} after the AU-count query): raise dp-target-epsilon or dp-query-noise"
        )
    low, high = 0.0, 1.0
    while epsilon(high) > target_epsilon:
        low, high = high, 2 * high
    while epsilon(high) < target_epsilon - EPSILON_TOLERANCE and high - low > 1e-6:
        middle = (low + high) / 2
        low, high = (middle, high) if epsilon(middle) > target_epsilon else (low, middle)
    return high


# ----------------------------------------------------------------------------------------------- the ledger


@dataclass
class PrivacyLedger:
    """Everything a site has released under DP in this run, and the run's fixed training noise and delta."""

    training: list[Entry] = field(default_factory=list)
    queries: list[float] = field(default_factory=list)  # noise multiplier of each AU-count release
    noise_multiplier: float | None = None
    delta: float | None = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PrivacyLedger:
        """The ledger :meth:`record` wrote; ValueError when a key it always writes is missing, so a damaged
        record can never read as a fresh ledger (which would let a site spend its budget again)."""
        missing = [key for key in (*HISTORY_KEYS, QUERY_NOISE) if key not in record]
        if missing:
            raise ValueError(f"privacy ledger record lacks {', '.join(missing)}")
        noise, delta = record.get(NOISE_MULTIPLIER), record.get(DELTA)
        return cls(
            training=history_entries(record),
            queries=[float(value) for value in record[QUERY_NOISE]],
            noise_multiplier=None if noise is None else float(noise),
            delta=None if delta is None else float(delta),
        )

    def training_history(self) -> HistoryRecord:
        """The DP-SGD part alone, as :func:`history_record` gives it (what ``make_private`` continues)."""
        return _entries_record(self.training)

    def record(self) -> dict[str, Any]:
        """Plain lists and numbers for a ConfigRecord (keys without a value yet are left out)."""
        record: dict[str, Any] = {**self.training_history(), QUERY_NOISE: list(self.queries)}
        if self.noise_multiplier is not None:
            record[NOISE_MULTIPLIER] = self.noise_multiplier
        if self.delta is not None:
            record[DELTA] = self.delta
        return record

    @property
    def releases(self) -> list[Entry]:
        """Every release as an RDP history entry: a query is one Gaussian step at sample rate 1."""
        return [*((noise, 1.0, 1) for noise in self.queries), *self.training]

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far, at ``delta`` (default the ledger's own)."""
        chosen = self.delta if delta is None else delta
        if chosen is None:
            raise ValueError("the ledger has no delta yet: pass one")
        return epsilon_of(self.releases, chosen)

    def epsilon_after(self, noise: float, sample_rate: float, steps: int, delta: float) -> float:
        """Epsilon once ``steps`` more DP-SGD steps at this noise and rate are spent."""
        return epsilon_of([*self.releases, (noise, sample_rate, steps)], delta)

    @property
    def steps(self) -> int:
        """DP-SGD steps taken in the run so far."""
        return sum(entry[2] for entry in self.training)

    @property
    def sample_rate(self) -> float:
        """The last training step's sample rate (0 before any training)."""
        return self.training[-1][1] if self.training else 0.0


# ----------------------------------------------------------------------------------------------- a round's plan


class BudgetExhausted(RuntimeError):
    """The site's next training round would spend more than its privacy budget."""


def plan_round(
    ledger: PrivacyLedger,
    run: RunLength,
    *,
    delta: float,
    noise_multiplier: float | None,
    target_epsilon: float | None,
) -> float:
    """The round's training noise multiplier. Fixes the run's delta and training noise in ``ledger`` on the first
    call (later calls keep them), and checks that one more round of ``run.local_epochs`` epochs stays within
    ``target_epsilon``.

    ``noise_multiplier`` None: the noise that spends ``target_epsilon`` over the whole ``run`` after the
    releases already in the ledger. Raises :class:`BudgetExhausted` naming the epsilon spent and the one this
    round would reach (RDP composition is additive, so the last planned round lands at the target, not over it).
    """
    if ledger.delta is None:
        ledger.delta = delta
    if ledger.noise_multiplier is None:
        if noise_multiplier is None:
            assert target_epsilon is not None, "plan_round needs a noise multiplier or a target epsilon"
            noise_multiplier = noise_for_budget(target_epsilon, ledger.delta, run, ledger.releases)
        ledger.noise_multiplier = float(noise_multiplier)
    steps = run.local_epochs * run.steps_per_epoch
    after = ledger.epsilon_after(ledger.noise_multiplier, run.sample_rate, steps, ledger.delta)
    if target_epsilon is not None and after > target_epsilon * (1 + 1e-9):
        raise BudgetExhausted(
            f"privacy budget exhausted: epsilon {ledger.epsilon():.3f} of dp-target-epsilon={target_epsilon:g} "
            f"spent (delta {ledger.delta:.2g}); another round of {steps} DP-SGD steps would reach {after:.3f}"
        )
    return ledger.noise_multiplier
