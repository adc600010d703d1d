"""Flower's, Ray's and Python's warning output goes to ``<run>/logs/`` during a federation, and to the console only
with ``--verbose``; cheap checks on the logging machinery itself (the whole federation: tests/test_simulation.py)."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import pytest
from flwr.common.logger import FLOWER_LOGGER

from server.run_logs import FLOWER_LOG, RAY_LOGS, captured_logs, copy_ray_logs, ray_init_args
from server.simulate import backend_config


def say_everything() -> None:
    """One line at each level from Flower, one from Ray's driver logger and one Python warning."""
    FLOWER_LOGGER.debug("flower debug line")
    FLOWER_LOGGER.info("flower info line")
    FLOWER_LOGGER.warning("DEPRECATED FEATURE: flower warning line")
    logging.getLogger("ray").warning("ray warning line")
    warnings.warn("a python warning line", UserWarning, stacklevel=1)


def test_by_default_flower_ray_and_warnings_go_to_the_log_file_only(
    tmp_path: Path, consoles: dict[str, io.StringIO]
) -> None:
    flower_before = (list(FLOWER_LOGGER.handlers), FLOWER_LOGGER.propagate, FLOWER_LOGGER.level)
    with captured_logs(tmp_path / "run") as logs:
        say_everything()
    text = (logs / FLOWER_LOG).read_text()
    records = [row for row in text.splitlines() if row[:4].isdigit()]  # a record's first line starts with its date
    assert logs == tmp_path / "run" / "logs"
    for line in ("flower debug line", "flower info line", "flower warning line", "ray warning line", "python warning"):
        assert sum(line in row for row in records) == 1, text  # once each, DEBUG included
    assert consoles["flower"].getvalue() == "" and consoles["root"].getvalue() == ""
    assert (list(FLOWER_LOGGER.handlers), FLOWER_LOGGER.propagate, FLOWER_LOGGER.level) == flower_before

    FLOWER_LOGGER.info("after the run")  # Flower's console is as it was
    assert "after the run" in consoles["flower"].getvalue()
    assert "after the run" not in (logs / FLOWER_LOG).read_text()


def test_verbose_shows_flowers_lines_once_and_keeps_debug_in_the_file(
    tmp_path: Path, consoles: dict[str, io.StringIO]
) -> None:
    with captured_logs(tmp_path / "run", verbose=True) as logs:
        say_everything()
    shown = consoles["flower"].getvalue()
    assert "flower info line" in shown and "flower warning line" in shown and "flower debug line" not in shown
    assert "flower" not in consoles["root"].getvalue()  # no plain copy through the root logger
    assert "flower debug line" in (logs / FLOWER_LOG).read_text()


def test_ray_workers_reach_the_console_only_when_verbose() -> None:
    assert ray_init_args(verbose=False)["log_to_driver"] is False
    assert ray_init_args(verbose=True)["log_to_driver"] is True
    assert backend_config(3)["init_args"] == ray_init_args(verbose=False)  # what fedmer simulate hands Flower
    assert backend_config(3, verbose=True)["init_args"] == ray_init_args(verbose=True)


def test_rays_session_logs_are_copied_into_the_run_even_when_the_run_fails(tmp_path: Path) -> None:
    ray_tmp = tmp_path / "ray-tmp"
    session = ray_tmp / "ray" / "session_2026-01-01_00-00-00_000000_1"
    (session / "logs" / "events").mkdir(parents=True)
    (session / "logs" / "worker-1.err").write_text("(ClientAppActor) Manually terminating ClientAppActor\n")
    (session / "logs" / "events" / "event_GCS.log").write_text("{}\n")
    (session / "logs" / "gone.log").symlink_to(session / "nowhere")  # dangling: skipped
    (ray_tmp / "ray" / "session_latest").symlink_to(session)  # Ray's link to the newest session: not a second copy

    with pytest.raises(RuntimeError, match="site failed"), captured_logs(tmp_path / "run", ray_tmp=ray_tmp) as logs:
        raise RuntimeError("site failed")

    copied = logs / RAY_LOGS / session.name
    assert [path.name for path in (logs / RAY_LOGS).iterdir()] == [session.name]
    assert "ClientAppActor" in (copied / "worker-1.err").read_text()
    assert (copied / "events" / "event_GCS.log").is_file() and not (copied / "gone.log").is_symlink()
    assert copy_ray_logs(tmp_path / "no-ray-here", tmp_path / "copies") == []
