"""Fixtures shared by the test modules.

``tiny_sites``: the tiny synthetic federation (``fedmer simulate --scale tiny``'s CASME II-, SAMM- and SMIC-format
sites, 3 subjects x 2 clips each) written and prepared once per session: synthesising and preparing it takes
about 30 s, and the simulation, baseline and ClientApp tests all read the same sites. Every test reads it; a test
that changes a site or the cache copies them first (``shutil.copytree``) and changes the copy.

``consoles``: where log records would reach the console (Flower's handler, a plain root handler), as buffers.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flwr.common.logger import console_handler
from flwr.supercore.task_identity import TaskIdentity

from server.simulate import Scale, prepare_data, simulation_config

TINY_SITES = ("casme2", "samm", "smic")  # the run config's default sites


@dataclass(frozen=True)
class TinySites:
    """Where the prepared tiny sites lie: ``data`` is what ``--data`` / ``simulation_config`` take (the sites lie
    in ``data_root``, ``<data>-tiny``, one folder per database); ``cache`` is the preprocessing cache."""

    data: Path
    data_root: Path
    cache: Path
    sites: tuple[str, ...] = TINY_SITES

    def config(self, config_file: Path | None = None, **options: Any) -> dict[str, Any]:
        """The resolved run config of a tiny run on these sites (``fedmer simulate``'s resolution)."""
        return simulation_config(
            scale=Scale.tiny, data=self.data, cache=self.cache, config_file=config_file, options=options
        )


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory: pytest.TempPathFactory) -> TinySites:
    root = tmp_path_factory.mktemp("tiny-federation").resolve()  # as the run config records it
    sites = TinySites(root / "synthetic", root / "synthetic-tiny", root / "cache")
    prepare_data(sites.config(out=str(root / "unused")), Scale.tiny)
    return sites


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages built outside a Flower process need a run and node identity (a ServerApp gets one from the
    SuperLink); the strategy tests use it (``pytest.mark.usefixtures("task_identity")``)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture
def consoles(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, io.StringIO]]:
    """Where log records would reach the console, written to buffers: Flower's own console handler, and a plain
    root handler like the one Opacus's ``logging.basicConfig`` adds (which printed each Flower line a second time).
    Handlers keep the stream they were made with, so capturing sys.stdout / sys.stderr would not see them."""
    flower, root = io.StringIO(), io.StringIO()
    monkeypatch.setattr(console_handler, "stream", flower)
    plain = logging.StreamHandler(root)
    logging.getLogger().addHandler(plain)
    try:
        yield {"flower": flower, "root": root}
    finally:
        logging.getLogger().removeHandler(plain)
