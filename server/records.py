"""A run's directory: resolved config, per-round metrics, checkpoints, summary, table and plot.

Layout of ``RunDirectory(path)``::

    config.json                        the resolved run config
    metrics.jsonl                      one line per (round, phase, site): {"round", "phase", "site", ...metrics},
                                       a line holding a "confusion" matrix also its "collapsed" flag (collapsed),
                                       and per round {"round", "phase": "round", "seconds"}: its server-side wall time
    checkpoints/round-0003.safetensors global arrays after round 3 (metadata: {"round": "3"})
    summary.json                       {"rounds", "sites": {site: {uf1, uar, accuracy, epe, nme[, collapsed]}},
                                       "pooled": {uf1, uar[, collapsed]}} (+ "protocol", "folds" for a LOSO baseline)
    rounds.png                         per-site UF1 and loss per round (plot_rounds)
    logs/                              Flower's and Ray's logs (server.run_logs), written by fedmer simulate

Whole files are written atomically (temp file in the same folder + ``os.replace``), so a reader or a crash
never sees half a JSON document; ``metrics.jsonl`` is appended one flushed line at a time, and
:func:`load_metrics` ignores a torn last line. Non-finite floats are written as ``null`` (strict JSON).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from rich.table import Table
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import Tensor

from partitions.cache import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS = "checkpoints"
PLOT_FILE = "rounds.png"

SITE_KEYS = ("uf1", "uar", "accuracy", "epe", "nme")
SITE_DP_KEYS = ("noise_multiplier", "sample_rate", "steps", "delta", "epsilon")
"""A site's sample-level DP spending in ``summary.json`` (``sites[site]["dp"]``, present when the run used DP)."""
POOLED_KEYS = ("uf1", "uar")
COLLAPSED = "collapsed"
"""A site's (and the pooled) flag: its predictions collapsed onto one class (:func:`collapsed`); in evaluate lines
with a confusion matrix, and optional in ``summary.json``'s site and pooled entries."""
LOGS = "logs"  # a run's log folder (server.run_logs): made before the records, so it does not count as a record
RESERVED_KEYS = ("round", "phase", "site")
ROUND_PHASE = "round"  # the phase of a round's own line (no site): its wall time, for the federation's overhead
DECIMALS = 4


def _plain(value: Any) -> Any:
    """JSON-ready copy: numpy / torch scalars and arrays to Python, non-finite floats to None, Paths to str."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, Tensor | np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as JSON")


def _json_bytes(document: Any) -> bytes:
    return (json.dumps(_plain(document), indent=2, allow_nan=False) + "\n").encode("utf-8")


def summed_confusion(confusions: Iterable[Sequence[int | float]]) -> np.ndarray | None:
    """The sum of flattened CxC confusion matrices (rows = true class, row-major) as a CxC array; None without a
    matrix or without a single clip in them. ValueError for matrices that are not square or not of one size."""
    matrices = [np.asarray(matrix, dtype=np.float64).ravel() for matrix in confusions]
    if not matrices:
        return None
    sizes = sorted({matrix.size for matrix in matrices})
    classes = math.isqrt(sizes[0])
    if len(sizes) != 1 or classes == 0 or classes * classes != sizes[0]:
        raise ValueError(f"confusion matrices must be CxC and of one size, got lengths {sizes}")
    total = np.sum(matrices, axis=0).reshape(classes, classes)
    return total if total.sum() > 0 else None


def collapsed_class(confusions: Iterable[Sequence[int | float]]) -> int | None:
    """The one class every prediction falls in, when the clips (of these confusion matrices, summed) come from at
    least two classes: the network answers with a constant whatever it is shown. None when the predictions
    spread over two or more classes, when every clip is of one class (predicting that class is no sign of
    collapse) and when there is no clip."""
    total = summed_confusion(confusions)
    if total is None:
        return None
    predicted = np.flatnonzero(total.sum(axis=0))
    true_classes = np.count_nonzero(total.sum(axis=1))
    return int(predicted[0]) if predicted.size == 1 and true_classes >= 2 else None


def collapsed(confusions: Iterable[Sequence[int | float]]) -> bool | None:
    """:data:`COLLAPSED`'s value: whether :func:`collapsed_class` names a class; None without a clip to judge."""
    confusions = list(confusions)
    if summed_confusion(confusions) is None:
        return None
    return collapsed_class(confusions) is not None


def _line_flag(confusion: Any) -> bool | None:
    """A metrics line's :data:`COLLAPSED`: None for a matrix that cannot be judged (not CxC numbers), so a
    malformed reply is recorded as it came instead of stopping the run."""
    try:
        return collapsed([confusion])
    except (TypeError, ValueError):
        return None


def checkpoint_name(server_round: int) -> str:
    return f"round-{server_round:04d}.safetensors"


class RunDirectory:
    """The folder of one run; refuses a non-empty folder unless ``overwrite=True``.

    A folder that holds only ``logs/`` counts as empty: the run's logs are opened before its records. With
    ``overwrite=True`` the files this class writes (config, metrics, summary, plot, checkpoints) are removed
    first, so no record of an earlier run mixes into the new one; anything else is left alone.
    """

    def __init__(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"run directory {self.path} exists and is not a folder")
        if self.path.is_dir() and any(entry.name != LOGS for entry in self.path.iterdir()):
            if not overwrite:
                raise FileExistsError(
                    f"run directory {self.path} already holds files; choose a new folder or pass overwrite=True"
                )
            for name in (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, PLOT_FILE):
                (self.path / name).unlink(missing_ok=True)
            for checkpoint in (self.path / CHECKPOINTS).glob("round-*.safetensors"):
                checkpoint.unlink()
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def plot_path(self) -> Path:
        return self.path / PLOT_FILE

    def checkpoint_path(self, server_round: int) -> Path:
        return self.path / CHECKPOINTS / checkpoint_name(server_round)

    def write_config(self, config: Mapping[str, Any]) -> Path:
        """``config.json``: the resolved run config (atomic)."""
        atomic_write(self.config_path, _json_bytes(dict(config)))
        return self.config_path

    def append_metrics(self, server_round: int, phase: str, site: str, metrics: Mapping[str, Any]) -> None:
        """One line ``{"round", "phase", "site", ...metrics}`` appended to ``metrics.jsonl`` and flushed; metrics
        holding a ``confusion`` matrix also get its :data:`COLLAPSED` flag, so every writer flags alike."""
        clash = [key for key in (*RESERVED_KEYS, COLLAPSED) if key in metrics]
        if clash:
            raise ValueError(f"metrics may not use the reserved keys {clash}")
        if not phase or not site:
            raise ValueError(f"phase and site must be non-empty, got phase={phase!r}, site={site!r}")
        flag = {COLLAPSED: _line_flag(metrics["confusion"])} if "confusion" in metrics else {}
        self._append_line({"round": int(server_round), "phase": phase, "site": site, **metrics, **flag})

    def append_round(self, server_round: int, seconds: float, extra: Mapping[str, Any] | None = None) -> None:
        """One line ``{"round", "phase": "round", "seconds", **extra}``: the round's wall time as the server saw it
        (train and evaluate of every site, aggregation, records), so the federation's overhead can be measured,
        and what else belongs to the round as a whole (user-level DP's cumulative epsilon)."""
        clash = [key for key in (*RESERVED_KEYS, "seconds") if key in (extra or {})]
        if clash:
            raise ValueError(f"round extras may not use the reserved keys {clash}")
        line = {"round": int(server_round), "phase": ROUND_PHASE, "seconds": float(seconds), **(extra or {})}
        self._append_line(line)

    def _append_line(self, document: Mapping[str, Any]) -> None:
        line = json.dumps(_plain(document), allow_nan=False)
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def save_checkpoint(self, server_round: int, state: Mapping[str, Tensor] | ArrayRecord) -> Path:
        """``checkpoints/round-NNNN.safetensors`` with ``{"round": "N"}`` metadata (atomic)."""
        if isinstance(state, ArrayRecord):
            state = state.to_torch_state_dict()
        tensors = {
            name: torch.as_tensor(tensor).detach().to("cpu").clone(memory_format=torch.contiguous_format)
            for name, tensor in state.items()
        }  # clone: safetensors refuses views and tensors sharing storage
        path = self.checkpoint_path(server_round)
        atomic_write(path, save_safetensors(tensors, metadata={"round": str(int(server_round))}))
        return path

    def write_summary(
        self,
        rounds: int,
        sites: Mapping[str, Mapping[str, Any]],
        pooled: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """``summary.json``: exactly the documented keys, floats rounded to 4 decimals (None: not measured), plus
        ``extra`` keys that describe how the scores were obtained (a LOSO baseline's ``protocol`` and ``folds``)."""
        document = summary_document(rounds, sites, pooled)
        clash = sorted(set(document) & set(extra or {}))
        if clash:
            raise ValueError(f"summary extra keys may not replace the documented keys {clash}")
        atomic_write(self.summary_path, _json_bytes({**document, **(extra or {})}))
        return self.summary_path


def _score(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ValueError(f"{where} must be a number or None, got {value!r}")
    value = float(value)
    return round(value, DECIMALS) if math.isfinite(value) else None


def _pick(values: Mapping[str, Any], keys: tuple[str, ...], where: str, *, exact: bool = False) -> dict[str, Any]:
    """Exactly ``keys`` of ``values``: scores rounded (:func:`_score`), or with ``exact`` as written (a delta of
    1e-5 or an epsilon must survive unrounded)."""
    missing = [key for key in keys if key not in values]
    if missing:
        raise ValueError(f"{where} lacks {missing}; it needs {list(keys)}")
    return {key: _plain(values[key]) if exact else _score(values[key], f"{where} {key}") for key in keys}


def _flag(values: Mapping[str, Any], where: str) -> dict[str, bool | None]:
    """``{COLLAPSED: value}`` when ``values`` holds the flag (a bool, or None: not judged), else nothing."""
    if COLLAPSED not in values:
        return {}
    value = values[COLLAPSED]
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{where} {COLLAPSED} must be true, false or None, got {value!r}")
    return {COLLAPSED: value}


def _site_entry(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A site's scores, its collapse flag when given, and its ``dp`` spending when given (None: the site trained
    without DP)."""
    entry: dict[str, Any] = {**_pick(values, SITE_KEYS, where), **_flag(values, where)}
    if "dp" in values:
        dp = values["dp"]
        entry["dp"] = None if dp is None else _pick(dp, SITE_DP_KEYS, f"{where} dp", exact=True)
    return entry


def summary_document(rounds: int, sites: Mapping[str, Mapping[str, Any]], pooled: Mapping[str, Any]) -> dict[str, Any]:
    """Validated summary: ``{"rounds": R, "sites": {site: {SITE_KEYS[, COLLAPSED][, "dp": {SITE_DP_KEYS}]}},
    "pooled": {POOLED_KEYS[, COLLAPSED]}}``."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative int, got {rounds!r}")
    if not sites:
        raise ValueError("summary needs at least one site")
    return {
        "rounds": rounds,
        "sites": {str(site): _site_entry(values, f"site {site!r}") for site, values in sites.items()},
        "pooled": {**_pick(pooled, POOLED_KEYS, "pooled"), **_flag(pooled, "pooled")},
    }


def load_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    return summary_document(document["rounds"], document["sites"], document["pooled"])


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[int, dict[str, Tensor]]:
    """(round, state dict) of a checkpoint written by :meth:`RunDirectory.save_checkpoint`."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return int(metadata["round"]), load_file(str(path))


def load_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The lines of a ``metrics.jsonl``; a torn last line (no newline, cut by a crash) is ignored."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends with a newline
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from exc
    if torn.strip():
        with contextlib.suppress(json.JSONDecodeError):  # a write cut short: everything before it is intact
            records.append(json.loads(torn))
    return records


def _cell(value: Any) -> str:
    return "—" if value is None else f"{value:.4f}"


def site_table(summary: Mapping[str, Any]) -> Table:
    """Rich table of a summary: one row per site (UF1, UAR, accuracy, EPE, NME, and the site's epsilon when the
    run used sample-level DP) and a pooled row."""
    table = Table(title=f"fedmer after {summary['rounds']} rounds")
    table.add_column("Site")
    private = any("dp" in values for values in summary["sites"].values())
    for header in ("UF1", "UAR", "Accuracy", "EPE", "NME", *(("ε (δ)",) if private else ())):
        table.add_column(header, justify="right")
    for site, values in summary["sites"].items():
        cells = [_cell(values.get(key)) for key in SITE_KEYS]
        if private:
            dp = values.get("dp")
            cells.append("no DP" if not dp or dp["epsilon"] is None else f"{dp['epsilon']:.2f} ({dp['delta']:.0e})")
        table.add_row(site, *cells)
    pooled = summary["pooled"]
    pooled_cells = [_cell(pooled.get("uf1")), _cell(pooled.get("uar")), "—", "—", "—", *(("—",) if private else ())]
    table.add_row("pooled", *pooled_cells, style="bold")
    return table


def chance_level(records: Iterable[Mapping[str, Any]]) -> float | None:
    """1 / classes, the UF1 and UAR of guessing uniformly on balanced classes; the class count is read off the
    evaluate lines' confusion matrices. None without one."""
    for record in records:
        confusion = record.get("confusion")
        if isinstance(confusion, list) and confusion:
            classes = math.isqrt(len(confusion))
            if classes * classes == len(confusion) and classes > 1:
                return 1.0 / classes
    return None


def rounds_figure(records: Sequence[Mapping[str, Any]]) -> Figure:
    """Per-site UF1 (evaluate phase) and loss (train phase) against the round: whole rounds on the x axis, the
    UF1 axis fixed to [0, 1] (runs compare at a glance; a zoomed axis made noise look like learning) with the
    chance level (:func:`chance_level`) drawn across it."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 4), layout="constrained")
    panels = (
        (figure.add_subplot(1, 2, 1), "evaluate", "uf1", "UF1"),
        (figure.add_subplot(1, 2, 2), "train", "loss", "loss"),
    )
    for axes, phase, key, label in panels:
        series: dict[str, list[tuple[int, float]]] = {}
        for record in records:
            if record.get("phase") == phase and isinstance(record.get(key), int | float):
                series.setdefault(str(record["site"]), []).append((int(record["round"]), float(record[key])))
        for site, points in series.items():
            points.sort()
            axes.plot([r for r, _ in points], [v for _, v in points], marker="o", label=site, clip_on=False)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("round")
        axes.set_ylabel(label)
        axes.set_title(f"{label} per round ({phase})")
        axes.grid(alpha=0.3)
    scores = panels[0][0]
    scores.set_ylim(0.0, 1.0)
    chance = chance_level(records)
    if chance is not None:
        scores.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance (1/{round(1 / chance)})")
    for axes, *_ in panels:
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small")
    return figure


def plot_rounds(metrics_jsonl_path: str | os.PathLike[str], out_png: str | os.PathLike[str], *, dpi: int = 100) -> Path:
    """``rounds.png`` (:func:`rounds_figure`) of a ``metrics.jsonl`` (atomic write)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg only: never touches pyplot's backend

    figure = rounds_figure(load_metrics(metrics_jsonl_path))
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    out = Path(out_png)
    atomic_write(out, buffer.getvalue())
    return out
