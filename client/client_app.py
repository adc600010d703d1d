"""The site's Flower ClientApp: translate messages (see :mod:`client.protocol`) to :mod:`client.task` calls.

Which site a node is comes from its node config (deployment) or its partition id and the run config
(simulation), see :mod:`client.site`. Parameters named by the run config's ``local-params`` never leave the
site: they live in the site's state files between rounds (:mod:`client.state`, with its privacy ledger, so a
restarted SuperNode forgets neither), and replies carry only the shared ones.

:func:`make_client_app` builds the app; ``app = make_client_app()`` is what ``flwr run`` loads
(``[tool.flwr.app.components]``). Its handlers read ``{**context.run_config, **overrides}``: ``flwr run`` fills
``context.run_config`` with the pyproject defaults plus ``--run-config`` overrides (and ``app`` has no
overrides), while ``flwr.simulation.run_simulation`` passes an EMPTY run config, so ``fedmer simulate`` hands
its whole resolved config in as ``overrides``. Overrides win over the run config. The plain functions
:func:`train`, :func:`evaluate` and :func:`query` read ``context.run_config`` as given.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import protocol as p
from client.privacy import (
    BudgetExhausted,
    PrivacyLedger,
    PrivacySettings,
    RunLength,
    default_delta,
    history_entries,
    plan_round,
)
from client.privacy.central import central_clipping_mod
from client.site import RunSettings, SiteData, SiteSpec, SplitSettings, load_data, privacy_settings
from client.state import SiteState
from client.task import (
    EpochCallback,
    LocalTraining,
    PrivateRound,
    au_cooccurrence,
    check_prefixes,
    evaluate_local,
    evaluate_metrics,
    load_arrays,
    privacy_metrics,
    seeded_loader,
    set_au_prior,
    split_state,
    train_local,
    train_metrics,
)
from models import F5CNet, ModelConfig, build_model

log = logging.getLogger("fedmer.client")

_MODELS: dict[tuple[ModelConfig, int, str], tuple[F5CNet, dict[str, torch.Tensor]]] = {}
"""Built networks and their initial weights, by (config, seed, device): building costs more than a reset."""


# ----------------------------------------------------------------------------------------------- helpers


def _site(context: Context) -> tuple[SiteSpec, RunSettings, SiteData]:
    """The node's site, the run's settings and the site's split data (cached per site in-process)."""
    settings = RunSettings.from_config(context.run_config)
    spec = SiteSpec.from_config(context.node_config, context.run_config)
    return spec, settings, load_data(spec, SplitSettings.of(settings))


def _config(msg: Message) -> ConfigRecord:
    """The message's config record (an empty one when the server sent none)."""
    return msg.content.config_records.get(p.CONFIG, ConfigRecord())


def _fresh_model(config: ModelConfig, seed: int, device: str) -> F5CNet:
    """The network at its seeded initial weights, so nothing carries over between sites or calls."""
    key = (config, seed, device)
    if key not in _MODELS:
        torch.manual_seed(seed)
        model = build_model(config).to(device)
        _MODELS[key] = (model, copy.deepcopy(model.state_dict()))
    model, initial = _MODELS[key]
    model.load_state_dict(initial)
    return model


def site_state(msg: Message, context: Context, spec: SiteSpec) -> SiteState:
    """The site's state files of the message's run: the server's ``run-key``, else Flower's run id."""
    run_key = str(_config(msg).get(p.RUN_KEY, "") or f"flower-run-{context.run_id}")
    return SiteState(spec.state_folder, run_key, spec.index, spec.dataset)


def _received_model(msg: Message, state: SiteState, settings: RunSettings, data: SiteData) -> F5CNet:
    """Fresh model <- the server's arrays <- this site's local arrays, with the server's AU prior if it sent one."""
    model = _fresh_model(settings.model_config(data.num_classes), settings.seed, data.spec.device)
    check_prefixes(model, settings.local_params)
    shared = msg.content.array_records[p.ARRAYS].to_torch_state_dict() if p.ARRAYS in msg.content else {}
    local = state.load_local() if settings.local_params else {}
    load_arrays(model, shared, local)
    prior = _config(msg).get(p.COOCCURRENCE, [])
    if isinstance(prior, list) and prior:
        set_au_prior(model, [float(v) for v in prior])
    return model


def _training_options(config: ConfigRecord, settings: RunSettings, spec: SiteSpec) -> LocalTraining:
    """The round's training: the server's config where it says so, else the run config's defaults."""
    server_round = int(config.get(p.SERVER_ROUND, 1))
    return settings.local_training(
        server_round,
        seed=settings.round_seed(spec.index, server_round),
        device=spec.device,
        epochs=int(config.get(p.LOCAL_EPOCHS, settings.local_epochs)),
        lr=float(config.get(p.LR, settings.lr)),
        mu=float(config.get(p.PROXIMAL_MU, 0.0)),
        prior_weight=float(config.get(p.PRIOR_WEIGHT, 0.0)),
    )


def _epoch_logger(spec: SiteSpec, options: LocalTraining) -> EpochCallback:
    """One progress line per local epoch (logger ``fedmer.client``)."""

    def log_epoch(epoch: int, terms: dict[str, float]) -> None:
        log.info(
            "%s round %d epoch %d/%d: loss %.4f (mer %.4f) train-uf1 %.3f",
            spec.label,
            options.server_round,
            epoch + 1,
            options.epochs,
            terms["loss"],
            terms["mer"],
            terms["train_uf1"],
        )

    return log_epoch


def _private_round(
    privacy: PrivacySettings, ledger: PrivacyLedger, settings: RunSettings, options: LocalTraining, data: SiteData
) -> PrivateRound:
    """This round's DP-SGD (noise fixed over the whole run at the first round); BudgetExhausted when the round
    would overspend the site's ``dp-target-epsilon``."""
    steps_per_epoch = len(seeded_loader(data.train, options.batch_size, shuffle=False, seed=0))
    noise = plan_round(
        ledger,
        RunLength(max(settings.rounds, options.server_round), options.epochs, steps_per_epoch),
        delta=privacy.delta if privacy.delta is not None else default_delta(len(data.train)),
        noise_multiplier=privacy.noise_multiplier,
        target_epsilon=privacy.target_epsilon,
    )
    return PrivateRound(privacy, noise, ledger.training_history())


def _exhausted_reply(msg: Message, spec: SiteSpec, ledger: PrivacyLedger, reason: str) -> Message:
    """The reply of a site that may not train any more: its spending and the reason, no arrays."""
    log.warning("%s: %s; it stops training, the federation goes on without it", spec.label, reason)
    metrics = {p.NUM_EXAMPLES: 0, p.SITE_INDEX: spec.index, **privacy_metrics(ledger, exhausted=True)}
    return Message(RecordDict({p.METRICS: MetricRecord(metrics)}), reply_to=msg)


# ----------------------------------------------------------------------------------------------- handlers


def train(msg: Message, context: Context) -> Message:
    """Local training from the received shared arrays; reply with the shared arrays and the round's metrics.

    Under sample-level DP (``dp``) the site trains by DP-SGD, enters the round in its ledger on disk before the
    reply leaves (:mod:`client.state`) and reports its cumulative epsilon; once its ``dp-target-epsilon`` is spent
    it replies without arrays (see protocol), after a restart too."""
    spec, settings, data = _site(context)
    state = site_state(msg, context, spec)
    options = _training_options(_config(msg), settings, spec)
    privacy = privacy_settings(context.node_config, context.run_config)
    ledger, private = None, None
    if privacy.enabled:
        if options.balance_classes and options.server_round == 1:
            log.warning("%s: class-balance is off under DP (the weights would be a non-private count)", spec.label)
        ledger = state.load_ledger()
        try:
            private = _private_round(privacy, ledger, settings, options, data)
        except BudgetExhausted as exhausted:
            state.save_ledger(ledger)
            return _exhausted_reply(msg, spec, ledger, str(exhausted))
    model = _received_model(msg, state, settings, data)
    on_epoch = _epoch_logger(spec, options)
    outcome = train_local(model, data.train, data.num_classes, options, on_epoch=on_epoch, privacy=private)
    if ledger is not None:
        ledger.training = history_entries(outcome.privacy_history)
        state.save_ledger(ledger)
    shared, local = split_state(model.state_dict(), settings.local_params)
    if local:
        state.save_local(local)
    arrays = ArrayRecord(torch_state_dict=shared)
    metrics = train_metrics(spec.index, outcome, arrays.count_bytes(), privacy_metrics(ledger))
    return Message(RecordDict({p.ARRAYS: arrays, p.METRICS: MetricRecord(metrics)}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Score the received model (with this site's local parameters) on the site's held-out test subjects."""
    spec, settings, data = _site(context)
    server_round = int(_config(msg).get(p.SERVER_ROUND, 0))
    model = _received_model(msg, site_state(msg, context, spec), settings, data)
    result = evaluate_local(
        model,
        data.test,
        data.num_classes,
        settings.batch_size,
        spec.device,
        seed=settings.round_seed(spec.index, server_round),
    )
    log.info(
        "%s round %d evaluate: uf1 %.3f uar %.3f on %d clips",
        spec.label,
        server_round,
        result.uf1,
        result.uar,
        result.examples,
    )
    return Message(RecordDict({p.METRICS: MetricRecord(evaluate_metrics(spec.index, result))}), reply_to=msg)


def query(msg: Message, context: Context) -> Message:
    """The site's index and its AU co-occurrence counts over the training split (the only AU statistics that
    leave the site); under DP noised, and the release entered in the site's ledger."""
    spec, settings, data = _site(context)
    privacy = privacy_settings(context.node_config, context.run_config)
    counts, samples = au_cooccurrence(data.train.samples, privacy, seed=settings.round_seed(spec.index, 0))
    if privacy.enabled:
        state = site_state(msg, context, spec)
        ledger = state.load_ledger()
        ledger.queries.append(privacy.query_noise)
        state.save_ledger(ledger)
    values = {
        p.SITE_INDEX: spec.index,
        p.COUNTS: [int(v) for v in counts.flatten().round().tolist()],
        p.SAMPLES: samples,
    }
    record = MetricRecord({key: values[key] for key in p.QUERY_METRIC_KEYS})
    return Message(RecordDict({p.AU_COUNTS: record}), reply_to=msg)


# ----------------------------------------------------------------------------------------------- the app

Handler = Callable[[Message, Context], Message]


def with_overrides(context: Context, overrides: Mapping[str, Any]) -> Context:
    """The node's context seen with ``{**context.run_config, **overrides}`` as its run config.

    The copy shares ``node_config`` and ``state`` with the original (the handlers keep what must outlive a
    message on disk, :mod:`client.state`).
    """
    if not overrides:
        return context
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=context.node_config,
        state=context.state,
        run_config={**context.run_config, **overrides},
        series_id=context.series_id,
    )


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose train / evaluate / query handlers read ``{**context.run_config, **overrides}``.

    ``overrides`` (flat run-config keys, e.g. ``{"sites": "casme2,samm,smic", "data-root": ...}``) are what
    ``run_simulation`` cannot pass through ``context.run_config`` (it is empty there); under ``flwr run`` leave
    them out and the pyproject defaults plus ``--run-config`` apply. The app and its handlers pickle (Ray ships
    the app to its workers): the overrides are copied into a plain dict.
    """
    fixed = dict(overrides or {})
    client_app = ClientApp()

    def bind(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def handle(msg: Message, context: Context) -> Message:
            return handler(msg, with_overrides(context, fixed))

        return handle

    client_app.train(mods=[central_clipping_mod])(bind(train))  # first: it must see the reply that leaves
    client_app.evaluate()(bind(evaluate))
    client_app.query()(bind(query))
    return client_app


app = make_client_app()
