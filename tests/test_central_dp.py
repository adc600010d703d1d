"""User-level (central) DP: Flower's DP wrappers chosen from the run config, clipping, noise, accounting, the mod."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
from flwr.app import (
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedProx,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from test_strategies import FakeGrid, as_record, error_reply, train_reply

from client.privacy.central import CENTRAL_CLIPPING, central_clipping_mod
from client.protocol import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, PRIOR_WEIGHT, SITE_INDEX
from server.central_dp import (
    CENTRAL_DP_KEYS,
    DEFAULT_CLIP,
    MODES,
    central_privacy,
)
from server.strategies import STRATEGIES, SiteFedAvg, SiteRobust, build_strategy

FLOWER_WRAPPER = {
    "server-fixed": DifferentialPrivacyServerSideFixedClipping,
    "client-fixed": DifferentialPrivacyClientSideFixedClipping,
    "server-adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
    "client-adaptive": DifferentialPrivacyClientSideAdaptiveClipping,
}
NODES = {0: 101, 1: 57, 2: 230}  # site -> node id: node ids do not follow the site order
EXAMPLES = {0: 13, 1: 7, 2: 29}
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


pytestmark = pytest.mark.usefixtures("task_identity")


START = {"w": np.zeros((4, 3)), "b": np.zeros(3)}


def update(site: int, norm: float) -> dict[str, np.ndarray]:
    """Site ``site``'s update: a random direction of L2 norm ``norm`` over both arrays."""
    generator = np.random.default_rng(site)
    raw = {"w": generator.normal(size=(4, 3)), "b": generator.normal(size=3)}
    scale = norm / np.sqrt(sum(float((v**2).sum()) for v in raw.values()))
    return {name: value * scale for name, value in raw.items()}


def replies_for(updates: dict[int, dict[str, np.ndarray]], start: dict[str, np.ndarray] = START) -> list[Message]:
    return [
        train_reply(NODES[s], s, {k: start[k] + u[k] for k in start}, EXAMPLES[s], loss=s + 0.5)
        for s, u in updates.items()
    ]


def train_round(strategy, replies: list[Message], server_round: int = 1, start: dict = START):
    """configure_train then aggregate_train on ``replies``; (messages sent, (arrays, metrics))."""
    grid = FakeGrid(sorted(NODES.values()))
    messages = list(strategy.configure_train(server_round, as_record(start), ConfigRecord(), grid))
    return messages, strategy.aggregate_train(server_round, replies)


def dp(mode: str, **config: object) -> dict[str, object]:
    return {"central-dp": mode, **config}


def rdp_epsilon(noise: float, releases: int, delta: float) -> float:
    """(epsilon, delta) of ``releases`` Gaussian mechanisms of multiplier ``noise`` (RDP alpha / (2 z^2) each)."""
    orders = np.array(ORDERS)
    rdp = releases * orders / (2 * noise**2)
    eps = rdp - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    return float(eps.min())


# ----------------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("inner", ["fedavg", "fedprox"])
@pytest.mark.parametrize("mode", MODES[1:])
def test_each_mode_wraps_a_plain_flower_strategy_with_site_robust_outside(mode: str, inner: str) -> None:
    strategy = build_strategy(inner, 3, dp(mode.upper(), **{"min-sites": 2}))
    assert isinstance(strategy, FLOWER_WRAPPER[mode]) and isinstance(strategy, SiteRobust)
    assert strategy.__class__.__mro__[1] is SiteRobust  # it screens and sorts before the wrapper clips
    assert type(strategy.strategy) is (FedProx if inner == "fedprox" else FedAvg)  # not a Site* class
    assert strategy.strategy.min_train_nodes == strategy.num_sampled_clients == 3
    assert strategy.min_sites == 2 and strategy.failures == [] and strategy.site_metrics == []
    assert strategy.node_sites == {} and strategy.on_site_metrics is None and strategy.round_config is None
    assert strategy.clipping_norm == DEFAULT_CLIP
    config = strategy.accountant.config
    assert (config.population_size, config.target_delta, config.max_epsilon) == (3, 1e-5, None)
    assert config.sampling_method is SamplingMethod.NO_AMPLIFICATION
    assert config.neighboring_relation is NeighboringRelation.ADD_OR_REMOVE_ONE
    privacy = central_privacy(strategy)
    assert privacy is not None and privacy["epsilon"] == 0.0 and privacy["delta"] == 1e-5
    if "fixed" in mode:
        assert strategy.noise_multiplier == 1.0
    else:  # Flower gives the update a share of z: (z^-2 - (2 sigma_b)^-2)^-1/2, sigma_b = max(sites / 20, z)
        assert strategy.clipped_count_stddev == 1.0
        assert strategy.noise_multiplier == pytest.approx((1.0 - 0.25) ** -0.5)


def test_off_is_the_default_and_builds_the_plain_strategy() -> None:
    for config in ({}, {"central-dp": ""}, {"central-dp": "off"}, {"central-dp": " OFF "}):
        strategy = build_strategy("fedavg", 3, {**config, "central-dp-noise": 2.0})
        assert type(strategy) is SiteFedAvg
        assert central_privacy(strategy) is None
        assert central_privacy(strategy) is None


def test_run_config_values_reach_the_wrappers() -> None:
    config = {"central-dp-noise": 2.5, "central-dp-clip": 0.3, "central-dp-delta": 1e-6, "central-dp-max-epsilon": 9}
    fixed = build_strategy("fedavg", 4, dp("server-fixed", **config))
    assert (fixed.noise_multiplier, fixed.clipping_norm) == (2.5, 0.3)
    assert (fixed.accountant.config.target_delta, fixed.accountant.config.max_epsilon) == (1e-6, 9.0)
    adaptive = build_strategy("fedprox", 4, dp("client-adaptive", **config, **{"central-dp-count-stddev": 5.0}))
    assert adaptive.clipping_norm == 0.3 and adaptive.clipped_count_stddev == 5.0
    assert adaptive.noise_multiplier == pytest.approx((2.5**-2 - 10.0**-2) ** -0.5)
    assert adaptive.strategy.proximal_mu == pytest.approx(0.01)
    assert set(CENTRAL_DP_KEYS) >= {"central-dp", "central-dp-noise", "central-dp-clip", "central-dp-delta",
                                    "central-dp-max-epsilon"}


@pytest.mark.parametrize("name", [name for name in STRATEGIES if name not in ("fedavg", "fedprox")])
def test_strategies_whose_aggregate_is_not_the_mean_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="central-dp") as error:
        build_strategy(name, 3, dp("server-fixed"))
    message = str(error.value)
    assert repr(name) in message and "fedavg or fedprox" in message and "central-dp=off" in message


@pytest.mark.parametrize(
    ("config", "key"),
    [
        (dp("server"), "central-dp"),
        (dp(1), "central-dp"),
        (dp("server-fixed", **{"central-dp-noise": 0}), "central-dp-noise"),
        (dp("server-fixed", **{"central-dp-noise": "1"}), "central-dp-noise"),
        (dp("client-fixed", **{"central-dp-clip": -1.0}), "central-dp-clip"),
        (dp("client-fixed", **{"central-dp-clip": float("inf")}), "central-dp-clip"),
        (dp("server-fixed", **{"central-dp-delta": 0}), "central-dp-delta"),
        (dp("server-fixed", **{"central-dp-delta": 1.0}), "central-dp-delta"),
        (dp("server-fixed", **{"central-dp-max-epsilon": -3}), "central-dp-max-epsilon"),
        (dp("server-fixed", **{"central-dp-max-epsilon": True}), "central-dp-max-epsilon"),
        (dp("server-adaptive", **{"central-dp-count-stddev": 0.5}), "central-dp-count-stddev"),
    ],
)
def test_bad_values_are_refused_naming_the_key(config: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"run-config {key} must"):
        build_strategy("fedavg", 3, config)


# ----------------------------------------------------------------------------------------------- clipping and noise


def test_server_side_fixed_clipping_clips_each_update_and_averages_sites_uniformly() -> None:
    strategy = build_strategy("fedavg", 3, dp("server-fixed", **{"central-dp-noise": 1e-9, "central-dp-clip": 1.0}))
    norms = {0: 0.5, 1: 2.0, 2: 8.0}
    updates = {s: update(s, n) for s, n in norms.items()}
    _, (arrays, metrics) = train_round(strategy, replies_for(updates)[::-1])
    clipped = {s: {k: v * min(1.0, 1.0 / norms[s]) for k, v in u.items()} for s, u in updates.items()}
    for key in START:
        expected = START[key] + sum(clipped[s][key] for s in NODES) / 3  # uniform: EXAMPLES are 13, 7, 29
        np.testing.assert_allclose(arrays[key].numpy(), expected, atol=1e-7)
    assert metrics["loss"] == pytest.approx((0.5 + 1.5 + 2.5) / 3)
    assert [entry["metrics"][NUM_EXAMPLES] for entry in strategy.site_metrics] == [13, 7, 29]  # the true counts


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed"])
def test_the_noise_on_the_average_has_std_z_clip_over_sites(mode: str) -> None:
    noise, clip, size = 1.5, 0.8, 300_000
    start = {"w": np.zeros(size)}
    strategy = build_strategy("fedavg", 3, dp(mode, **{"central-dp-noise": noise, "central-dp-clip": clip}))
    updates = {s: {"w": np.full(size, (s + 1) * 1e-6)} for s in NODES}  # norms 0.5e-3 to 1.6e-3: not clipped
    np.random.seed(7)
    _, (arrays, _) = train_round(strategy, replies_for(updates, start), start=start)
    drawn = arrays["w"].numpy() - 2e-6  # the uniform mean of the updates, (1 + 2 + 3) / 3 * 1e-6
    expected = noise * clip / 3
    assert drawn.std() == pytest.approx(expected, rel=0.01)  # the sample std's own spread is 0.13 % here
    assert abs(drawn.mean()) < 5 * expected / np.sqrt(size)


# ----------------------------------------------------------------------------------------------- accounting


def test_fixed_clipping_epsilon_after_r_releases_matches_rdp_of_r_gaussian_mechanisms() -> None:
    noise, delta, rounds = 1.3, 1e-5, 4
    strategy = build_strategy("fedavg", 3, dp("server-fixed", **{"central-dp-noise": noise, "central-dp-delta": delta}))
    epsilons = []
    for server_round in range(1, rounds + 1):
        train_round(strategy, replies_for({s: update(s, 0.3) for s in NODES}), server_round)
        epsilons.append(central_privacy(strategy)["epsilon"])
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == rounds  # grows with every release
    assert epsilons[-1] == pytest.approx(rdp_epsilon(noise, rounds, delta), rel=1e-9)
    opacus_epsilon, _ = get_privacy_spent(
        orders=ORDERS, rdp=compute_rdp(q=1.0, noise_multiplier=noise, steps=rounds, orders=ORDERS), delta=delta
    )
    assert epsilons[-1] == pytest.approx(opacus_epsilon, rel=1e-9)
    privacy = central_privacy(strategy)
    assert privacy["releases"] == rounds and privacy["noise-multiplier"] == noise and privacy["clip"] == DEFAULT_CLIP


@pytest.mark.parametrize("mode", ["server-adaptive", "client-adaptive"])
def test_adaptive_clipping_is_accounted_as_the_update_and_the_raw_clipped_count(mode: str) -> None:
    noise, count_stddev, rounds = 1.0, 1.2, 3
    config = dp(mode, **{"central-dp-noise": noise, "central-dp-count-stddev": count_stddev})
    strategy = build_strategy("fedavg", 3, config)
    update_share = (noise**-2 - (2 * count_stddev) ** -2) ** -0.5  # what Flower adds to the model update
    release = (update_share**-2 + count_stddev**-2) ** -0.5  # the count of raw bits has sensitivity 1
    assert strategy.release_noise_multiplier() == pytest.approx(release) and release < noise
    np.random.seed(3)
    clips = [strategy.clipping_norm]
    for server_round in range(1, rounds + 1):
        replies = replies_for({s: update(s, 5.0) for s in NODES})  # every update far above the clip
        if mode == "client-adaptive":
            replies = [clipped_by_site(reply, clips[-1]) for reply in replies]
        train_round(strategy, replies, server_round)
        clips.append(strategy.clipping_norm)
    assert central_privacy(strategy)["epsilon"] == pytest.approx(rdp_epsilon(release, rounds, 1e-5), rel=1e-9)
    assert central_privacy(strategy)["epsilon"] > rdp_epsilon(noise, rounds, 1e-5)
    assert central_privacy(strategy)["clip"] == clips[-1] and len(set(clips)) == rounds + 1  # the clip moved


def clipped_by_site(reply: Message, clip: float) -> Message:
    """What central_clipping_mod does at a site: the update clipped to ``clip``, the norm bit in the metrics."""
    arrays = {k: v.numpy() for k, v in reply.content[ARRAYS].items()}
    norm = np.sqrt(sum(float(((v - START[k]) ** 2).sum()) for k, v in arrays.items()))
    scale = min(1.0, clip / norm)
    reply.content[ARRAYS] = as_record({k: START[k] + (v - START[k]) * scale for k, v in arrays.items()})
    reply.content[METRICS][KEY_NORM_BIT] = int(scale < 1)
    return reply


@pytest.mark.parametrize("mode", ["server-fixed", "server-adaptive"])
def test_a_round_without_every_site_releases_nothing_and_spends_nothing(mode: str) -> None:
    strategy = build_strategy("fedavg", 3, dp(mode, **{"min-sites": 2}))
    train_round(strategy, replies_for({s: update(s, 0.3) for s in NODES}))
    spent = central_privacy(strategy)["epsilon"]
    replies = replies_for({s: update(s, 0.3) for s in NODES})
    replies[1] = error_reply(NODES[1])
    _, (arrays, metrics) = train_round(strategy, replies, server_round=2)
    assert arrays is None and metrics is None
    assert central_privacy(strategy)["epsilon"] == spent and central_privacy(strategy)["releases"] == 1
    assert [(f["round"], f["site_index"]) for f in strategy.failures] == [(2, 1)]
    train_round(strategy, replies_for({s: update(s, 0.3) for s in NODES}), server_round=3)
    assert central_privacy(strategy)["releases"] == 2


@pytest.mark.parametrize("mode", MODES[1:])
def test_max_epsilon_refuses_the_round_that_would_exceed_it(mode: str) -> None:
    probe = build_strategy("fedavg", 3, dp(mode))
    per_round = probe.release_noise_multiplier() if "adaptive" in mode else 1.0
    budget = (rdp_epsilon(per_round, 2, 1e-5) + rdp_epsilon(per_round, 3, 1e-5)) / 2  # room for two releases
    strategy = build_strategy("fedavg", 3, dp(mode, **{"central-dp-max-epsilon": budget}))
    for server_round in (1, 2):
        replies = replies_for({s: update(s, 0.3) for s in NODES})
        if mode == "client-adaptive":
            replies = [clipped_by_site(reply, strategy.clipping_norm) for reply in replies]
        train_round(strategy, replies, server_round)
    assert central_privacy(strategy)["epsilon"] <= budget
    with pytest.raises(PrivacyBudgetExhausted, match=r"round 3 refused.*central-dp-max-epsilon"):
        train_round(strategy, [], server_round=3)
    assert central_privacy(strategy)["releases"] == 2


# ----------------------------------------------------------------------------------------------- SiteRobust on top


@pytest.mark.parametrize("mode", MODES[1:])
def test_site_robust_sorts_records_and_counts_sites_on_a_wrapped_strategy(mode: str) -> None:
    results = []
    for seed in range(3):
        strategy = build_strategy("fedavg", 3, dp(mode, **{"min-sites": 2}))
        seen: list[tuple[int, str, int]] = []
        strategy.on_site_metrics = lambda r, phase, site, metrics, seen=seen: seen.append((r, phase, site))
        strategy.round_config = lambda r: {PRIOR_WEIGHT: 0.25 * r}
        replies = replies_for({s: update(s, 0.3) for s in NODES})
        if mode == "client-adaptive":
            replies = [clipped_by_site(reply, strategy.clipping_norm) for reply in replies]
        random.Random(seed).shuffle(replies)
        np.random.seed(0)
        messages, (arrays, _) = train_round(strategy, replies)
        assert seen == [(1, "train", 0), (1, "train", 1), (1, "train", 2)]
        assert strategy.node_sites == {NODES[s]: s for s in NODES}
        config = messages[0].content[CONFIG]
        assert config[PRIOR_WEIGHT] == 0.25
        if mode.startswith("client-"):
            assert config[CENTRAL_CLIPPING] == mode.removeprefix("client-")
            assert config[KEY_CLIPPING_NORM] == DEFAULT_CLIP
        else:
            assert CENTRAL_CLIPPING not in config and KEY_CLIPPING_NORM not in config
        results.append({k: v.numpy() for k, v in arrays.items()})
    for arrays in results[1:]:
        for key in arrays:  # same noise draws, site order fixed: bit for bit
            assert np.array_equal(arrays[key], results[0][key])

    replies = [train_reply(NODES[0], 0, START, 5), error_reply(NODES[1], reason="disk full")]  # site 2 silent
    with pytest.raises(RuntimeError, match=r"round 2 \(train\): only 1 of 3 sites.*min-sites=2.*disk full"):
        train_round(strategy, replies, server_round=2)


def test_server_side_clipping_refuses_an_unchanged_model_naming_the_site() -> None:
    strategy = build_strategy("fedavg", 3, dp("server-adaptive"))
    updates = {0: update(0, 0.5), 1: {k: np.zeros_like(v) for k, v in START.items()}, 2: update(2, 0.5)}
    with pytest.raises(RuntimeError, match=r"round 1: the update of node 57 \(site 1\) is zero"):
        train_round(strategy, replies_for(updates))


def test_client_side_wrappers_refuse_an_update_the_site_did_not_clip() -> None:
    strategy = build_strategy("fedavg", 3, dp("client-fixed", **{"central-dp-clip": 1.0}))
    replies = replies_for({s: update(s, 1.0) for s in NODES})  # exactly at the clip: accepted
    _, (arrays, _) = train_round(strategy, replies)
    assert arrays is not None
    replies = replies_for({0: update(0, 0.5), 1: update(1, 1.5), 2: update(2, 0.5)})
    with pytest.raises(RuntimeError, match=r"site 1\) has L2 norm 1\.5 > the clipping norm 1 .*central_clipping_mod"):
        train_round(strategy, replies, server_round=2)


# ----------------------------------------------------------------------------------------------- the ClientApp mod


def instruction(config: dict[str, object], kind: str = MessageType.TRAIN) -> Message:
    """A train message as a SuperNode hands it to the ClientApp: ARRAYS and CONFIG."""
    metadata = Metadata(
        run_id=1, message_id="m", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
        created_at=time.time(), ttl=3600.0, message_type=kind,
    )
    content = RecordDict({ARRAYS: as_record(START), CONFIG: ConfigRecord(config)})
    return Message(content=content, metadata=metadata)


def site_training(norm: float):
    """A ClientApp handler replying with START + an update of L2 norm ``norm`` and its metrics."""

    def train(msg: Message, context: Context) -> Message:
        arrays = {k: msg.content[ARRAYS][k].numpy() + u for k, u in update(0, norm).items()}
        metrics = MetricRecord({SITE_INDEX: 0, NUM_EXAMPLES: 10})
        return Message(RecordDict({ARRAYS: as_record(arrays), METRICS: metrics}), reply_to=msg)

    return train


def reply_update_norm(reply: Message) -> float:
    return float(np.sqrt(sum(((reply.content[ARRAYS][k].numpy() - START[k]) ** 2).sum() for k in START)))


CONTEXT = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def test_the_mod_clips_the_update_to_the_norm_the_server_sent() -> None:
    msg = instruction({CENTRAL_CLIPPING: "fixed", KEY_CLIPPING_NORM: 0.7})
    reply = central_clipping_mod(msg, CONTEXT, site_training(3.0))
    assert not reply.has_error()
    assert reply_update_norm(reply) == pytest.approx(0.7)
    direction = update(0, 1.0)
    for key in START:  # shrunk, not turned
        np.testing.assert_allclose(reply.content[ARRAYS][key].numpy(), START[key] + 0.7 * direction[key])
    small = central_clipping_mod(msg, CONTEXT, site_training(0.2))
    assert reply_update_norm(small) == pytest.approx(0.2)


@pytest.mark.parametrize(("norm", "bit"), [(3.0, 1), (0.2, 0)])
def test_the_adaptive_mod_clips_and_reports_the_norm_bit(norm: float, bit: int) -> None:
    msg = instruction({CENTRAL_CLIPPING: "adaptive", KEY_CLIPPING_NORM: 0.7})
    reply = central_clipping_mod(msg, CONTEXT, site_training(norm))
    assert reply.content[METRICS][KEY_NORM_BIT] == bit
    assert reply_update_norm(reply) == pytest.approx(min(norm, 0.7))


def test_the_mod_passes_through_without_the_key_and_refuses_an_unknown_mode() -> None:
    train = site_training(3.0)
    for msg in (instruction({}), instruction({KEY_CLIPPING_NORM: 0.7}), instruction({}, MessageType.EVALUATE)):
        reply = central_clipping_mod(msg, CONTEXT, train)
        assert reply_update_norm(reply) == pytest.approx(3.0) and KEY_NORM_BIT not in reply.content[METRICS]
    calls: list[Message] = []
    refused = central_clipping_mod(
        instruction({CENTRAL_CLIPPING: "median", KEY_CLIPPING_NORM: 0.7}), CONTEXT, lambda m, c: calls.append(m)
    )
    assert refused.has_error() and "central-clipping='median'" in refused.error.reason and calls == []


# ----------------------------------------------------------------------------------------------- Strategy.start


class SiteGrid(FakeGrid):
    """Sites behind ``central_clipping_mod``: site s trains to ``received + update(s, 2)``; ``down`` fails."""

    def __init__(self, down: set[tuple[int, int]] = frozenset()) -> None:
        super().__init__(sorted(NODES.values()))
        self.site_of = {node: site for site, node in NODES.items()}
        self.down = down
        self.configs: list[dict] = []

    def handler(self, site: int):
        def train(msg: Message, context: Context) -> Message:
            arrays = {k: msg.content[ARRAYS][k].numpy() + u for k, u in update(site, 2.0).items()}
            metrics = MetricRecord({SITE_INDEX: site, NUM_EXAMPLES: EXAMPLES[site], "loss": 1.0})
            return Message(RecordDict({ARRAYS: as_record(arrays), METRICS: metrics}), reply_to=msg)

        return train

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            node, kind = message.metadata.dst_node_id, message.metadata.message_type
            server_round, site = int(message.content[CONFIG]["server-round"]), self.site_of[node]
            if (server_round, node) in self.down:
                replies.append(Message(Error(code=1, reason="crashed"), reply_to=message))
            elif kind == MessageType.TRAIN:
                self.configs.append(dict(message.content[CONFIG]))
                replies.append(central_clipping_mod(message, CONTEXT, self.handler(site)))
            else:
                metrics = MetricRecord({SITE_INDEX: site, NUM_EXAMPLES: EXAMPLES[site], "uf1": 0.5})
                replies.append(Message(RecordDict({METRICS: metrics}), reply_to=message))
        return replies[::-1]


@pytest.mark.parametrize("mode", MODES[1:])
def test_start_runs_clipped_noised_accounted_rounds_through_the_mod(mode: str) -> None:
    strategy = build_strategy("fedavg", 3, dp(mode, **{"min-sites": 2, "central-dp-noise": 1e-6}))
    grid = SiteGrid(down={(2, NODES[1])})
    np.random.seed(5)
    epsilons: list[float | None] = []
    result = strategy.start(
        grid=grid, initial_arrays=as_record(START), num_rounds=3, timeout=1,
        evaluate_fn=lambda r, arrays: epsilons.append(central_privacy(strategy)["epsilon"]),
    )
    releases = central_privacy(strategy)["releases"]
    assert releases == 2 and epsilons[0] == 0.0 and epsilons[2] == epsilons[1] < epsilons[3]  # round 2 skipped
    failures = [(f["round"], f["phase"], f["site_index"]) for f in strategy.failures]
    assert failures == [(2, "train", 1), (2, "evaluate", 1)]
    if mode.startswith("client-"):
        assert {c[CENTRAL_CLIPPING] for c in grid.configs} == {mode.removeprefix("client-")}
    else:
        assert all(CENTRAL_CLIPPING not in c for c in grid.configs)
    # two released rounds of (uniform mean of updates clipped to the clip of that round), noise ~ 1e-6
    moved = np.sqrt(sum(float(((result.arrays[k].numpy() - START[k]) ** 2).sum()) for k in START))
    assert 0 < moved <= 2 * DEFAULT_CLIP * 1.3
