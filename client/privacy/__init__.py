"""Differential privacy at a site: DP-SGD through Opacus, private AU statistics, accounting across rounds.

Split as Opacus splits its own: ``engine`` (settings and ``make_private``), ``accountant`` (the site's ledger of
releases across rounds, the run's noise, a round's budget check), ``statistics`` (the noised AU-count query),
``norm_samplers`` (ghost clipping fixed for this network), ``validators``. Nothing here imports Flower.
"""

from .accountant import (
    HISTORY_KEYS,
    BudgetExhausted,
    HistoryRecord,
    PrivacyLedger,
    RunLength,
    epsilon_of,
    history_entries,
    history_record,
    noise_for_budget,
    plan_round,
    restore_accountant,
)
from .engine import (
    MODES,
    PerSampleLoss,
    PrivacySettings,
    PrivateTraining,
    default_delta,
    make_private,
    noise_generator,
    poisson_loader,
    wrap_model,
)
from .statistics import QUERY_CLIP, noised_cooccurrence
from .validators import PrivacyIncompatibleModel, validate_model

__all__ = [
    "HISTORY_KEYS",
    "MODES",
    "QUERY_CLIP",
    "BudgetExhausted",
    "HistoryRecord",
    "PerSampleLoss",
    "PrivacyIncompatibleModel",
    "PrivacyLedger",
    "PrivacySettings",
    "PrivateTraining",
    "RunLength",
    "default_delta",
    "epsilon_of",
    "history_entries",
    "history_record",
    "make_private",
    "noise_for_budget",
    "noise_generator",
    "noised_cooccurrence",
    "plan_round",
    "poisson_loader",
    "restore_accountant",
    "validate_model",
    "wrap_model",
]
