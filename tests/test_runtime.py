"""The fedmer command's process settings: OpenMP waits passively unless the environment says otherwise, and the
setting is in place before torch (and with it OpenMP) loads."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = (
    "import sys, os; import server.cli; import torch; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
)


def probe(env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout


def test_the_fedmer_command_sets_passive_openmp_waiting_before_torch_loads() -> None:
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    assert probe(env).split() == ["PASSIVE", "True"]
    before_torch = "import sys, client.runtime as r; r.apply_thread_env(); print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", before_torch], env=env, capture_output=True, text=True).stdout
        == "False\n"
    )


def test_a_wait_policy_in_the_environment_wins() -> None:
    assert probe({**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}).split() == ["ACTIVE", "True"]
