"""A site's state on disk: its privacy ledger and its local parameters, per run, so a SuperNode restart loses
neither.

Flower keeps ``context.state`` in the SuperNode's memory only: a restarted site would forget the epsilon it has
spent and could spend its budget again, without bound as restarts repeat. So every release a site makes (the
AU-count query, each DP-SGD round) is entered in a file under the node config's ``state-path`` before the reply
leaves, and the file is read back at every message. One file per run, named by the run's key (the server's
``run-key``, which a resumed run keeps; Flower's run id where a server sends none):

- ``<run-key>.json``: format, run key, site (index, dataset) and the ledger (``PrivacyLedger.record``);
- ``<run-key>.local.safetensors``: the parameters named by ``local-params``, which never leave the site.

Both are written atomically (temp file + ``os.replace``): a crash leaves the previous round's file, never half
of one. A file that cannot be read, or that belongs to another run or another site, is refused with
:class:`SiteStateError` rather than replaced by a fresh ledger: starting from zero is exactly the failure this
module exists to prevent. Errors name the file (not its folder, which stays in the site's own log) and the
node-config key.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from client.privacy import PrivacyLedger
from partitions.cache import atomic_write
from partitions.errors import DataError

FORMAT = "fedmer-site-state/1"
STATE_PATH = "state-path"
"""Node-config key of the folder (default ``<cache>/site-state/site-<index>-<dataset>``)."""

log = logging.getLogger("fedmer.client")


class SiteStateError(DataError):
    """The site's state file is unreadable or not this run's: the site refuses to go on from zero."""


def run_file_stem(run_key: str) -> str:
    """The run key as a file name: letters, digits, ``-`` and ``_`` only (a key is the server's, not trusted)."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", run_key)[:128]
    if not stem.strip("_"):
        raise SiteStateError(f"run key {run_key!r} names no state file: the server's run-key must not be empty")
    return stem


@dataclass(frozen=True)
class SiteState:
    """One site's state files of one run (see the module docstring)."""

    folder: Path
    run_key: str
    site_index: int
    dataset: str

    @property
    def ledger_path(self) -> Path:
        return self.folder / f"{run_file_stem(self.run_key)}.json"

    @property
    def local_path(self) -> Path:
        return self.folder / f"{run_file_stem(self.run_key)}.local.safetensors"

    @property
    def _site(self) -> dict[str, Any]:
        return {"index": self.site_index, "dataset": self.dataset}

    def _refuse(self, path: Path, problem: str) -> SiteStateError:
        log.error("site %d (%s): state file %s: %s", self.site_index, self.dataset, path, problem)
        return SiteStateError(
            f"site {self.site_index} ({self.dataset}): its state file {path.name} (node config {STATE_PATH}) "
            f"{problem}. The site's privacy ledger and local parameters of run {self.run_key} live there, so it will "
            "not go on in that run from zero: restore the file from a backup, or start a new run"
        )

    def load_ledger(self) -> PrivacyLedger:
        """The run's ledger so far; a fresh one before the site's first release in this run."""
        path = self.ledger_path
        if not path.exists():
            return PrivacyLedger()
        try:
            document = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise self._refuse(path, f"cannot be read ({type(exc).__name__}: {exc})") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise self._refuse(path, f"is not a {FORMAT} file")
        if document.get("run-key") != self.run_key:
            raise self._refuse(path, f"belongs to run {document.get('run-key')!r}, not to this one")
        if document.get("site") != self._site:
            raise self._refuse(path, f"belongs to site {document.get('site')!r}, not to this one")
        try:
            return PrivacyLedger.from_record(document["ledger"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise self._refuse(path, f"holds no valid ledger ({type(exc).__name__}: {exc})") from None

    def save_ledger(self, ledger: PrivacyLedger) -> None:
        """Write the ledger (atomic), before the release it records leaves the site."""
        document = {"format": FORMAT, "run-key": self.run_key, "site": self._site, "ledger": ledger.record()}
        atomic_write(self.ledger_path, json.dumps(document, indent=2, sort_keys=True).encode())

    def load_local(self) -> dict[str, torch.Tensor]:
        """The site's local parameters of this run (empty before its first train round)."""
        path = self.local_path
        if not path.exists():
            return {}
        try:
            return load(path.read_bytes())
        except (OSError, SafetensorError, ValueError) as exc:
            raise self._refuse(path, f"cannot be read ({type(exc).__name__}: {exc})") from None

    def save_local(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write the local parameters (atomic)."""
        plain = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
        atomic_write(self.local_path, save(plain, metadata={"run-key": self.run_key, "format": FORMAT}))
