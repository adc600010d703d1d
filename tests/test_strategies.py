"""Server strategies: the factory, site-ordered deterministic aggregation, failures, FED-PsyAU mixing and priors."""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, Krum, MultiKrum

from client.protocol import (
    ARRAYS,
    AU_COUNTS,
    CONFIG,
    COUNTS,
    DP_EPSILON,
    DP_EXHAUSTED,
    METRICS,
    NUM_EXAMPLES,
    PRIOR_WEIGHT,
    SAMPLES,
    SERVER_ROUND,
    SITE_INDEX,
)
from server.strategies import (
    STRATEGIES,
    Personalised,
    SiteRobust,
    build_strategy,
    cooccurrence_prior,
    decay_prior_weight,
    personalised_mix,
)

pytestmark = pytest.mark.usefixtures("task_identity")


class FakeGrid:
    """Only what sampling needs: the connected node ids."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def as_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def train_reply(node: int, site: int, arrays: dict[str, np.ndarray], examples: int, loss: float = 1.0) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    metrics = MetricRecord({SITE_INDEX: site, NUM_EXAMPLES: examples, "loss": loss})
    return Message(RecordDict({ARRAYS: as_record(arrays), METRICS: metrics}), reply_to=instruction)


def evaluate_reply(node: int, site: int, examples: int, uf1: float) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
    metrics = MetricRecord({SITE_INDEX: site, NUM_EXAMPLES: examples, "uf1": uf1})
    return Message(RecordDict({METRICS: metrics}), reply_to=instruction)


def error_reply(node: int, kind: str = MessageType.TRAIN, reason: str = "out of memory") -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type=kind)
    return Message(Error(code=3, reason=reason), reply_to=instruction)


def initial() -> ArrayRecord:
    return as_record({"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)})


def local_arrays(site: int) -> dict[str, np.ndarray]:
    generator = np.random.default_rng(site)
    return {"w": generator.normal(size=(4, 3)).astype(np.float32), "b": generator.normal(size=3).astype(np.float32)}


NODES = {0: 101, 1: 57, 2: 230}  # site -> node id: node ids do not follow the site order
EXAMPLES = {0: 13, 1: 7, 2: 29}


# ----------------------------------------------------------------------------------------------- factory


EXPECTED_CLASS = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedmedian": FedMedian,
    "krum": Krum,
    "multikrum": MultiKrum,
    "personalised": FedAvg,
}


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_name_builds_its_flower_class_requiring_every_site(name: str) -> None:
    strategy = build_strategy(name, sites=4, run_config={})
    assert isinstance(strategy, EXPECTED_CLASS[name]) and isinstance(strategy, SiteRobust)
    assert strategy.min_train_nodes == strategy.min_evaluate_nodes == strategy.min_available_nodes == 4
    assert strategy.fraction_train == strategy.fraction_evaluate == 1.0
    assert strategy.weighted_by_key == NUM_EXAMPLES
    assert strategy.min_sites == 1
    if name in ("fedavg", "personalised"):
        assert not isinstance(strategy, FedAvgM | FedProx | FedAdam | FedMedian | MultiKrum)
    if name == "multikrum":
        assert not isinstance(strategy, Krum)


def test_run_config_defaults_and_overrides() -> None:
    assert build_strategy("fedprox", 3, {}).proximal_mu == pytest.approx(0.01)
    assert build_strategy("fedprox", 3, {"proximal-mu": 0.5}).proximal_mu == pytest.approx(0.5)
    assert build_strategy("fedadam", 3, {}).eta == pytest.approx(1e-2)
    assert build_strategy("fedadam", 3, {"server-lr": 0.3}).eta == pytest.approx(0.3)
    fedavgm = build_strategy("fedavgm", 3, {})
    assert (fedavgm.server_learning_rate, fedavgm.server_momentum) == pytest.approx((1.0, 0.9))
    fedavgm = build_strategy("fedavgm", 3, {"server-lr": 2.0, "server-momentum": 0.5})
    assert (fedavgm.server_learning_rate, fedavgm.server_momentum) == pytest.approx((2.0, 0.5))
    assert build_strategy("krum", 3, {}).num_nodes_to_select == 1
    assert build_strategy("multikrum", 4, {}).num_nodes_to_select == 3
    multikrum = build_strategy("multikrum", 5, {"num-malicious-nodes": 1, "num-nodes-to-select": 2})
    assert (multikrum.num_malicious_nodes, multikrum.num_nodes_to_select) == (1, 2)
    assert build_strategy("personalised", 3, {}).mixing_alpha == pytest.approx(0.1)
    assert build_strategy("PersonaLised", 3, {"mixing-alpha": 0.4}).mixing_alpha == pytest.approx(0.4)
    assert build_strategy("fedavg", 3, {"min-sites": 2}).min_sites == 2


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'") as error:
        build_strategy("fedsgd", 3, {})
    for name in STRATEGIES:
        assert name in str(error.value)


@pytest.mark.parametrize("config", [{"min-sites": 0}, {"min-sites": 4}, {"min-sites": 1.5}, {"proximal-mu": "x"}])
def test_bad_run_config_is_refused(config: dict) -> None:
    with pytest.raises(ValueError):
        build_strategy("fedprox", 3, config)


# ----------------------------------------------------------------------------------------------- site order


def run_train_round(strategy, replies: list[Message], server_round: int = 1, nodes: list[int] | None = None):
    grid = FakeGrid(nodes if nodes is not None else sorted(NODES.values()))
    messages = list(strategy.configure_train(server_round, initial(), ConfigRecord(), grid))
    return messages, strategy.aggregate_train(server_round, replies)


def three_replies() -> list[Message]:
    return [train_reply(NODES[site], site, local_arrays(site), EXAMPLES[site], loss=site + 0.5) for site in NODES]


@pytest.mark.parametrize("name", STRATEGIES)
def test_aggregation_does_not_depend_on_reply_order(name: str) -> None:
    results = []
    for seed in range(4):
        replies = three_replies()
        random.Random(seed).shuffle(replies)
        _, (arrays, metrics) = run_train_round(build_strategy(name, 3, {}), replies)
        results.append(({k: v.numpy() for k, v in arrays.items()}, dict(metrics)))
    first_arrays, first_metrics = results[0]
    for arrays, metrics in results[1:]:
        assert arrays.keys() == first_arrays.keys()
        for key in arrays:
            assert np.array_equal(arrays[key], first_arrays[key])  # bit for bit, not approximately
        assert metrics == first_metrics
    assert SITE_INDEX not in first_metrics and "loss" in first_metrics


def test_fedavg_aggregate_is_the_weighted_mean_and_per_site_metrics_come_in_site_order() -> None:
    strategy = build_strategy("fedavg", 3, {})
    seen = []
    strategy.on_site_metrics = lambda r, phase, site, metrics: seen.append((r, phase, site, metrics["loss"]))
    _, (arrays, metrics) = run_train_round(strategy, three_replies()[::-1])
    total = sum(EXAMPLES.values())
    expected = sum(EXAMPLES[s] * local_arrays(s)["w"].astype(np.float64) for s in NODES) / total
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-5)
    assert metrics["loss"] == pytest.approx(sum(EXAMPLES[s] * (s + 0.5) for s in NODES) / total)
    assert seen == [(1, "train", 0, 0.5), (1, "train", 1, 1.5), (1, "train", 2, 2.5)]
    assert [record["site_index"] for record in strategy.site_metrics] == [0, 1, 2]
    assert strategy.node_sites == {NODES[s]: s for s in NODES}


def test_round_config_hook_sets_per_round_values() -> None:
    strategy = build_strategy("fedprox", 3, {})
    strategy.round_config = lambda r: {PRIOR_WEIGHT: decay_prior_weight(r, 3)}
    config = ConfigRecord()
    messages = list(strategy.configure_train(2, initial(), config, FakeGrid([1, 2, 3])))
    content = messages[0].content[CONFIG]
    assert content[PRIOR_WEIGHT] == pytest.approx(0.5)
    assert content[SERVER_ROUND] == 2 and content["proximal-mu"] == pytest.approx(0.01)


# ----------------------------------------------------------------------------------------------- failures


def test_error_reply_is_recorded_and_the_round_completes_with_the_others() -> None:
    strategy = build_strategy("fedavg", 3, {"min-sites": 2})
    replies = three_replies()
    replies[1] = error_reply(NODES[1])
    _, (arrays, _) = run_train_round(strategy, replies)
    weights = {0: EXAMPLES[0], 2: EXAMPLES[2]}
    expected = sum(w * local_arrays(s)["w"].astype(np.float64) for s, w in weights.items()) / sum(weights.values())
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-5)
    assert len(strategy.failures) == 1
    failure = strategy.failures[0]
    assert failure["round"] == 1 and failure["phase"] == "train" and failure["node_id"] == NODES[1]
    assert failure["site_index"] is None  # never replied successfully yet: its site is unknown
    assert "out of memory" in failure["reason"]


def test_missing_replies_are_failures_and_known_sites_are_named() -> None:
    strategy = build_strategy("fedavg", 3, {"min-sites": 2})
    run_train_round(strategy, three_replies())  # round 1: every node's site becomes known
    replies = three_replies()
    del replies[2]  # site 2's node never answers round 2
    _, (arrays, _) = run_train_round(strategy, replies, server_round=2)
    assert arrays is not None
    assert strategy.failures == [
        {"round": 2, "phase": "train", "node_id": NODES[2], "site_index": 2, "reason": "no reply (timed out or lost)"}
    ]
    grid = FakeGrid(sorted(NODES.values()))
    strategy.configure_evaluate(2, arrays, ConfigRecord(), grid)
    replies = [
        evaluate_reply(NODES[0], 0, 10, 0.5),
        error_reply(NODES[1], MessageType.EVALUATE),
        evaluate_reply(NODES[2], 2, 30, 0.9),
    ]
    evaluated = strategy.aggregate_evaluate(2, replies)
    assert evaluated["uf1"] == pytest.approx(0.8) and SITE_INDEX not in evaluated
    assert strategy.failures[-1]["phase"] == "evaluate" and strategy.failures[-1]["site_index"] == 1


def test_below_min_sites_raises_naming_the_round_and_the_failed_sites() -> None:
    strategy = build_strategy("fedmedian", 3, {"min-sites": 2})
    run_train_round(strategy, three_replies())
    replies = [three_replies()[0], error_reply(NODES[1], reason="disk full")]  # site 2 silent
    with pytest.raises(RuntimeError, match=r"round 2 \(train\): only 1 of 3 sites") as error:
        run_train_round(strategy, replies, server_round=2)
    message = str(error.value)
    assert "min-sites=2" in message and "site 1" in message and "site 2" in message and "disk full" in message
    assert len(strategy.failures) == 2


def spent_reply(node: int, site: int, epsilon: float) -> Message:
    """The reply of a site whose sample-level DP budget is spent: its spending, no arrays."""
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    metrics = MetricRecord({SITE_INDEX: site, NUM_EXAMPLES: 0, DP_EPSILON: epsilon, DP_EXHAUSTED: 1})
    return Message(RecordDict({METRICS: metrics}), reply_to=instruction)


@pytest.mark.parametrize("name", ["fedavg", "fedmedian"])
def test_a_site_with_its_dp_budget_spent_is_recorded_but_left_out_of_the_aggregate(name: str) -> None:
    strategy = build_strategy(name, 3, {"min-sites": 2})
    replies = three_replies()
    replies[1] = spent_reply(NODES[1], 1, 2.99)
    _, (arrays, _) = run_train_round(strategy, replies)
    without = three_replies()  # the same round with site 1 simply absent (fresh messages: Flower consumes them)
    without[1] = error_reply(NODES[1])
    expected = run_train_round(build_strategy(name, 3, {"min-sites": 2}), without)[1][0]
    np.testing.assert_array_equal(arrays["w"].numpy(), expected["w"].numpy())
    assert strategy.failures == []  # not a failure: the site did what its budget allows
    spent = [record for record in strategy.site_metrics if record["site_index"] == 1]
    assert spent and spent[0]["metrics"][DP_EPSILON] == 2.99  # its spending reaches the records

    alone = build_strategy(name, 3, {"min-sites": 2})
    replies[2] = spent_reply(NODES[2], 2, 3.0)
    with pytest.raises(RuntimeError, match=r"only 1 of 3 sites.*site 1: its dp-target-epsilon is spent"):
        run_train_round(alone, replies)


def test_duplicate_site_indices_are_a_configuration_error() -> None:
    strategy = build_strategy("fedavg", 3, {})
    replies = three_replies()
    replies[2] = train_reply(NODES[2], 0, local_arrays(2), 5)
    with pytest.raises(RuntimeError, match="site indices"):
        run_train_round(strategy, replies)


# ----------------------------------------------------------------------------------------------- personalised


def test_personalised_mixing_follows_the_formula_for_three_sites() -> None:
    alpha = 0.25
    theta = {
        0: np.array([1.0, 2.0, -4.0]),
        1: np.array([3.0, 4.0, 8.0]),
        2: np.array([5.0, 6.0, 0.5]),
    }
    weights = {0: 1, 1: 2, 2: 3}
    strategy = build_strategy("personalised", 3, {"mixing-alpha": alpha})
    assert isinstance(strategy, Personalised)
    nodes = {0: 30, 1: 10, 2: 20}
    replies = [train_reply(nodes[s], s, {"w": theta[s]}, weights[s]) for s in (2, 0, 1)]
    grid = FakeGrid(sorted(nodes.values()))
    first = list(strategy.configure_train(1, as_record({"w": np.zeros(3)}), ConfigRecord(), grid))
    assert all(np.array_equal(m.content[ARRAYS]["w"].numpy(), np.zeros(3)) for m in first)  # round 1: initial

    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), (1 * theta[0] + 2 * theta[1] + 3 * theta[2]) / 6)
    expected = {
        0: (1 - alpha) * theta[0] + alpha * (2 * theta[1] + 3 * theta[2]) / 5,
        1: (1 - alpha) * theta[1] + alpha * (1 * theta[0] + 3 * theta[2]) / 4,
        2: (1 - alpha) * theta[2] + alpha * (1 * theta[0] + 2 * theta[1]) / 3,
    }
    for site, value in expected.items():
        np.testing.assert_allclose(strategy.personal[site]["w"].numpy(), value)

    grid.node_ids.append(99)  # a node that never replied gets the global arrays
    strategy.min_available_nodes = strategy.min_train_nodes = strategy.min_evaluate_nodes = 4
    for kind, configure in (("train", strategy.configure_train), ("evaluate", strategy.configure_evaluate)):
        messages = {m.metadata.dst_node_id: m for m in configure(2, arrays, ConfigRecord(), grid)}
        assert {m.metadata.message_type for m in messages.values()} == {kind}
        for site, node in nodes.items():
            np.testing.assert_allclose(messages[node].content[ARRAYS]["w"].numpy(), expected[site])
        np.testing.assert_allclose(messages[99].content[ARRAYS]["w"].numpy(), arrays["w"].numpy())
        assert messages[99].content[CONFIG][SERVER_ROUND] == 2


def test_personalised_mix_keeps_dtypes_and_a_lone_site() -> None:
    local = {
        0: {"w": np.array([1.0, 3.0], np.float32), "steps": np.array(10, np.int64)},
        1: {"w": np.array([3.0, 5.0], np.float32), "steps": np.array(20, np.int64)},
    }
    mixed = personalised_mix(local, {0: 1, 1: 1}, alpha=0.5)
    assert mixed[0]["w"].dtype == np.float32 and mixed[0]["steps"].dtype == np.int64
    np.testing.assert_allclose(mixed[0]["w"], [2.0, 4.0])
    assert int(mixed[1]["steps"]) == 15
    alone = personalised_mix({3: local[0]}, {3: 5}, alpha=0.5)
    np.testing.assert_array_equal(alone[3]["w"], local[0]["w"])
    with pytest.raises(ValueError, match="mixing-alpha"):
        personalised_mix(local, {0: 1, 1: 1}, alpha=1.5)


# ----------------------------------------------------------------------------------------------- FED-PsyAU helpers


def test_prior_weight_decays_linearly_from_start_to_zero() -> None:
    assert [decay_prior_weight(r, 5) for r in range(1, 6)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert decay_prior_weight(1, 1) == 1.0
    assert decay_prior_weight(2, 3, start=0.5) == pytest.approx(0.25)
    for bad in ((0, 3), (4, 3), (1, 0)):
        with pytest.raises(ValueError):
            decay_prior_weight(*bad)


def counts_reply(node: int, counts: np.ndarray) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
    record = MetricRecord({COUNTS: [int(c) for c in counts.flatten()], SAMPLES: 1})
    return Message(RecordDict({AU_COUNTS: record}), reply_to=instruction)


def test_cooccurrence_prior_sums_sites_and_row_normalises() -> None:
    a = np.zeros((12, 12), np.int64)
    a[0, 0], a[0, 1], a[1, 0], a[1, 1] = 2, 1, 1, 3
    b = np.zeros((12, 12), np.int64)
    b[0, 0], b[0, 2], b[2, 0], b[2, 2] = 2, 2, 2, 2
    prior = np.array(cooccurrence_prior([counts_reply(1, a), error_reply(2, MessageType.QUERY), list(b.flatten())]))
    assert prior.shape == (144,)
    matrix = prior.reshape(12, 12)
    total = (a + b).astype(float)
    np.testing.assert_allclose(matrix[:3], total[:3] / total[:3].sum(axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(matrix[3:], np.eye(12)[3:])  # AUs never seen: identity rows
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="144"):
        cooccurrence_prior([[1, 2, 3]])
    with pytest.raises(ValueError, match="no site"):
        cooccurrence_prior([error_reply(2, MessageType.QUERY)])


# ----------------------------------------------------------------------------------------------- Strategy.start


class ClientGrid(FakeGrid):
    """Answers like sites would: site s trains to ``arrays + s + 1``; ``down`` lists (round, node) that fail."""

    def __init__(self, nodes: dict[int, int], down: set[tuple[int, int]]) -> None:
        super().__init__(sorted(nodes.values()))
        self.site_of = {node: site for site, node in nodes.items()}
        self.down = down
        self.received: list[tuple[int, int, str, float]] = []  # (round, node, type, first value of "w")

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            node, config = message.metadata.dst_node_id, message.content[CONFIG]
            server_round, kind = int(config[SERVER_ROUND]), message.metadata.message_type
            w = message.content[ARRAYS]["w"].numpy()
            self.received.append((server_round, node, kind, float(w.flat[0])))
            if (server_round, node) in self.down:
                replies.append(Message(Error(code=1, reason="crashed"), reply_to=message))
                continue
            site = self.site_of[node]
            metrics = {SITE_INDEX: site, NUM_EXAMPLES: EXAMPLES[site]}
            if kind == MessageType.TRAIN:
                content = {ARRAYS: as_record({"w": w + site + 1}), METRICS: MetricRecord({**metrics, "loss": 1.0})}
            else:
                content = {METRICS: MetricRecord({**metrics, "uf1": 0.1 * (site + 1)})}
            replies.append(Message(RecordDict(content), reply_to=message))
        random.Random(len(self.received)).shuffle(replies)
        return replies


@pytest.mark.parametrize("name", ["fedavg", "personalised"])
def test_start_runs_rounds_records_failures_and_returns_the_global_model(name: str) -> None:
    strategy = build_strategy(name, 3, {"min-sites": 2, "mixing-alpha": 0.5})
    grid = ClientGrid(NODES, down={(2, NODES[1])})
    result = strategy.start(grid=grid, initial_arrays=as_record({"w": np.zeros(2)}), num_rounds=2, timeout=1)
    total = sum(EXAMPLES.values())
    round1 = sum(EXAMPLES[s] * (s + 1) for s in NODES) / total  # weighted mean of theta_j = 0 + s + 1
    assert sorted(result.train_metrics_clientapp) == [1, 2] and sorted(result.evaluate_metrics_clientapp) == [1, 2]
    failures = [(f["round"], f["phase"], f["site_index"]) for f in strategy.failures]
    assert failures == [(2, "train", 1), (2, "evaluate", 1)]
    sent = {(r, node, kind): w for r, node, kind, w in grid.received}
    if name == "fedavg":
        ok = (0, 2)
        round2 = sum(EXAMPLES[s] * (round1 + s + 1) for s in ok) / sum(EXAMPLES[s] for s in ok)
        assert [sent[(2, node, MessageType.TRAIN)] for node in NODES.values()] == pytest.approx([round1] * 3)
    else:
        mixed = personalised_mix({s: {"w": np.full(2, s + 1.0)} for s in NODES}, EXAMPLES, 0.5)
        for site, node in NODES.items():
            assert sent[(1, node, MessageType.EVALUATE)] == pytest.approx(mixed[site]["w"][0])
            assert sent[(2, node, MessageType.TRAIN)] == pytest.approx(mixed[site]["w"][0])
        round2 = sum(EXAMPLES[s] * (mixed[s]["w"][0] + s + 1) for s in (0, 2)) / (EXAMPLES[0] + EXAMPLES[2])
    np.testing.assert_allclose(result.arrays["w"].numpy(), round2)
