"""Sample-level DP at a site, through the ClientApp's handlers on the tiny synthetic federation: cumulative epsilon
equal to an independent RDP computation, the budget spent by the last round and then refused, per-site overrides,
the noised AU counts and their cost, and an inspection of everything a site sends."""

from __future__ import annotations

import logging
import math
import pickle

import pytest
import torch
from conftest import TinySites
from flwr.app import ArrayRecord, Context, Message
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from test_client_app import context, message, only_metrics, state_of, two_site_config

from client import protocol as p
from client.client_app import evaluate, query, train
from client.privacy import QUERY_CLIP, default_delta, noised_cooccurrence
from client.privacy.statistics import clip_contributions
from client.site import RunSettings, SiteSpec, SplitSettings, load_data, num_classes, privacy_settings
from models import build_model
from models.au_graph import cooccurrence_counts
from partitions.errors import DataError

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus's default RDP orders


@pytest.fixture(scope="module")
def dp_config(tiny_sites: TinySites) -> dict:
    """CASME II and SMIC of the tiny federation with DP on (noise given, budget open), noise and Poisson batches
    drawn from the run seed so that every run of the suite trains on the same batches."""
    dp = {"dp": True, "dp-noise-multiplier": 1.3, "dp-max-grad-norm": 1.0, "dp-query-noise": 8.0}
    dp["dp-seeded-noise"] = True
    return {**two_site_config(tiny_sites), "num-server-rounds": 3, **dp}


@pytest.fixture(scope="module")
def initial(dp_config: dict) -> ArrayRecord:
    torch.manual_seed(123)
    model = build_model(RunSettings.from_config(dp_config).model_config(num_classes("casme2")))
    return ArrayRecord(torch_state_dict=model.state_dict())


def independent_epsilon(releases: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon from Opacus's RDP analysis directly (not its accountant class): RDP adds up over releases."""
    rdp = sum(compute_rdp(q=q, noise_multiplier=sigma, steps=n, orders=ORDERS) for sigma, q, n in releases)
    return get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)[0]


def train_round(node: Context, arrays: ArrayRecord, server_round: int) -> Message:
    return train(message("train", arrays, server_round=server_round, local_epochs=1), node)


def test_epsilon_after_each_round_equals_an_independent_rdp_computation(dp_config: dict, initial: ArrayRecord) -> None:
    node = context(dp_config)
    query(message("query"), node)  # the noised AU counts: one Gaussian release at sample rate 1
    spec = SiteSpec.from_config(node.node_config, node.run_config)
    train_clips = len(load_data(spec, SplitSettings.of(RunSettings.from_config(dp_config))).train)
    steps_per_epoch = math.ceil(train_clips / dp_config["batch-size"])
    delta = default_delta(train_clips)

    arrays, epsilons = initial, []
    for server_round in (1, 2, 3):
        reply = train_round(node, arrays, server_round)
        metrics = only_metrics(reply)
        arrays = reply.content[p.ARRAYS]
        steps = server_round * steps_per_epoch
        expected = independent_epsilon([(8.0, 1.0, 1), (1.3, 1 / steps_per_epoch, steps)], delta)
        assert metrics[p.DP_EPSILON] == pytest.approx(expected, rel=1e-9)
        assert metrics[p.DP_STEPS] == steps and metrics[p.DP_EXHAUSTED] == 0
        assert metrics[p.DP_NOISE_MULTIPLIER] == 1.3 and metrics[p.DP_DELTA] == delta
        assert metrics[p.DP_SAMPLE_RATE] == pytest.approx(1 / steps_per_epoch)
        epsilons.append(metrics[p.DP_EPSILON])
    assert epsilons[0] < epsilons[1] < epsilons[2]  # cumulative over the run, not one round's
    ledger = state_of(node).load_ledger()
    assert ledger.queries == [8.0] and ledger.steps == 3 * steps_per_epoch


def test_target_epsilon_is_spent_by_the_last_round_then_the_site_stops_and_says_so(
    dp_config: dict, initial: ArrayRecord, caplog: pytest.LogCaptureFixture
) -> None:
    node = context({**dp_config, "dp-noise-multiplier": "", "dp-target-epsilon": 3.0, "num-server-rounds": 2})
    query(message("query"), node)
    first = only_metrics(train_round(node, initial, 1))
    second = only_metrics(train_round(node, initial, 2))
    assert first[p.DP_EPSILON] < second[p.DP_EPSILON] <= 3.0
    assert second[p.DP_EPSILON] >= 3.0 - 0.05  # the noise was chosen to spend the budget over both rounds
    assert first[p.DP_NOISE_MULTIPLIER] == second[p.DP_NOISE_MULTIPLIER] > 0

    with caplog.at_level(logging.WARNING, logger="fedmer.client"):
        third = train_round(node, initial, 3)  # a round more than the run planned
    assert not third.has_error() and p.ARRAYS not in third.content
    metrics = only_metrics(third)
    assert metrics[p.DP_EXHAUSTED] == 1 and metrics[p.NUM_EXAMPLES] == 0
    assert metrics[p.DP_EPSILON] == pytest.approx(second[p.DP_EPSILON])  # nothing more was spent
    assert set(metrics) == {p.NUM_EXAMPLES, p.SITE_INDEX, *p.DP_METRIC_KEYS}
    assert any("privacy budget exhausted" in record.getMessage() for record in caplog.records)


def test_a_site_overrides_the_federation_dp_settings_in_its_node_config(dp_config: dict) -> None:
    run = {**dp_config, "dp-target-epsilon": 8.0}
    settings = privacy_settings({"partition-id": 0}, run)
    assert settings.enabled and settings.target_epsilon == 8.0 and settings.noise_multiplier == 1.3
    stricter = privacy_settings({"dataset": "casme2", "dp-target-epsilon": 1.0, "dp-mode": "hooks"}, run)
    assert stricter.target_epsilon == 1.0 and stricter.mode == "hooks"
    assert not privacy_settings({"dp": "false"}, run).enabled
    with pytest.raises(DataError, match=r"dp-mode='fast'.*functorch"):
        privacy_settings({}, {**run, "dp-mode": "fast"})
    with pytest.raises(DataError, match=r"dp=.*yes/no"):
        privacy_settings({}, {**run, "dp": "perhaps"})
    with pytest.raises(DataError, match="dp-target-epsilon and/or dp-noise-multiplier"):
        privacy_settings({}, {**run, "dp-noise-multiplier": "", "dp-target-epsilon": ""})
    with pytest.raises(DataError, match="max_grad_norm"):
        privacy_settings({}, {**run, "dp-max-grad-norm": 0})


def test_noised_au_counts_are_a_valid_count_matrix_and_exact_without_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    targets = (torch.rand(40, 12, generator=generator) < 0.2).float()
    targets[0] = 1.0  # one clip codes all 12 AUs: its contribution is scaled down to the clip norm
    pairs, scale = clip_contributions(targets)
    upper = torch.triu(torch.ones(12, 12, dtype=torch.bool))
    norms = (pairs[:, upper].square().sum(1) + scale.square()).sqrt()
    assert norms.max() <= QUERY_CLIP + 1e-9 and norms[0] == pytest.approx(QUERY_CLIP)

    few = targets[1:][targets[1:].sum(1) <= 4]  # clips with at most 4 AUs pass unscaled: tiny noise gives the counts
    counts, samples = noised_cooccurrence(few, 1e-9, generator)
    assert torch.equal(counts, cooccurrence_counts(few)) and samples == len(few)

    noised, _ = noised_cooccurrence(targets, 2.0, generator)
    assert torch.equal(noised, noised.T) and (noised >= 0).all()
    assert (noised <= noised.diagonal()[:, None]).all()  # a pair is never counted more often than either AU
    assert not torch.equal(noised, cooccurrence_counts(targets))


def test_only_shared_arrays_whitelisted_metrics_and_aggregates_leave_a_dp_site(
    dp_config: dict, initial: ArrayRecord
) -> None:
    config = {**dp_config, "local-params": "flow_head"}
    node = context(config)
    replies = {
        "query": query(message("query"), node),
        "train": train_round(node, initial, 1),
        "evaluate": evaluate(message("evaluate", initial, server_round=1), node),
    }
    spec = SiteSpec.from_config(node.node_config, node.run_config)
    data = load_data(spec, SplitSettings.of(RunSettings.from_config(config)))
    model_keys = set(build_model(RunSettings.from_config(config).model_config(data.num_classes)).state_dict())
    shared = {key for key in model_keys if not key.startswith("flow_head.")}
    allowed = {
        "query": {p.AU_COUNTS: set(p.QUERY_METRIC_KEYS)},
        "train": {p.METRICS: {p.NUM_EXAMPLES, *p.TRAIN_METRIC_KEYS}},
        "evaluate": {p.METRICS: {p.NUM_EXAMPLES, *p.EVALUATE_METRIC_KEYS}},
    }
    classes = data.num_classes
    aggregate_lengths = {classes, classes * classes, 144}  # class recall, confusion matrix, AU co-occurrence
    samples = data.site.samples
    private_strings = {text for s in samples for text in (s.subject, s.clip_id, s.key, str(s.frames[0]))}
    private_strings = {text for text in private_strings if len(text) >= 4}  # shorter ones match bytes by chance
    private_strings |= {str(spec.root), str(spec.cache)}
    for kind, reply in replies.items():
        content = reply.content
        assert not content.config_records, kind
        assert set(content.array_records) == ({p.ARRAYS} if kind == "train" else set()), kind
        if kind == "train":
            assert set(content[p.ARRAYS]) == shared  # no local part, nothing that is not a model parameter
        assert {name: set(record) for name, record in content.metric_records.items()} == allowed[kind], kind
        for record in content.metric_records.values():
            for key, value in record.items():
                assert isinstance(value, int | float | list), (kind, key)
                if isinstance(value, list):
                    assert len(value) in aggregate_lengths, (kind, key, len(value))
        blob = pickle.dumps(content)
        leaked = sorted(text for text in private_strings if text and text.encode() in blob)
        assert not leaked, (kind, leaked)


def test_dp_noise_is_secret_unless_seeded_noise_is_asked_for(dp_config: dict, initial: ArrayRecord) -> None:
    # the server knows the run seed: noise drawn from it could be subtracted, so by default it is not
    def twice(config: dict) -> list[dict[str, torch.Tensor]]:
        return [dict(train_round(context(config), initial, 1).content[p.ARRAYS].to_torch_state_dict()) for _ in "ab"]

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(a[key], b[key]) for key in a)

    secret = {**dp_config, "dp-seeded-noise": False}
    assert not same(*twice(secret))
    assert same(*twice(dp_config))
    counts = [query(message("query"), context(secret)).content[p.AU_COUNTS][p.COUNTS] for _ in "ab"]
    assert counts[0] != counts[1]
