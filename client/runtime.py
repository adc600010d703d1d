"""Process settings for training on a CPU that other jobs share. Import and apply before torch is imported.

torch's OpenMP threads spin while they wait for each other. When another job holds a core, a spinning thread
burns the time slice its partner needs, and every parallel region stalls: beside other jobs (load 5.6 on
2 cores) a ``lite`` training step took 11.3 s with OpenMP's default policy and 4.3 s with passive waiting, and
still 6.0 s with a single thread (``benchmarks/model_step.py``, "levers"). Passive waiting is what the
``fedmer`` command and its simulated sites use; a value already in the environment wins.
"""

from __future__ import annotations

import os

THREAD_ENV: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_thread_env() -> None:
    """Set :data:`THREAD_ENV` where the environment does not say otherwise. OpenMP reads it once, when torch
    loads, so this must run before the first ``import torch`` of the process."""
    for key, value in THREAD_ENV.items():
        os.environ.setdefault(key, value)
