"""The federation's Flower ServerApp: query the sites, run the strategy, keep the records.

``app = make_server_app()`` is what ``flwr run`` loads (``[tool.flwr.app.components]``); ``fedmer simulate``
builds its own with the resolved config as ``overrides``, because ``flwr.simulation.run_simulation`` passes an
EMPTY ``context.run_config``. Settings are ``{**DEFAULTS, **context.run_config, **overrides}``.

One run, in order:

1. resolve and check every setting (:func:`resolve_settings`): an unknown strategy, database or label space,
   or a bad number stops here with one :class:`DataError`, before any node is contacted;
2. create the run directory (``out``, default ``runs/<UTC timestamp>``) and write ``config.json``;
3. build the initial network (seeded by ``seed``) and keep its shared part (``local-params`` stay on the sites);
4. wait until one node per site is connected (at most ``round-timeout`` seconds);
5. query round: every node answers with its site index and its AU co-occurrence counts; the sum becomes the
   federation's AU prior (:func:`server.strategies.cooccurrence_prior`), sent in every train round with
   FED-PsyAU's decaying prior weight;
6. ``strategy.start``: per round and site one train and one evaluate line in ``metrics.jsonl``, one progress
   line on the console, and the global arrays in ``checkpoints/round-NNNN.safetensors``; per round one
   ``{"round", "phase": "round", "seconds"}`` line with its wall time (checkpoint included);
7. ``summary.json`` from the last round's evaluation (per site, and pooled UF1 / UAR from the sum of the sites'
   confusion matrices, as in MEGC2019's composite evaluation), the table on the console, a warning per site
   whose predictions collapsed onto one class (and for the pooled predictions when every site's did, onto the
   same class; :func:`server.records.collapsed_class`) and ``rounds.png``.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Strategy
from rich.console import Console

from client.protocol import (
    AU_COUNTS,
    CONFIG,
    COOCCURRENCE,
    DP_DELTA,
    DP_EPSILON,
    DP_NOISE_MULTIPLIER,
    DP_SAMPLE_RATE,
    DP_STEPS,
    LOCAL_EPOCHS,
    LR,
    PRIOR_WEIGHT,
    PROXIMAL_MU,
    RUN_KEY,
    SERVER_ROUND,
    SITE_INDEX,
)
from client.site import DEFAULT_LABELS, PRIVACY_KEYS, RunSettings, num_classes, privacy_settings
from client.task import check_prefixes, split_state
from client.training import Predictions, scores
from models import build_model
from partitions.adapters import ADAPTERS, canonical_database
from partitions.errors import DataError
from partitions.labels import label_space
from server.central_dp import CENTRAL_DP_KEYS, central_privacy
from server.records import (
    COLLAPSED,
    SITE_KEYS,
    RunDirectory,
    collapsed,
    collapsed_class,
    plot_rounds,
    site_table,
    summary_document,
)
from server.strategies import (
    DEFAULT_STRATEGY,
    EVALUATE,
    TRAIN,
    build_strategy,
    cooccurrence_prior,
    decay_prior_weight,
)

_RUN = RunSettings()

DEFAULTS: dict[str, bool | int | float | str] = {
    "num-server-rounds": 3,
    "strategy": DEFAULT_STRATEGY,
    "sites": "casme2,samm,smic",
    "data-root": "data/synthetic",
    "cache-root": "data/cache",
    "labels": DEFAULT_LABELS,
    "local-epochs": _RUN.local_epochs,
    "lr": _RUN.lr,
    "lr-schedule": _RUN.lr_schedule,
    "warmup-epochs": _RUN.warmup_epochs,
    "weight-decay": _RUN.weight_decay,
    "class-balance": _RUN.class_balance,
    "label-smoothing": _RUN.label_smoothing,
    "batch-size": _RUN.batch_size,
    "seed": _RUN.seed,
    "preset": _RUN.preset,
    "ccc-graph": _RUN.ccc_graph,
    "precision": _RUN.precision,
    "test-fraction": _RUN.test_fraction,
    "local-params": "",
    "min-sites": 1,
    "mixing-alpha": 0.1,
    "proximal-mu": 0.01,
    "round-timeout": 3600,
    "out": "",
    "run-key": "",
}
"""The run config's defaults; ``[tool.flwr.app.config]`` in pyproject.toml holds the same (a test checks)."""

OPTIONAL_KEYS = (
    "val-fraction",
    "weight-mer",
    "weight-flow",
    "weight-landmarks",
    "weight-au",
    "subset",
    "device",
    "server-lr",
    "server-momentum",
    "num-malicious-nodes",
    "num-nodes-to-select",
    *PRIVACY_KEYS,
    *CENTRAL_DP_KEYS,
)
"""Further keys the sites (:class:`client.site.RunSettings`, :class:`client.site.SiteSpec`) and
:func:`server.strategies.build_strategy` read, with their own defaults."""

KNOWN_KEYS = (*DEFAULTS, *OPTIONAL_KEYS)

QUERY_ROUND = 0  # the round number failures of the query round are recorded under


# ----------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ServerSettings:
    """Every setting of one run, resolved and checked; ``config`` is what ``config.json`` records."""

    rounds: int
    strategy: str
    sites: tuple[str, ...]
    out: Path
    round_timeout: float
    run: RunSettings
    classes: int
    config: dict[str, Any]

    @property
    def site_names(self) -> tuple[str, ...]:
        """How records name each site: its database, with its index when a database serves several sites."""
        if len(set(self.sites)) == len(self.sites):
            return self.sites
        return tuple(f"{index}-{name}" for index, name in enumerate(self.sites))

    @property
    def run_key(self) -> str:
        """What the sites' state files (privacy ledger, local parameters) of this run are named by."""
        return str(self.config["run-key"])

    def site_name(self, index: int) -> str:
        return self.site_names[index] if 0 <= index < len(self.sites) else f"site-{index}"

    def class_name(self, class_index: int, site_index: int | None = None) -> str:
        """A class by its name in the run's label space (a site's own names under ``native`` labels; with no
        site, the name every site shares, else ``class N``)."""
        indices = range(len(self.sites)) if site_index is None else [site_index]
        names = {label_space(str(self.config["labels"]), self.sites[i]).classes[class_index] for i in indices}
        return names.pop() if len(names) == 1 else f"class {class_index}"


def _number(config: Mapping[str, Any], key: str, kind: type) -> Any:
    value = config[key]
    try:
        number = None if isinstance(value, bool) else kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or (kind is float and not math.isfinite(number)):
        raise DataError(f"run config {key}={value!r} is not a valid {kind.__name__}; e.g. {key}={DEFAULTS[key]}")
    return number


def _check_sites(sites: tuple[str, ...], labels: str) -> int:
    """Every site's database is known and the label space applies to it with one common class count."""
    if not sites:
        raise DataError("run config sites is empty; list one database per site, e.g. sites='casme2,samm,smic'")
    unknown = [name for name in sites if canonical_database(name) is None]
    if unknown:
        raise DataError(
            f"run config sites: unknown dataset {', '.join(repr(n) for n in unknown)}; use one of {', '.join(ADAPTERS)}"
        )
    classes = {name: num_classes(name, labels) for name in sites}  # DataError when labels does not apply
    if len(set(classes.values())) > 1:
        listed = ", ".join(f"{name} {count}" for name, count in classes.items())
        raise DataError(
            f"run config labels={labels!r} gives the sites different class counts ({listed}); the sites train one "
            "network, so use a shared label space such as labels='composite3'"
        )
    return next(iter(classes.values()))


def default_out() -> Path:
    """``runs/<UTC timestamp>``."""
    return Path("runs") / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def run_key(config: Mapping[str, Any]) -> str:
    """The run config's ``run-key``, or a new random one: it names the sites' state files of this run (their
    privacy ledgers, ``client.state``), so a resumed run passes the one its ``config.json`` recorded."""
    return str(config.get("run-key", "")).strip() or uuid.uuid4().hex


def resolve_settings(config: Mapping[str, Any]) -> ServerSettings:
    """``{**DEFAULTS, **config}`` checked: one DataError naming the key and the fix for anything wrong.

    Builds the strategy once (an unknown name or a bad ``min-sites`` fails here) and the model once (a
    ``local-params`` prefix matching nothing fails here), so a bad setting stops before any node is contacted.
    """
    resolved: dict[str, Any] = {**DEFAULTS, **config}
    rounds = _number(resolved, "num-server-rounds", int)
    if rounds < 1:
        raise DataError(f"run config num-server-rounds={rounds} must be at least 1")
    timeout = _number(resolved, "round-timeout", float)
    if timeout <= 0:
        raise DataError(f"run config round-timeout={timeout} must be a positive number of seconds")
    run = RunSettings.from_config(resolved)
    privacy_settings({}, resolved)  # a bad dp-* value stops here, not at every site in round 1
    labels = str(resolved["labels"]).strip() or DEFAULT_LABELS
    sites = tuple(name.strip() for name in str(resolved["sites"]).split(",") if name.strip())
    classes = _check_sites(sites, labels)
    strategy = str(resolved["strategy"]).strip().lower()
    try:
        build_strategy(strategy, len(sites), resolved)
        check_prefixes(build_model(run.model_config(classes)), run.local_params)
    except DataError:
        raise
    except ValueError as error:
        raise DataError(f"run config: {error}") from None
    out = Path(str(resolved["out"]).strip() or default_out())
    resolved.update({"strategy": strategy, "labels": labels, "sites": ",".join(sites), "out": str(out)})
    resolved["run-key"] = run_key(resolved)
    return ServerSettings(rounds, strategy, sites, out, timeout, run, classes, resolved)


# ----------------------------------------------------------------------------------------------- steps


def initial_arrays(settings: ServerSettings) -> ArrayRecord:
    """The seeded initial network's shared part (what every site receives in round 1)."""
    torch.manual_seed(settings.run.seed)
    model = build_model(settings.run.model_config(settings.classes))
    shared, _local = split_state(model.state_dict(), settings.run.local_params)
    return ArrayRecord(torch_state_dict=shared)


def wait_for_nodes(grid: Grid, count: int, timeout: float, console: Console) -> list[int]:
    """The connected node ids once at least ``count`` are connected; RuntimeError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    announced = False
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} of {count} sites connected within round-timeout={timeout:g}s; start one "
                "SuperNode per site of the run config's sites list (or raise round-timeout)"
            )
        if not announced:
            console.print(
                f"waiting for {count} sites to connect ({len(nodes)} so far)", highlight=False, soft_wrap=True
            )
            announced = True
        time.sleep(1.0)
    return nodes


def brief(reason: str, limit: int = 500) -> str:
    """A failed reply's reason without the Ray traceback around it: the site's own message where there is one."""
    marker = "occurred. Message: "
    if marker in reason:
        reason = reason[reason.rindex(marker) + len(marker) :].rstrip().removesuffix("'>")
    reason = " ".join(reason.split())
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def query_sites(
    grid: Grid, nodes: Sequence[int], settings: ServerSettings, strategy: Strategy
) -> tuple[list[float], dict[int, int]]:
    """Query round: (the federation's AU prior, node id -> site index).

    Error replies, replies without a valid site index and nodes that never answer are appended to
    ``strategy.failures`` (phase ``"query"``); RuntimeError, naming them, when fewer than ``min-sites`` answer.
    """
    messages = [
        Message(
            RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: QUERY_ROUND, RUN_KEY: settings.run_key})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=settings.round_timeout))
    node_sites: dict[int, int] = {}
    good: list[tuple[int, Message]] = []
    failures: list[dict[str, Any]] = []

    def fail(node: int, reason: str) -> None:
        failures.append({"round": QUERY_ROUND, "phase": "query", "node_id": node, "site_index": None, "reason": reason})

    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            fail(node, f"error reply (code {reply.error.code}): {brief(reply.error.reason)}")
            continue
        try:
            site = reply.content[AU_COUNTS][SITE_INDEX]
        except KeyError:
            fail(node, f"malformed reply without {AU_COUNTS}[{SITE_INDEX}]")
            continue
        if isinstance(site, bool) or not isinstance(site, int) or not 0 <= site < len(settings.sites):
            fail(node, f"site index {site!r} outside [0, {len(settings.sites) - 1}]")
            continue
        if site in node_sites.values():
            fail(node, f"site index {site} claimed by two nodes: check the partition -> site mapping")
            continue
        node_sites[node] = site
        good.append((site, reply))
    answered = {reply.metadata.src_node_id for reply in replies}
    for node in nodes:
        if node not in answered:
            fail(node, "no reply (timed out or lost)")
    strategy.failures.extend(failures)
    if len(good) < int(settings.config["min-sites"]):
        named = "; ".join(f"node {f['node_id']}: {f['reason']}" for f in failures) or "none recorded"
        raise RuntimeError(
            f"query round: only {len(good)} of {len(nodes)} nodes answered, fewer than "
            f"min-sites={settings.config['min-sites']}; failed: {named}"
        )
    good.sort(key=lambda item: item[0])
    return cooccurrence_prior(reply for _, reply in good), node_sites


class Progress:
    """``strategy.on_site_metrics``: each site's metrics to ``metrics.jsonl``, one console line per round and site.

    The console line is printed when the site's evaluation arrives: round, site, that round's training loss,
    test UF1 and local training seconds, and the class it predicts when its predictions collapsed onto one.
    """

    def __init__(self, run: RunDirectory, settings: ServerSettings, console: Console) -> None:
        self.run = run
        self.settings = settings
        self.console = console
        self.trained: dict[tuple[int, int], Mapping[str, Any]] = {}

    def __call__(self, server_round: int, phase: str, site_index: int, metrics: dict[str, Any]) -> None:
        site = self.settings.site_name(site_index)
        self.run.append_metrics(server_round, phase, site, metrics)
        if phase == TRAIN:
            self.trained[(server_round, site_index)] = metrics
            return
        train = self.trained.get((server_round, site_index), {})
        loss, seconds = train.get("loss", float("nan")), train.get("train-seconds", float("nan"))
        epsilon = train.get(DP_EPSILON, math.inf)
        spent = f"  ε {epsilon:.2f}" if math.isfinite(epsilon) else ""
        only = collapsed_class([metrics["confusion"]]) if "confusion" in metrics else None
        flag = (
            f"  [yellow]collapsed: predicts {self.settings.class_name(only, site_index)} only[/]"
            if only is not None
            else ""
        )
        self.console.print(
            f"round {server_round}/{self.settings.rounds}  {site:<10} loss {loss:.4f}  "
            f"UF1 {metrics.get('uf1', float('nan')):.4f}  {seconds:.1f}s{spent}{flag}",
            highlight=False,
            soft_wrap=True,
        )


def train_config(settings: ServerSettings) -> ConfigRecord:
    """The fixed part of every train round's config (``strategy.round_config`` adds the per-round part)."""
    config: dict[str, Any] = {LOCAL_EPOCHS: settings.run.local_epochs, LR: settings.run.lr, RUN_KEY: settings.run_key}
    if settings.strategy == "fedprox":
        config[PROXIMAL_MU] = float(settings.config["proximal-mu"])
    return ConfigRecord(config)


def pooled_scores(confusions: Sequence[Sequence[int | float]]) -> dict[str, float | None]:
    """UF1 and UAR of the summed confusion matrices (rows = true class; each flattened row-major), scored by
    :func:`client.training.scores` on the clips the summed matrix stands for: all sites' clips at once, as in
    MEGC2019. None for both without any matrix or sample.
    """
    if not confusions:
        return {"uf1": None, "uar": None}
    sizes = {len(matrix) for matrix in confusions}
    classes = math.isqrt(next(iter(sizes)))
    if len(sizes) != 1 or classes * classes != next(iter(sizes)) or classes == 0:
        raise ValueError(f"confusion matrices must be CxC and of one size, got lengths {sorted(sizes)}")
    counts = np.sum([np.asarray(m, dtype=np.int64) for m in confusions], axis=0)
    if counts.sum() == 0:
        return {"uf1": None, "uar": None}
    true, predicted = np.divmod(np.arange(classes * classes), classes)
    clips = Predictions(labels=np.repeat(true, counts).tolist(), predicted=np.repeat(predicted, counts).tolist())
    result = scores(clips, classes)
    return {"uf1": result["uf1"], "uar": result["uar"]}


def last_evaluation(strategy: Strategy, rounds: int) -> dict[int, dict[str, Any]]:
    """Site index -> that site's evaluate metrics of the last round (sites that failed it are absent)."""
    return {
        entry["site_index"]: entry["metrics"]
        for entry in strategy.site_metrics
        if entry["phase"] == EVALUATE and entry["round"] == rounds
    }


def site_privacy(strategy: Strategy, sites: int) -> dict[int, dict[str, Any] | None] | None:
    """Site index -> its sample-level DP spending as of its last train reply (None: no DP at that site); None
    when no site trained under DP."""
    last = {entry["site_index"]: entry["metrics"] for entry in strategy.site_metrics if entry["phase"] == TRAIN}
    private = {index: m for index, m in last.items() if math.isfinite(m.get(DP_EPSILON, math.inf))}
    if not private:
        return None
    return {
        index: {
            "noise_multiplier": private[index][DP_NOISE_MULTIPLIER],
            "sample_rate": private[index][DP_SAMPLE_RATE],
            "steps": int(private[index][DP_STEPS]),
            "delta": private[index][DP_DELTA],
            "epsilon": private[index][DP_EPSILON],
        }
        if index in private
        else None
        for index in range(sites)
    }


def round_privacy(strategy: Strategy) -> dict[str, Any]:
    """What a round's line in ``metrics.jsonl`` says about user-level DP: the cumulative ``central-epsilon`` and its
    ``central-delta`` (nothing when central DP is off)."""
    privacy = central_privacy(strategy)
    if privacy is None:
        return {}
    return {"central-epsilon": privacy["epsilon"], "central-delta": privacy["delta"]}


def collapse_warnings(settings: ServerSettings, confusions: Mapping[int, Sequence[Sequence[int | float]]]) -> list[str]:
    """A console warning for each site whose predictions collapsed onto one class
    (:func:`server.records.collapsed_class`), and one for the pooled predictions when every site's land in the
    same class. ``confusions``: site index -> the site's confusion matrices (its last evaluation, or its folds)."""
    warnings = []
    for index in sorted(confusions):
        only = collapsed_class(confusions[index])
        if only is not None:
            clips = int(sum(sum(matrix) for matrix in confusions[index]))
            warnings.append(
                f"{settings.site_name(index)} collapsed: all {clips} test clips predicted as "
                f"{settings.class_name(only, index)}"
            )
    pooled = collapsed_class([matrix for index in sorted(confusions) for matrix in confusions[index]])
    if pooled is not None:
        warnings.append(f"pooled collapsed: every site predicts {settings.class_name(pooled)} only")
    return warnings


def print_collapse_warnings(
    settings: ServerSettings, confusions: Mapping[int, Sequence[Sequence[int | float]]], console: Console
) -> None:
    for warning in collapse_warnings(settings, confusions):
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)


def write_results(run: RunDirectory, strategy: Strategy, settings: ServerSettings, console: Console) -> None:
    """``summary.json`` (None for a site without a last-round evaluation; each site's ``dp`` when the run used
    sample-level DP; each site's and the pooled :data:`server.records.COLLAPSED` flag), the table, a warning per
    collapsed site, ``rounds.png``."""
    last = last_evaluation(strategy, settings.rounds)
    privacy = site_privacy(strategy, len(settings.sites))
    sites = {
        settings.site_name(index): {
            **{key: last[index].get(key) if index in last else None for key in SITE_KEYS},
            COLLAPSED: collapsed([last[index]["confusion"]]) if index in last else None,
            **({"dp": privacy[index]} if privacy is not None else {}),
        }
        for index in range(len(settings.sites))
    }
    confusions = [last[index]["confusion"] for index in sorted(last)]
    pooled = {**pooled_scores(confusions), COLLAPSED: collapsed(confusions)}
    central = central_privacy(strategy)
    run.write_summary(settings.rounds, sites, pooled, extra={"central_dp": central} if central is not None else None)
    console.print(site_table(summary_document(settings.rounds, sites, pooled)))
    print_collapse_warnings(settings, {index: [last[index]["confusion"]] for index in last}, console)
    if run.metrics_path.exists():
        plot_rounds(run.metrics_path, run.plot_path)
    for failure in strategy.failures:
        console.print(
            f"[yellow]failed:[/] round {failure['round']} {failure['phase']} node {failure['node_id']} "
            f"(site {failure['site_index']}): {brief(str(failure['reason']))}",
            highlight=False,
            soft_wrap=True,
        )
    console.print(f"run directory: {run.path}", highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------- the app


def run_federation(grid: Grid, config: Mapping[str, Any], console: Console) -> None:
    """One whole run (see the module docstring) on ``grid`` with the given run config."""
    settings = resolve_settings(config)
    strategy = build_strategy(settings.strategy, len(settings.sites), settings.config)
    run = RunDirectory(settings.out)
    run.write_config(settings.config)
    console.print(
        f"fedmer: {settings.strategy}, {settings.rounds} rounds, sites {', '.join(settings.site_names)}; "
        f"records in {run.path}",
        highlight=False,
        soft_wrap=True,
    )
    initial = initial_arrays(settings)
    nodes = wait_for_nodes(grid, len(settings.sites), settings.round_timeout, console)
    prior, node_sites = query_sites(grid, nodes, settings, strategy)
    strategy.node_sites.update(node_sites)
    strategy.round_config = lambda r: {PRIOR_WEIGHT: decay_prior_weight(r, settings.rounds), COOCCURRENCE: prior}
    strategy.on_site_metrics = Progress(run, settings, console)

    round_start = time.monotonic()

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        nonlocal round_start  # Strategy.start calls this before round 1 and after every round: the rounds' ends
        if server_round >= 1:  # round 0 is the initial model, rebuilt from the seed at will
            run.save_checkpoint(server_round, arrays)
            run.append_round(server_round, time.monotonic() - round_start, round_privacy(strategy))
        round_start = time.monotonic()
        return None

    try:
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=settings.rounds,
            timeout=settings.round_timeout,
            train_config=train_config(settings),
            evaluate_config=ConfigRecord({RUN_KEY: settings.run_key}),
            evaluate_fn=checkpoint,
        )
    except PrivacyBudgetExhausted as exhausted:  # central-dp-max-epsilon: the records up to here still count
        console.print(f"[yellow]stopped:[/] {exhausted}", highlight=False, soft_wrap=True)
    write_results(run, strategy, settings, console)


def make_server_app(overrides: Mapping[str, Any] | None = None, console: Console | None = None) -> ServerApp:
    """A ServerApp running :func:`run_federation` with ``{**DEFAULTS, **context.run_config, **overrides}``."""
    fixed = dict(overrides or {})
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, {**context.run_config, **fixed}, console or Console())

    return server_app


app = make_server_app()
