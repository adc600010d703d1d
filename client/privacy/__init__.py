"""Sample-level differential privacy at a site (Opacus DP-SGD): settings, wrapping, accounting, validation.

Split as Opacus splits its own: ``engine`` (settings and ``make_private``), ``accountant`` (state across
rounds, the run's noise), ``norm_samplers`` (ghost clipping fixed for this network), ``validators``.
"""

from .accountant import HISTORY_KEYS, RunLength, history_record, noise_for_budget, restore_accountant
from .engine import MODES, PerSampleLoss, PrivacySettings, PrivateTraining, make_private, wrap_model
from .validators import PrivacyIncompatibleModel, validate_model

__all__ = [
    "HISTORY_KEYS",
    "MODES",
    "PerSampleLoss",
    "PrivacyIncompatibleModel",
    "PrivacySettings",
    "PrivateTraining",
    "RunLength",
    "history_record",
    "make_private",
    "noise_for_budget",
    "restore_accountant",
    "validate_model",
    "wrap_model",
]
