"""Federation strategies: Flower's built-in ones made deterministic and fault-tolerant, plus FED-PsyAU mixing.

:func:`build_strategy` gives one of :data:`STRATEGIES`. Every class it builds carries :class:`SiteRobust`, which

- sorts the successful replies by ``METRICS[SITE_INDEX]`` before the Flower class aggregates them, so the
  result does not depend on the order replies arrive in (and Krum's ties break the same way every run);
- records every failed reply (an error reply, a reply without a site index, or a node that was sent a message
  but never answered) in ``strategy.failures`` as ``{"round", "phase", "node_id", "site_index", "reason"}``
  (``site_index`` is None until that node has once replied successfully);
- lets the round go on with the others while at least ``min_sites`` (run-config ``min-sites``) succeeded, and
  raises RuntimeError naming the round and the failed sites below that;
- keeps each successful reply's metrics in ``strategy.site_metrics`` (site order) and calls the optional
  ``strategy.on_site_metrics(server_round, phase, site_index, metrics)`` for each, so the ServerApp can write
  per-site records while ``Strategy.start`` runs;
- applies the optional ``strategy.round_config(server_round) -> dict`` to the train config of each round (for
  values that change per round, e.g. ``{PRIOR_WEIGHT: decay_prior_weight(r, rounds)}``).

The aggregated metrics are Flower's weighted means (weights ``NUM_EXAMPLES``) without ``SITE_INDEX``.

With run-config ``central-dp`` set (:mod:`server.central_dp`), fedavg and fedprox come as user-level DP
strategies (:data:`SITE_DP_CLASSES`): SiteRobust around one of Flower's DP wrappers around a plain FedAvg /
FedProx. Their train weights are uniform (each screened reply's ``NUM_EXAMPLES`` set to 1 after its true metrics
were recorded in ``site_metrics``), and a round without every site releases no model.

``personalised`` is FED-PsyAU's personalised mixing (:class:`Personalised`): after round t site j holds its
locally trained arrays theta_j; in round t + 1 (and in round t's evaluation) site j receives
``(1 - alpha) * theta_j + alpha * (mean of the other sites' theta_k weighted by NUM_EXAMPLES)``. Its aggregate,
the "global model" for checkpoints and server-side evaluation, is the weighted mean of all theta_j.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, Krum, MultiKrum, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords, sample_nodes

from client.protocol import (
    ARRAYS,
    AU_COUNTS,
    CONFIG,
    COUNTS,
    DP_EXHAUSTED,
    METRICS,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    SERVER_ROUND,
    SITE_INDEX,
)
from models.au_graph import N_AUS, cooccurrence_from_counts
from server.central_dp import (
    CentralDP,
    ClientAdaptiveDP,
    ClientFixedDP,
    ServerAdaptiveDP,
    ServerFixedDP,
    central_dp_settings,
    wrapper_kwargs,
)

log = logging.getLogger(__name__)

FEDAVGM_MOMENTUM = 0.9
"""FedAvgM's default server momentum (Hsu et al., 2019, arXiv:1909.06335). Averaging K sites' local updates moves
the global model about as far as one site's update, a K-th of what central training on the union moves in the
same epochs; momentum accumulates the update directions the rounds agree on (compare with
``benchmarks/federation_accuracy.py``)."""

STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedmedian", "krum", "multikrum", "personalised")
DEFAULT_STRATEGY = "fedavg"

TRAIN, EVALUATE = "train", "evaluate"


# ----------------------------------------------------------------------------------------------- the mixin


def _site_index(message: Message) -> int:
    """``METRICS[SITE_INDEX]`` of a reply as an int; KeyError / ValueError / TypeError when absent or not whole."""
    value = message.content[METRICS][SITE_INDEX]
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ValueError(f"{SITE_INDEX} is {value!r}, not a whole number")
    return int(value)


def _budget_spent(message: Message) -> bool:
    """A train reply of a site that did not train because its sample-level DP budget is spent (no arrays)."""
    return bool(message.content[METRICS].get(DP_EXHAUSTED, 0))


def aggregate_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Flower's weighted mean of the replies' metrics, without the meaningless mean of ``SITE_INDEX``."""
    metrics = aggregate_metricrecords(records, weighted_by_key)
    if SITE_INDEX in metrics:
        del metrics[SITE_INDEX]
    return metrics


class SiteRobust:
    """Mixin (put it first in the bases) for any Flower strategy: site order, failures, min-sites.

    It wraps ``configure_*`` (to remember which nodes were sent a message) and ``aggregate_*`` (to screen,
    record and sort the replies before the strategy class aggregates them). See the module docstring. It passes
    every other keyword to the strategy class, so it sits as well on a FedAvg-derived class as on a Flower DP
    wrapper (whose inner FedAvg gets :func:`aggregate_metrics` from :func:`build_strategy`).
    """

    def __init__(self, *, sites: int, min_sites: int = 1, **kwargs: Any) -> None:
        if sites < 1:
            raise ValueError(f"a federation needs at least one site, got sites={sites}")
        if not 1 <= min_sites <= sites:
            raise ValueError(f"min-sites must lie in [1, {sites}] (the number of sites), got {min_sites}")
        super().__init__(**kwargs)
        self.sites = sites
        self.min_sites = min_sites
        self.failures: list[dict[str, Any]] = []
        self.site_metrics: list[dict[str, Any]] = []
        self.node_sites: dict[int, int] = {}  # node id -> site index, from successful replies
        self.on_site_metrics: Callable[[int, str, int, dict[str, Any]], None] | None = None
        self.round_config: Callable[[int], Mapping[str, Any]] | None = None
        self._sent: dict[tuple[str, int], list[int]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.round_config is not None:
            config.update(self.round_config(server_round))
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent[(TRAIN, server_round)] = [message.metadata.dst_node_id for message in messages]
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._sent[(EVALUATE, server_round)] = [message.metadata.dst_node_id for message in messages]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(server_round, self._screen(server_round, TRAIN, replies))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return super().aggregate_evaluate(server_round, self._screen(server_round, EVALUATE, replies))

    def _failure(self, server_round: int, phase: str, node_id: int, reason: str) -> dict[str, Any]:
        return {
            "round": server_round,
            "phase": phase,
            "node_id": node_id,
            "site_index": self.node_sites.get(node_id),
            "reason": reason,
        }

    def _screen(self, server_round: int, phase: str, replies: Iterable[Message]) -> list[Message]:
        """Successful replies sorted by site index; failures recorded; RuntimeError below min-sites."""
        replies = list(replies)
        sent = self._sent.pop((phase, server_round), None)
        good: list[tuple[int, int, Message]] = []
        failed: list[dict[str, Any]] = []
        for message in replies:
            node = message.metadata.src_node_id
            if message.has_error():
                reason = f"error reply (code {message.error.code}): {message.error.reason}"
                failed.append(self._failure(server_round, phase, node, reason))
                continue
            try:
                site = _site_index(message)
            except (KeyError, TypeError, ValueError) as exc:
                reason = f"malformed reply without {METRICS}[{SITE_INDEX}]: {exc!r}"
                failed.append(self._failure(server_round, phase, node, reason))
                continue
            good.append((site, node, message))
        if sent is not None:
            answered = {message.metadata.src_node_id for message in replies}
            failed.extend(
                self._failure(server_round, phase, node, "no reply (timed out or lost)")
                for node in sent
                if node not in answered
            )
        good.sort(key=lambda item: item[0])
        sites = [site for site, _, _ in good]
        if len(set(sites)) != len(sites) or any(not 0 <= site < self.sites for site in sites):
            raise RuntimeError(
                f"round {server_round} ({phase}): replies claim site indices {sites}, but each of the {self.sites} "
                f"sites must reply once with an index in [0, {self.sites - 1}]: check the partition -> site mapping"
            )
        for site, node, _ in good:
            self.node_sites[node] = site
        for record in failed:  # a node whose first success came in this very batch gets its site named too
            if record["site_index"] is None:
                record["site_index"] = self.node_sites.get(record["node_id"])
            log.warning("round %d (%s): node %d (site %s) failed: %s", server_round, phase,
                        record["node_id"], record["site_index"], record["reason"])
        self.failures.extend(failed)

        for site, node, message in good:
            metrics = dict(message.content[METRICS])
            self.site_metrics.append(
                {"round": server_round, "phase": phase, "site_index": site, "node_id": node, "metrics": metrics}
            )
            if self.on_site_metrics is not None:
                self.on_site_metrics(server_round, phase, site, metrics)
        spent = [site for site, _, message in good if phase == TRAIN and _budget_spent(message)]
        if spent:
            log.info("round %d: site(s) %s did not train: sample-level DP budget spent", server_round, spent)
        trained = [message for site, _, message in good if site not in spent]
        expected = len(sent) if sent is not None else len(replies)
        if expected and len(trained) < self.min_sites:
            named = [f"site {r['site_index']} (node {r['node_id']}): {r['reason']}" for r in failed]
            named += [f"site {site}: its dp-target-epsilon is spent" for site in spent]
            raise RuntimeError(
                f"round {server_round} ({phase}): only {len(trained)} of {expected} sites succeeded, fewer than "
                f"min-sites={self.min_sites}; failed: {'; '.join(named) or 'none recorded'}"
            )
        return trained


# ----------------------------------------------------------------------------------------------- personalised


def personalised_mix(
    local: Mapping[int, Mapping[str, np.ndarray]], weights: Mapping[int, float], alpha: float
) -> dict[int, dict[str, np.ndarray]]:
    """FED-PsyAU's mixing: site j -> ``(1 - alpha) theta_j + alpha * sum_{k != j} w_k theta_k / sum_{k != j} w_k``.

    ``local`` maps site index -> {array name -> theta}, ``weights`` site index -> NUM_EXAMPLES. Sums run in
    site order in float64; each result keeps its theta_j's dtype (integer arrays rounded). A lone site keeps
    its own arrays; when the other sites' weights sum to 0 their plain mean is used.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mixing-alpha must lie in [0, 1], got {alpha}")
    order = sorted(local)
    mixed: dict[int, dict[str, np.ndarray]] = {}
    for j in order:
        others = [k for k in order if k != j]
        total = sum(float(weights[k]) for k in others)
        share = {k: (float(weights[k]) / total if total > 0 else 1.0 / len(others)) for k in others}
        arrays: dict[str, np.ndarray] = {}
        for name, own in local[j].items():
            value = own.astype(np.float64)
            if others:
                mean = np.zeros_like(value)
                for k in others:
                    mean += share[k] * local[k][name].astype(np.float64)
                value = (1.0 - alpha) * value + alpha * mean
            if not np.issubdtype(own.dtype, np.floating):
                value = np.rint(value)
            arrays[name] = value.astype(own.dtype)
        mixed[j] = arrays
    return mixed


class _PersonalisedFedAvg(FedAvg):
    """FedAvg whose nodes each get their site's personalised arrays (see :func:`personalised_mix`).

    Expects replies already screened and sorted (:class:`SiteRobust` does that in :class:`Personalised`).
    """

    def __init__(self, *, mixing_alpha: float = 0.1, **kwargs: Any) -> None:
        if not 0.0 <= mixing_alpha <= 1.0:
            raise ValueError(f"mixing-alpha must lie in [0, 1], got {mixing_alpha}")
        super().__init__(**kwargs)
        self.mixing_alpha = mixing_alpha
        self.personal: dict[int, ArrayRecord] = {}  # site index -> arrays it trains from / is evaluated with next
        self._node_site: dict[int, int] = {}  # node id -> site index, from the last train replies

    def summary(self) -> None:
        log.info("Personalised mixing (FED-PsyAU): alpha=%s", self.mixing_alpha)
        super().summary()

    def arrays_for_node(self, node_id: int, default: ArrayRecord) -> ArrayRecord:
        """The node's site's personalised arrays; ``default`` (the global arrays) before its first reply."""
        site = self._node_site.get(node_id)
        return self.personal.get(site, default) if site is not None else default

    def _per_node_messages(
        self, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, fraction: float, minimum: int, kind: str
    ) -> list[Message]:
        if fraction == 0.0:
            return []
        sample_size = max(int(len(list(grid.get_node_ids())) * fraction), minimum)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, sample_size)
        return [
            Message(
                content=RecordDict(
                    {self.arrayrecord_key: self.arrays_for_node(node, arrays), self.configrecord_key: config}
                ),
                message_type=kind,
                dst_node_id=node,
            )
            for node in sorted(node_ids)
        ]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[SERVER_ROUND] = server_round
        return self._per_node_messages(
            arrays, config, grid, self.fraction_train, self.min_train_nodes, MessageType.TRAIN
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[SERVER_ROUND] = server_round
        return self._per_node_messages(
            arrays, config, grid, self.fraction_evaluate, self.min_evaluate_nodes, MessageType.EVALUATE
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [message for message in replies if not message.has_error()]
        local: dict[int, dict[str, np.ndarray]] = {}
        weights: dict[int, float] = {}
        for message in replies:
            site = _site_index(message)
            record = next(iter(message.content.array_records.values()))
            local[site] = {name: array.numpy() for name, array in record.items()}
            weights[site] = float(message.content[METRICS][self.weighted_by_key])
            self._node_site[message.metadata.src_node_id] = site
        arrays, metrics = super().aggregate_train(server_round, replies)
        if local:  # sites that failed this round fall back to the global arrays next round
            mixed = personalised_mix(local, weights, self.mixing_alpha)
            self.personal = {
                site: ArrayRecord({name: Array(value) for name, value in values.items()})
                for site, values in mixed.items()
            }
        return arrays, metrics


# ----------------------------------------------------------------------------------------------- classes


class SiteFedAvg(SiteRobust, FedAvg):
    """FedAvg with :class:`SiteRobust`."""


class SiteFedAvgM(SiteRobust, FedAvgM):
    """FedAvg with server momentum and a server learning rate (Hsu et al., 2019) and :class:`SiteRobust`."""


class SiteFedProx(SiteRobust, FedProx):
    """FedProx with :class:`SiteRobust` (the client adds the proximal term; the server sends ``proximal-mu``)."""


class SiteFedAdam(SiteRobust, FedAdam):
    """FedAdam with :class:`SiteRobust`."""


class SiteFedMedian(SiteRobust, FedMedian):
    """FedMedian with :class:`SiteRobust`."""


class SiteKrum(SiteRobust, Krum):
    """Krum with :class:`SiteRobust`."""


class SiteMultiKrum(SiteRobust, MultiKrum):
    """MultiKrum with :class:`SiteRobust`."""


class Personalised(SiteRobust, _PersonalisedFedAvg):
    """FED-PsyAU's personalised mixing with :class:`SiteRobust`.

    Train and evaluate messages differ per node: a node whose site replied to the last train round gets that
    site's mixed arrays (``strategy.personal[site]``), any other node the global arrays. So the federated
    evaluation of round t scores each site with the arrays it will train from in round t + 1, not the global
    model; ``Strategy.start`` passes the global aggregate (weighted mean of all theta_j) to ``evaluate_fn``
    and keeps it in ``Result.arrays``.
    """


class SiteServerFixedDP(SiteRobust, ServerFixedDP):
    """User-level DP, server-side fixed clipping (:mod:`server.central_dp`) around a plain FedAvg / FedProx."""


class SiteClientFixedDP(SiteRobust, ClientFixedDP):
    """User-level DP, client-side fixed clipping (:mod:`server.central_dp`) around a plain FedAvg / FedProx."""


class SiteServerAdaptiveDP(SiteRobust, ServerAdaptiveDP):
    """User-level DP, server-side adaptive clipping (:mod:`server.central_dp`) around a plain FedAvg / FedProx."""


class SiteClientAdaptiveDP(SiteRobust, ClientAdaptiveDP):
    """User-level DP, client-side adaptive clipping (:mod:`server.central_dp`) around a plain FedAvg / FedProx."""


SITE_DP_CLASSES: dict[str, type[SiteRobust]] = {
    cls.mode_name: cls for cls in (SiteServerFixedDP, SiteClientFixedDP, SiteServerAdaptiveDP, SiteClientAdaptiveDP)
}
"""``central-dp`` mode -> class. :class:`SiteRobust` screens, records and sorts the replies before the DP wrapper
clips and noises them; the wrapper's inner strategy is a plain Flower FedAvg / FedProx, as Flower's
fixed-clipping accountant requires."""


# ----------------------------------------------------------------------------------------------- factory


def _number(run_config: Mapping[str, Any], key: str, default: float) -> float:
    value = run_config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"run-config {key} must be a number, got {value!r}")
    return float(value)


def _whole(run_config: Mapping[str, Any], key: str, default: int) -> int:
    value = _number(run_config, key, default)
    if value != int(value):
        raise ValueError(f"run-config {key} must be a whole number, got {value!r}")
    return int(value)


def _flower_kwargs(sites: int) -> dict[str, Any]:
    """FedAvg's keywords: every site sampled, our record names, metrics without the mean site index."""
    return {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": sites,
        "min_evaluate_nodes": sites,
        "min_available_nodes": sites,
        "weighted_by_key": NUM_EXAMPLES,
        "arrayrecord_key": ARRAYS,
        "configrecord_key": CONFIG,
        "train_metrics_aggr_fn": aggregate_metrics,
        "evaluate_metrics_aggr_fn": aggregate_metrics,
    }


def _central_dp_strategy(
    key: str, settings: CentralDP, sites: int, min_sites: int, run_config: Mapping[str, Any]
) -> SiteRobust:
    """The DP wrapper of ``settings.mode`` with :class:`SiteRobust` around a plain Flower FedAvg / FedProx."""
    flower = _flower_kwargs(sites)
    if key == "fedprox":
        inner: FedAvg = FedProx(**flower, proximal_mu=_number(run_config, PROXIMAL_MU, 0.01))
    else:
        inner = FedAvg(**flower)
    cls = SITE_DP_CLASSES[settings.mode]
    return cls(sites=sites, min_sites=min_sites, **wrapper_kwargs(settings, inner, sites))


def build_strategy(name: str, sites: int, run_config: Mapping[str, Any] | None = None) -> Strategy:
    """One of :data:`STRATEGIES` for ``sites`` sites, every one of them required to be connected and sampled.

    Run-config keys read: ``min-sites`` (default 1), ``proximal-mu`` (fedprox, 0.01), ``server-lr`` (fedavgm's
    server learning rate, 1.0; fedadam's eta, 1e-2, other FedAdam settings being Flower's defaults),
    ``server-momentum`` (fedavgm, :data:`FEDAVGM_MOMENTUM`), ``num-malicious-nodes`` (krum / multikrum, 0),
    ``num-nodes-to-select`` (multikrum, ``max(1, sites - num-malicious-nodes - 1)``: drop at least the
    farthest update), ``mixing-alpha`` (personalised, 0.1), and :data:`server.central_dp.CENTRAL_DP_KEYS`: with
    ``central-dp`` set, fedavg or fedprox comes wrapped in Flower's DP wrapper (:data:`SITE_DP_CLASSES`).
    Raises ValueError for an unknown name or a bad setting, naming the key.
    """
    run_config = run_config or {}
    key = (name or DEFAULT_STRATEGY).strip().lower()
    if key not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    min_sites = _whole(run_config, "min-sites", 1)
    central = central_dp_settings(run_config, key, sites)
    if central is not None:
        return _central_dp_strategy(key, central, sites, min_sites, run_config)
    common: dict[str, Any] = {"sites": sites, "min_sites": min_sites, **_flower_kwargs(sites)}
    if key == "fedavg":
        return SiteFedAvg(**common)
    if key == "fedavgm":
        return SiteFedAvgM(
            **common,
            server_learning_rate=_number(run_config, "server-lr", 1.0),
            server_momentum=_number(run_config, "server-momentum", FEDAVGM_MOMENTUM),
        )
    if key == "fedprox":
        return SiteFedProx(**common, proximal_mu=_number(run_config, PROXIMAL_MU, 0.01))
    if key == "fedadam":
        return SiteFedAdam(**common, eta=_number(run_config, "server-lr", 1e-2))
    if key == "fedmedian":
        return SiteFedMedian(**common)
    if key == "personalised":
        return Personalised(**common, mixing_alpha=_number(run_config, "mixing-alpha", 0.1))
    malicious = _whole(run_config, "num-malicious-nodes", 0)
    if not 0 <= malicious < sites:
        raise ValueError(f"num-malicious-nodes must lie in [0, {sites - 1}], got {malicious}")
    if sites <= 2 * malicious + 2:
        log.warning("Krum's guarantee needs sites > 2 * num-malicious-nodes + 2 (sites=%d, f=%d)", sites, malicious)
    if key == "krum":
        return SiteKrum(**common, num_malicious_nodes=malicious)
    select = _whole(run_config, "num-nodes-to-select", max(1, sites - malicious - 1))
    if not 1 <= select <= sites:
        raise ValueError(f"num-nodes-to-select must lie in [1, {sites}], got {select}")
    return SiteMultiKrum(**common, num_malicious_nodes=malicious, num_nodes_to_select=select)


# ----------------------------------------------------------------------------------------------- FED-PsyAU helpers


def decay_prior_weight(server_round: int, rounds: int, start: float = 1.0) -> float:
    """FED-PsyAU's prior weight r: ``start`` in round 1 falling linearly to 0 in round ``rounds``.

    ``r = start * (rounds - server_round) / (rounds - 1)``; a one-round run keeps ``start`` (the prior is
    used fully rather than never). Rounds count from 1, as in Flower.
    """
    if rounds < 1 or not 1 <= server_round <= rounds:
        raise ValueError(f"server_round must lie in [1, rounds] with rounds >= 1, got {server_round} of {rounds}")
    if rounds == 1:
        return float(start)
    return float(start) * (rounds - server_round) / (rounds - 1)


def _counts_of(item: Message | RecordDict | Sequence[float]) -> list[float] | None:
    """The 144 counts in a query reply (None for an error reply), its content, or a plain sequence."""
    if isinstance(item, Message):
        if item.has_error():
            return None
        item = item.content
    if isinstance(item, RecordDict):
        item = item[AU_COUNTS][COUNTS]
    return list(item)


def cooccurrence_prior(count_replies: Iterable[Message | RecordDict | Sequence[float]]) -> list[float]:
    """Sum the sites' ``AU_COUNTS[COUNTS]`` (144 each) -> row-normalised 12x12 prior, 144 floats row-major.

    Items may be query reply Messages (error replies are skipped), their RecordDicts, or plain sequences.
    ``P[i, j] = count(i and j) / sum_k count(i and k)`` (the release's convention, what
    ``AUGraphHead.set_cooccurrence`` makes of :func:`models.au_graph.cooccurrence_from_counts`); AUs never
    seen get identity rows. Raises ValueError when no site sent counts or a count list is not 144 long.
    """
    total = torch.zeros(N_AUS * N_AUS, dtype=torch.float64)
    seen = 0
    for item in count_replies:
        counts = _counts_of(item)
        if counts is None:
            continue
        if len(counts) != N_AUS * N_AUS:
            raise ValueError(f"a site sent {len(counts)} co-occurrence counts, expected {N_AUS * N_AUS}")
        total += torch.tensor(counts, dtype=torch.float64)
        seen += 1
    if not seen:
        raise ValueError("no site sent co-occurrence counts")
    conditional = cooccurrence_from_counts(total.reshape(N_AUS, N_AUS)).to(torch.float64)
    prior = conditional / conditional.sum(dim=1, keepdim=True)  # every row holds its diagonal 1: no zero sums
    return [float(value) for value in prior.flatten()]
