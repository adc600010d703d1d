"""Flower's and Ray's output during a federation goes to the run directory's ``logs/``, not to the console.

Left alone, a simulation prints every Flower log line twice: Flower's own coloured console handler, and a plain
copy through the root logger, which Opacus configures with ``logging.basicConfig`` when it is imported. DEBUG
lines come with them, as does the deprecation warning, the aggregated metrics of every round (weighted means of
per-site scores that contradict the pooled ones) and about 270 lines of "Final results". Ray streams its
workers' output to the driver, prefixed ``(ClientAppActor pid=...)``.

Inside :func:`captured_logs`:

- ``logs/flower.log`` gets every record of the ``flwr`` logger (DEBUG and up), of Ray's driver logger ``ray``
  (WARNING and up, as Ray sets it) and the Python warnings raised meanwhile (``py.warnings``), one plain line
  each;
- unless ``verbose``, none of them reaches the console; with ``verbose`` they print as they would have, except
  Flower's plain copy through the root logger: Flower's lines show once, from its coloured handler (INFO and
  up; DEBUG stays in the file);
- afterwards Ray's session logs (``$RAY_TMPDIR/ray/session_*/logs``: the raylet's, the GCS's and every worker's
  stdout and stderr, ``worker-*.out`` / ``worker-*.err``, where the ClientApps' own Flower lines land) are
  copied to ``logs/ray/<session>/``, before the private ``RAY_TMPDIR`` is removed.

Ray's workers reach the console only through ``log_to_driver`` (:func:`ray_init_args`): on with ``verbose``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.records import LOGS

FLOWER_LOG = "flower.log"
RAY_LOGS = "ray"
FLOWER = "flwr"
CAPTURED = (FLOWER, "ray", "py.warnings")
"""The loggers whose records go to ``logs/flower.log``: Flower's, Ray's driver logger, Python's warnings."""
LINE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def ray_init_args(verbose: bool) -> dict[str, Any]:
    """``ray.init`` arguments (the backend config's ``init_args``): workers' output on the console only when
    ``verbose``; it stays in their session log files either way."""
    return {"logging_level": "WARNING", "log_to_driver": verbose}


@dataclass
class _Route:
    """A logger sent to the log file, with its settings from before, restored by :meth:`restore`."""

    logger: logging.Logger
    file_handler: logging.Handler
    handlers: list[logging.Handler]
    propagate: bool
    level: int

    def restore(self) -> None:
        self.logger.handlers = self.handlers
        self.logger.propagate = self.propagate
        self.logger.setLevel(self.level)
        self.file_handler.close()


def _route(name: str, path: Path, verbose: bool) -> _Route:
    """Send logger ``name`` to the file ``path``; with ``verbose`` also where it went before, except Flower's copy
    through the root logger (Flower prints through its own handler already).

    Each logger gets a handler of its own on the file: ``ray.init`` re-formats the handlers of its logger.
    """
    logger = logging.getLogger(name)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(LINE_FORMAT))
    route = _Route(logger, file_handler, list(logger.handlers), logger.propagate, logger.level)
    logger.handlers = [file_handler, *(route.handlers if verbose else [])]
    logger.propagate = verbose and route.propagate and name != FLOWER
    if name == FLOWER:
        logger.setLevel(logging.DEBUG)  # Flower's own default; Opacus changes it on import
    return route


def copy_ray_logs(ray_tmp: Path, target: Path) -> list[Path]:
    """Each Ray session's log folder under ``ray_tmp`` copied to ``target/<session>`` (files only: links are
    followed, dangling ones skipped). Returns the copies."""
    copies = []
    for logs in sorted((ray_tmp / "ray").glob("session_2*/logs")):
        copy = target / logs.parent.name
        shutil.copytree(logs, copy, symlinks=False, ignore_dangling_symlinks=True, dirs_exist_ok=True)
        copies.append(copy)
    return copies


@contextlib.contextmanager
def captured_logs(run: Path, *, verbose: bool = False, ray_tmp: Path | None = None) -> Iterator[Path]:
    """Flower's, Ray's and Python's warning output to ``<run>/logs/`` while the block runs (see the module
    docstring); yields the ``logs`` folder. Every logger is restored afterwards, and Ray's session logs under
    ``ray_tmp`` are copied even when the block fails."""
    logs = run / LOGS
    logs.mkdir(parents=True, exist_ok=True)
    capturing = warnings.showwarning is getattr(logging, "_showwarning", None)  # someone captures already
    routes = [_route(name, logs / FLOWER_LOG, verbose) for name in CAPTURED]
    logging.captureWarnings(True)
    try:
        yield logs
    finally:
        logging.captureWarnings(capturing)
        for route in routes:
            route.restore()
        if ray_tmp is not None:
            copy_ray_logs(ray_tmp, logs / RAY_LOGS)
