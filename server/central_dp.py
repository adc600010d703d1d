"""User-level (central) differential privacy at the server: Flower's DP strategy wrappers, accounted.

Each site is one "user" (DP-FedAvg, McMahan et al., ICLR 2018, arXiv:1710.06963): in every round each site's
update (the arrays it returns minus the global arrays it received) is clipped to L2 norm C, the server averages
the clipped updates *uniformly* over the n sites and adds Gaussian noise of standard deviation z * C / n. The
guarantee covers whether any one site (all of its clips) took part; it says nothing about the metrics sites
send in the clear (loss, num-examples, evaluate scores: Flower's wrappers do not noise metrics) nor about the
number of sites, which is public.

Run-config keys (:data:`CENTRAL_DP_KEYS`):

- ``central-dp``: ``off`` (or ``""``, the default), ``server-fixed``, ``client-fixed``, ``server-adaptive``,
  ``client-adaptive``: which of Flower's ``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping``
  wraps the strategy. ``client-*`` clip at the site (``client.privacy.central.central_clipping_mod``), so the
  server never sees an unclipped update (it refuses, naming the site, an update above the clip: a ClientApp
  without the mod); ``server-*`` trust the server with them.
- ``central-dp-noise``: the noise multiplier z (default 1.0).
- ``central-dp-clip``: C for fixed clipping, the initial C for adaptive (default :data:`DEFAULT_CLIP`).
- ``central-dp-delta``: delta of the reported epsilon (default 1e-5).
- ``central-dp-max-epsilon``: optional budget (absent or 0: none). The round whose release would take the
  cumulative epsilon above it is refused before any site trains: ``configure_train`` raises Flower's
  ``PrivacyBudgetExhausted``.
- ``central-dp-count-stddev``: adaptive only, the std of the noise on the count of clipped sites (default
  ``max(sites / 20, z)``; Andrew et al.'s ``sites / 20`` alone is meant for hundreds of clients and is refused
  by Flower for a few sites).

Only ``fedavg`` and ``fedprox`` can be wrapped (:func:`refusal`). Composition: :class:`SiteRobust` outside the
DP wrapper, a plain Flower FedAvg / FedProx inside (``server.strategies.SiteServerFixedDP`` etc.), because
Flower's fixed-clipping accountant accepts only an inner strategy whose ``aggregate_train`` is FedAvg's.

Accounting, with Flower's ``RdpAccountant`` (``dp-accounting`` backend): every site trains in every round, so
no sampling amplification; neighbouring federations differ by adding or removing one site; population = sites.
Fixed clipping: Flower's wrapper composes ``GaussianPrivacyEvent(z)`` per successful release. Adaptive
clipping (Andrew et al., 2021, arXiv:1905.03871): Flower has no accountant, :class:`AdaptiveAccounting`
composes one event per release with :meth:`AdaptiveAccounting.release_noise_multiplier` (not z: see there).

Weights are uniform (:func:`uniform_weights`): DP-FedAvg's noise is calibrated to an average in which one
site moves the result by at most C / n, which a NUM_EXAMPLES-weighted mean breaks. A round in which any site
failed releases nothing (the global model stays, no privacy is spent): the noise was calibrated to n sites.

Utility: the noise's norm is z * C / n * sqrt(parameters). For three sites and the ``lite`` model (1.63 M
parameters, initial norm 56) at z = 1, C = 1 that is about 430 per round against updates of norm about 1:
user-level DP needs many more users than three sites before the model can learn through it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, get_norm
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyAccountant,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from client.privacy.central import ADAPTIVE, CENTRAL_CLIPPING, FIXED
from client.protocol import SITE_INDEX

log = logging.getLogger(__name__)

CENTRAL_DP = "central-dp"
CENTRAL_DP_NOISE = "central-dp-noise"
CENTRAL_DP_CLIP = "central-dp-clip"
CENTRAL_DP_DELTA = "central-dp-delta"
CENTRAL_DP_MAX_EPSILON = "central-dp-max-epsilon"
CENTRAL_DP_COUNT_STDDEV = "central-dp-count-stddev"
CENTRAL_DP_KEYS = (
    CENTRAL_DP,
    CENTRAL_DP_NOISE,
    CENTRAL_DP_CLIP,
    CENTRAL_DP_DELTA,
    CENTRAL_DP_MAX_EPSILON,
    CENTRAL_DP_COUNT_STDDEV,
)
"""Every run-config key this module reads."""

OFF = "off"
MODES = (OFF, "server-fixed", "client-fixed", "server-adaptive", "client-adaptive")
DP_STRATEGIES = ("fedavg", "fedprox")
"""Inner strategies whose aggregate is the (uniform) mean Flower's noise is calibrated to."""

DEFAULT_NOISE = 1.0
DEFAULT_CLIP = 1.0
"""C, just above the median L2 norm of one site's round-1 update (Andrew et al. aim the clip at the median): the
``lite`` model (1.63 M float32 parameters, no buffers) after one local epoch with the default run config (Adam,
lr 3e-4, batch 8), measured in-process on the synthetic sites: CASME II 0.70 (23 clips), SAMM 0.88 (27), SMIC
0.99 (36). The norm grows with a site's optimizer steps, so sites with more clips get clipped; Flower's 0.1
would shrink every update here about eightfold."""
DEFAULT_DELTA = 1e-5

_REFUSED = {
    "fedavgm": "its server momentum is built from the un-noised average (Flower's wrapper noises the inner "
    "strategy's output), so later releases repeat earlier rounds' updates without fresh noise",
    "fedadam": "its server moments are built from the un-noised average (Flower's wrapper noises the inner "
    "strategy's output), so later releases repeat earlier rounds' updates without fresh noise",
    "fedmedian": "a median is not a mean: one site can move it by more than clip / sites, the bound the noise "
    "is calibrated to",
    "krum": "it selects updates instead of averaging them: one site can move the result by more than "
    "clip / sites, the bound the noise is calibrated to",
    "multikrum": "it selects updates instead of averaging them: one site can move the result by more than "
    "clip / sites, the bound the noise is calibrated to",
    "personalised": "it sends every site a mix of the other sites' un-noised arrays",
}


# ----------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class CentralDP:
    """Resolved central-DP settings of one run (see the module docstring for each key)."""

    mode: str
    noise_multiplier: float
    clip: float
    delta: float
    max_epsilon: float | None
    count_stddev: float | None  # adaptive only

    @property
    def client_side(self) -> bool:
        return self.mode.startswith("client-")

    @property
    def adaptive(self) -> bool:
        return self.mode.endswith("-adaptive")

    @property
    def clipping(self) -> str:
        """The site's clipping mod (``CENTRAL_CLIPPING`` value) for the client-side wrappers."""
        return ADAPTIVE if self.adaptive else FIXED


def _positive(run_config: Mapping[str, Any], key: str, default: float | None, fix: str) -> float | None:
    """A finite positive number (None when absent and ``default`` is None); ValueError naming key and fix."""
    value = run_config.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"run-config {key} must be a positive number ({fix}), got {value!r}")
    return float(value)


def central_dp_mode(run_config: Mapping[str, Any]) -> str:
    """``central-dp`` normalised: one of :data:`MODES` (``""`` -> ``"off"``); ValueError listing them."""
    value = run_config.get(CENTRAL_DP, OFF)
    mode = (value.strip().lower() or OFF) if isinstance(value, str) else None
    if mode not in MODES:
        raise ValueError(f"run-config {CENTRAL_DP} must be one of {', '.join(MODES)} (or empty for off), got {value!r}")
    return mode


def refusal(strategy: str, mode: str) -> str | None:
    """Why ``strategy`` cannot carry central DP (None when it can): the ValueError :func:`central_dp_settings`
    raises names the key, the strategy and what to choose instead."""
    if strategy in DP_STRATEGIES:
        return None
    reason = _REFUSED.get(strategy, "its aggregate is not the mean the noise is calibrated to")
    return (
        f"run-config {CENTRAL_DP}={mode} cannot wrap strategy {strategy!r}: {reason}; choose strategy "
        f"{' or '.join(DP_STRATEGIES)}, or set {CENTRAL_DP}={OFF}"
    )


def central_dp_settings(run_config: Mapping[str, Any], strategy: str, sites: int) -> CentralDP | None:
    """The run's central-DP settings, None when ``central-dp`` is off; ValueError naming the key and the fix."""
    mode = central_dp_mode(run_config)
    if mode == OFF:
        return None
    refused = refusal(strategy, mode)
    if refused is not None:
        raise ValueError(refused)
    noise = _positive(run_config, CENTRAL_DP_NOISE, DEFAULT_NOISE, "the Gaussian noise multiplier z; accounting "
                      "needs z > 0, and z >= 1 is the usual choice")
    clip = _positive(run_config, CENTRAL_DP_CLIP, DEFAULT_CLIP, "the L2 norm each site's update is clipped to")
    delta = _positive(run_config, CENTRAL_DP_DELTA, DEFAULT_DELTA, "the delta of (epsilon, delta)-DP, below 1")
    if delta >= 1:
        raise ValueError(f"run-config {CENTRAL_DP_DELTA} must lie in (0, 1), e.g. 1e-5, got {delta!r}")
    budget = run_config.get(CENTRAL_DP_MAX_EPSILON)
    unlimited = budget is None or (budget == 0 and not isinstance(budget, bool))
    max_epsilon = None if unlimited else _positive(
        run_config, CENTRAL_DP_MAX_EPSILON, None, "the epsilon budget; 0 or absent for none"
    )
    count_stddev = None
    if mode.endswith("-adaptive"):
        count_stddev = _positive(run_config, CENTRAL_DP_COUNT_STDDEV, max(sites / 20, noise),
                                 "the std of the noise on the count of clipped sites")
        if noise >= 2 * count_stddev:
            raise ValueError(
                f"run-config {CENTRAL_DP_COUNT_STDDEV} must exceed {CENTRAL_DP_NOISE} / 2 = {noise / 2:g} (Flower "
                f"splits z between the update and the count), got {count_stddev:g}: raise it or leave it unset"
            )
    return CentralDP(mode, noise, clip, delta, max_epsilon, count_stddev)


def make_accountant(settings: CentralDP, sites: int) -> RdpAccountant:
    """Flower's RDP accountant for user-level DP: no amplification, add-or-remove-one site, population = sites."""
    config = PrivacyConfig(
        target_delta=settings.delta,
        population_size=sites,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=settings.max_epsilon,
    )
    return RdpAccountant(config)


def wrapper_kwargs(settings: CentralDP, inner: FedAvg, sites: int) -> dict[str, Any]:
    """The keyword arguments of the mode's wrapper class (see ``server.strategies``) around ``inner``."""
    common: dict[str, Any] = {
        "strategy": inner,
        "noise_multiplier": settings.noise_multiplier,
        "num_sampled_clients": sites,
        "accountant": make_accountant(settings, sites),
    }
    if settings.adaptive:
        return {**common, "initial_clipping_norm": settings.clip, "clipped_count_stddev": settings.count_stddev}
    return {**common, "clipping_norm": settings.clip}


# ----------------------------------------------------------------------------------------------- the mixins


def uniform_weights(replies: Iterable[Message], weighted_by_key: str) -> None:
    """Set every reply's weight (``weighted_by_key`` in each MetricRecord) to 1, in place.

    Call it after the true metrics were recorded (:class:`SiteRobust` does so before aggregating). Then
    FedAvg's mean is the plain mean over sites and Flower's accounted path, which requires equal weights,
    accepts the replies; the aggregated train metrics become plain means over sites too.
    """
    for reply in replies:
        for record in reply.content.metric_records.values():
            if weighted_by_key in record:
                record[weighted_by_key] = 1


def _update_norm(reply: Message, reference: list[np.ndarray]) -> float:
    """L2 norm, in float64, of a reply's arrays minus the arrays the site was sent."""
    squares = 0.0
    for record in reply.content.array_records.values():
        for array, sent in zip(record.to_numpy_ndarrays(), reference, strict=True):
            squares += float((np.subtract(array, sent, dtype=np.float64) ** 2).sum())
    return math.sqrt(squares)


class UserLevel:
    """Mixin, between :class:`SiteRobust` and a Flower DP wrapper: uniform weights, full rounds, client mode.

    ``self.strategy`` (the inner FedAvg), ``self.num_sampled_clients`` and ``self.accountant`` come from the
    wrapper (or :class:`AdaptiveAccounting`).
    """

    strategy: FedAvg
    num_sampled_clients: int
    accountant: PrivacyAccountant | None
    client_clipping: str | None = None
    """``CENTRAL_CLIPPING`` value the train config carries (client-side wrappers), None for server-side."""
    mode_name: str = ""
    """The ``central-dp`` value this class implements."""
    _dp_sent: tuple[ArrayRecord, float] | None = None  # (arrays, clipping norm) of the last train round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.client_clipping is not None:
            config[CENTRAL_CLIPPING] = self.client_clipping
        try:
            messages = super().configure_train(server_round, arrays, config, grid)
        except PrivacyBudgetExhausted as exc:
            raise PrivacyBudgetExhausted(
                f"round {server_round} refused: {exc} Raise run-config {CENTRAL_DP_MAX_EPSILON} or run fewer rounds."
            ) from exc
        clip = config[KEY_CLIPPING_NORM] if self.client_clipping is not None else self.clipping_norm
        self._dp_sent = (arrays, float(clip))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._check_updates(server_round, replies)
        uniform_weights(replies, self.strategy.weighted_by_key)
        if len(replies) != self.num_sampled_clients:
            log.warning(
                "round %d: %d of %d sites replied; central DP releases only rounds of every site (the noise is "
                "calibrated to all of them): the global model stays as it was and no privacy is spent",
                server_round, len(replies), self.num_sampled_clients,
            )
            return self._skip(server_round, replies)
        return super().aggregate_train(server_round, replies)

    def _skip(self, server_round: int, replies: list[Message]) -> tuple[None, None]:
        """A round without every site: Flower's accounted fixed-clipping wrappers refuse it themselves (and drop
        the round's pending privacy event)."""
        arrays, _ = super().aggregate_train(server_round, replies)
        if arrays is not None:
            raise RuntimeError(f"round {server_round}: the DP wrapper released a round without every site")
        return None, None

    def _check_updates(self, server_round: int, replies: list[Message]) -> None:
        """RuntimeError, naming the site, for an update the wrapper must not (or cannot) aggregate.

        Client-side clipping: an update above the clipping norm the site was sent. Flower's client-side fixed
        wrapper trusts the sites; a ClientApp without ``central_clipping_mod`` would void the guarantee
        silently. The tolerance covers float32 rounding only (``param + clipped update`` rounded per
        coordinate: at most 2**-24 of each parameter): this catches a missing mod, not a malicious site.
        Server-side clipping: an update of norm 0 (the arrays sent back unchanged), on which Flower's clipping
        divides by zero.
        """
        if self._dp_sent is None:
            return
        sent, clip = self._dp_sent
        reference = sent.to_numpy_ndarrays()
        allowed = clip * (1 + 1e-6) + 2.0**-23 * get_norm(reference)
        for reply in replies:
            norm = _update_norm(reply, reference)
            metrics = next(iter(reply.content.metric_records.values()), {})
            node, site = reply.metadata.src_node_id, metrics.get(SITE_INDEX)
            where = f"round {server_round}: the update of node {node} (site {site})"
            if self.client_clipping is not None and norm > allowed:
                raise RuntimeError(
                    f"{where} has L2 norm {norm:.6g} > the clipping norm {clip:.6g} of run-config "
                    f"{CENTRAL_DP}={self.mode_name}: register client.privacy.central.central_clipping_mod on every "
                    "site's ClientApp (client_app.train(mods=[central_clipping_mod]))"
                )
            if self.client_clipping is None and norm == 0:
                raise RuntimeError(
                    f"{where} is zero (the arrays it was sent, unchanged), which Flower's clipping divides by: "
                    "check that site's training (its train split, local-epochs, lr)"
                )

    def privacy_spent(self) -> tuple[float, float, int] | None:
        """(epsilon, delta, releases) so far; None without an accountant."""
        if self.accountant is None:
            return None
        spent = self.accountant.get_privacy_spent()
        return spent.epsilon, spent.delta, spent.num_releases


class AdaptiveAccounting(UserLevel):
    """Accounting for Flower's adaptive-clipping wrappers, which have none: one Gaussian event per release.

    Each release publishes two Gaussian mechanisms over the same sites: the sum of updates clipped to C_t with
    noise std ``z_update * C_t`` (``self.noise_multiplier``, which ``compute_adaptive_noise_params`` derives
    from the user's z), and the count of clipped sites with noise std ``sigma_b`` (``self.clipped_count_stddev``).
    Their Renyi-DP adds up to that of one Gaussian mechanism with multiplier
    ``(z_update**-2 + (sigma_b / s)**-2) ** -0.5``, s being the count's sensitivity.

    Andrew et al. (Theorem 1) sum ``b_i - 1/2`` over a fixed expected count, so s = 1/2 and the total is exactly
    the user's z: ``compute_adaptive_noise_params`` solves ``z_update**-2 + (2 sigma_b)**-2 = z**-2``. Flower's
    wrappers sum the raw bits ``b_i`` in {0, 1} (``_noisy_fraction``: a normal around the count), so adding or
    removing a site changes the count by up to s = 1, and accounting with z would understate the loss. We
    account with s = 1 (:meth:`release_noise_multiplier`): with the default count noise ``sigma_b = z`` that
    is about 0.76 z, so adaptive clipping spends more epsilon per round than fixed clipping with the same z.

    A round is released when the wrapper aggregated a full set of replies (both mechanisms ran).
    """

    noise_multiplier: float  # the update's share of z, set by the wrapper
    clipped_count_stddev: float

    def __init__(self, *, accountant: PrivacyAccountant, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.accountant = accountant

    def release_noise_multiplier(self) -> float:
        """The Gaussian multiplier equivalent to one adaptive release (count sensitivity 1, see the class)."""
        return (self.noise_multiplier**-2 + self.clipped_count_stddev**-2) ** -0.5

    def _event(self) -> GaussianPrivacyEvent:
        population = self.accountant.config.population_size
        return GaussianPrivacyEvent(self.release_noise_multiplier(), self.num_sampled_clients, population)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        budget = self.accountant.config.max_epsilon
        if budget is not None and self.accountant.would_exceed(self._event()):
            spent = self.accountant.get_privacy_spent()
            raise PrivacyBudgetExhausted(
                f"round {server_round} refused: its release would take epsilon from {spent.epsilon:.4g} above "
                f"{CENTRAL_DP_MAX_EPSILON}={budget:g} (delta {spent.delta:g}). Raise run-config "
                f"{CENTRAL_DP_MAX_EPSILON} or run fewer rounds."
            )
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        result = super().aggregate_train(server_round, replies)
        if len(replies) == self.num_sampled_clients:  # both mechanisms ran (the clip moved, the arrays are noised)
            self.accountant.compose(self._event())
            spent = self.accountant.get_privacy_spent()
            log.info("round %d: central DP epsilon %.4f at delta %g after %d releases",
                     server_round, spent.epsilon, spent.delta, spent.num_releases)
        return result

    def _skip(self, server_round: int, replies: list[Message]) -> tuple[None, None]:
        """Flower's adaptive wrappers would aggregate a short round with noise for every site: skip it here."""
        return None, None


class ServerFixedDP(UserLevel, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping (it composes its accountant per release)."""

    mode_name = "server-fixed"


class ClientFixedDP(UserLevel, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping; the train config asks the sites for ``fixedclipping_mod``."""

    mode_name = "client-fixed"
    client_clipping = FIXED


class ServerAdaptiveDP(AdaptiveAccounting, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, accounted by :class:`AdaptiveAccounting`."""

    mode_name = "server-adaptive"


class ClientAdaptiveDP(AdaptiveAccounting, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping; the train config asks the sites for ``adaptiveclipping_mod``."""

    mode_name = "client-adaptive"
    client_clipping = ADAPTIVE


# ----------------------------------------------------------------------------------------------- reporting


def central_privacy(strategy: Strategy) -> dict[str, float | int] | None:
    """The cumulative user-level privacy loss so far, for metrics.jsonl / summary.json; None when central DP is off.

    ``{"epsilon", "delta", "releases", "noise-multiplier", "clip"}``: epsilon at the run's ``central-dp-delta``
    after ``releases`` noised aggregates (rounds in which a site failed release nothing), the multiplier each
    release is accounted with and the current clipping norm (it changes every round with adaptive clipping).
    """
    if not isinstance(strategy, UserLevel):
        return None
    spent = strategy.privacy_spent()
    if spent is None:
        return None
    epsilon, delta, releases = spent
    multiplier = (
        strategy.release_noise_multiplier() if isinstance(strategy, AdaptiveAccounting) else strategy.noise_multiplier
    )
    return {
        "epsilon": epsilon,
        "delta": delta,
        "releases": releases,
        "noise-multiplier": float(multiplier),
        "clip": float(strategy.clipping_norm),
    }
