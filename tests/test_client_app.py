"""The site's ClientApp on a tiny synthetic federation (CASME II with AU codes, SMIC without), handlers called
directly with hand-built Messages and Contexts, as a SuperNode would call them."""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinySites
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from torch import nn
from torch.utils.data import Dataset

import client.client_app as client_app
import client.task as client_task
from client import protocol as p
from client.client_app import evaluate, query, site_state, train
from client.site import RunSettings, SiteSpec, SplitSettings, load_data, num_classes
from client.state import SiteState
from client.task import TrainOutcome
from models import build_model
from partitions.action_units import AU_NODES
from partitions.errors import DataError

SITES = ("casme2", "smic")


def two_site_config(tiny_sites: TinySites) -> dict:
    """The run config that maps partitions 0 and 1 to two prepared sites of the session's tiny federation."""
    return {
        "sites": ",".join(SITES),
        "data-root": str(tiny_sites.data_root),
        "cache-root": str(tiny_sites.cache),
        "preset": "lite",
        "batch-size": 2,
        "seed": 0,
    }


@pytest.fixture(scope="module")
def run_config(tiny_sites: TinySites) -> dict:
    return two_site_config(tiny_sites)


@pytest.fixture(scope="module")
def initial(run_config: dict) -> ArrayRecord:
    """What a server would send in round 1: the whole network, initialised with another seed than the sites'."""
    torch.manual_seed(123)
    model = build_model(RunSettings.from_config(run_config).model_config(num_classes("casme2")))
    return ArrayRecord(torch_state_dict=model.state_dict())


def message(kind: str, arrays: ArrayRecord | None = None, **config: int | float | str | list[float]) -> Message:
    """A server instruction as the SuperNode hands it to the app (config keys use protocol names)."""
    names = {key: key.replace("_", "-") for key in config}
    known = {p.SERVER_ROUND, p.LOCAL_EPOCHS, p.LR, p.PROXIMAL_MU, p.PRIOR_WEIGHT, p.COOCCURRENCE, p.RUN_KEY}
    assert set(names.values()) <= known
    content = RecordDict({p.CONFIG: ConfigRecord({names[key]: value for key, value in config.items()})})
    if arrays is not None:
        content[p.ARRAYS] = arrays
    metadata = Metadata(
        run_id=1,
        message_id="m",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return Message(content=content, metadata=metadata)


RUN_IDS = itertools.count(1)
"""Every fresh context is a run of its own: the sites' state files (client.state) are per run, and the tests
share the tiny federation's cache."""


def context(
    run_config: dict, partition: int = 0, node_config: dict | None = None, run_id: int | None = None, **run: object
) -> Context:
    """A fresh node context: a simulated node (partition id) unless a node config is given; a new run unless
    ``run_id`` names one (a SuperNode restarted within a run: empty ``state``, the same run)."""
    nodes = node_config if node_config is not None else {"partition-id": partition, "num-partitions": 2}
    run_id = next(RUN_IDS) if run_id is None else run_id
    return Context(run_id=run_id, node_id=7, node_config=nodes, state=RecordDict(), run_config={**run_config, **run})


def state_of(node: Context) -> SiteState:
    """The node's state files, as its handlers find them for a message without a server run key."""
    return site_state(message("train"), node, SiteSpec.from_config(node.node_config, node.run_config))


def only_metrics(reply: Message) -> dict:
    (record,) = reply.content.metric_records.values()
    return dict(record)


def tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def distance(a: ArrayRecord, b: ArrayRecord) -> float:
    """Euclidean distance over the float arrays both records share."""
    ta, tb = tensors(a), tensors(b)
    shared = [k for k in ta if k in tb and ta[k].is_floating_point()]
    return float(sum((ta[k].double() - tb[k].double()).pow(2).sum() for k in shared)) ** 0.5


@pytest.fixture(scope="module")
def plain_reply(run_config: dict, initial: ArrayRecord) -> Message:
    """Round 1 on CASME II with FedAvg (mu 0), reused by the FedProx and reproducibility tests."""
    return train(message("train", initial, server_round=1, local_epochs=1, proximal_mu=0.0), context(run_config))


# ----------------------------------------------------------------------------------------------- train


def test_train_replies_shared_arrays_and_contract_metrics_and_keeps_local_params(
    run_config: dict, initial: ArrayRecord, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    node = context(run_config, **{"local-params": "flow_head", "batch-size": 8})
    with caplog.at_level(logging.INFO, logger="fedmer.client"):
        reply = train(message("train", initial, server_round=1, local_epochs=1), node)

    assert len(reply.content.array_records) == 1 and len(reply.content.metric_records) == 1
    metrics = only_metrics(reply)
    assert set(metrics) == {p.NUM_EXAMPLES, *p.TRAIN_METRIC_KEYS}
    assert metrics[p.SITE_INDEX] == 0 and metrics[p.NUM_EXAMPLES] > 0
    arrays = reply.content.array_records[p.ARRAYS]
    assert metrics["bytes-sent"] == arrays.count_bytes()
    sent = tensors(initial)
    assert set(arrays) == {k for k in sent if not k.startswith("flow_head.")}
    assert any(not torch.equal(v, sent[k]) for k, v in tensors(arrays).items())
    epoch_lines = [r for r in caplog.records if "epoch 1/1" in r.getMessage()]
    assert len(epoch_lines) == 1

    stored = state_of(node).load_local()
    assert stored and set(stored) == {k for k in sent if k.startswith("flow_head.")}
    assert any(not torch.equal(v, sent[k]) for k, v in stored.items())  # trained, not the sent values

    seen: dict[str, torch.Tensor] = {}

    def record_start(
        model: nn.Module, dataset: Dataset, classes: int, options: object, on_epoch: object, privacy: object
    ) -> TrainOutcome:
        seen.update({k: v.clone() for k, v in model.state_dict().items()})
        return TrainOutcome(dict.fromkeys(("loss", "mer", "flow", "landmarks", "au"), 0.0), 0.0, 0.0, len(dataset))

    monkeypatch.setattr(client_app, "train_local", record_start)
    second = train(message("train", arrays, server_round=2, local_epochs=1), node)
    for name, value in stored.items():  # round 2 starts from this site's own flow head, not a fresh one
        assert torch.equal(seen[name], value)
    for name, value in tensors(arrays).items():
        assert torch.equal(seen[name], value.to(seen[name].dtype))
    assert not any(k.startswith("flow_head.") for k in second.content.array_records[p.ARRAYS])


def test_fedprox_keeps_the_trained_weights_closer_to_the_global_ones(run_config: dict, initial: ArrayRecord) -> None:
    steady = {"lr-schedule": "constant"}  # a warm-up's first steps are too small to tell the two apart
    plain = train(
        message("train", initial, server_round=1, local_epochs=1, proximal_mu=0.0), context(run_config, **steady)
    )
    prox = train(
        message("train", initial, server_round=1, local_epochs=1, proximal_mu=1e4), context(run_config, **steady)
    )
    far = distance(plain.content.array_records[p.ARRAYS], initial)
    near = distance(prox.content.array_records[p.ARRAYS], initial)
    assert 0 < near < 0.5 * far


def test_the_same_message_gives_the_same_metrics_and_arrays(
    run_config: dict, initial: ArrayRecord, plain_reply: Message
) -> None:
    again = train(message("train", initial, server_round=1, local_epochs=1, proximal_mu=0.0), context(run_config))
    first, second = only_metrics(plain_reply), only_metrics(again)
    first.pop("train-seconds"), second.pop("train-seconds")
    assert first == second
    a, b = tensors(plain_reply.content.array_records[p.ARRAYS]), tensors(again.content.array_records[p.ARRAYS])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- evaluate


def test_evaluate_gives_every_key_on_both_sites_and_zero_au_f1_without_au_codes(
    run_config: dict, initial: ArrayRecord
) -> None:
    replies = [evaluate(message("evaluate", initial, server_round=1), context(run_config, i)) for i in range(2)]
    casme2, smic = (only_metrics(r) for r in replies)
    for index, metrics in enumerate((casme2, smic)):
        assert set(metrics) == {p.NUM_EXAMPLES, *p.EVALUATE_METRIC_KEYS}
        assert metrics[p.SITE_INDEX] == index and metrics[p.NUM_EXAMPLES] > 0
        assert len(metrics["class-recall"]) == 3 and all(0.0 <= r <= 1.0 for r in metrics["class-recall"])
        assert 0.0 <= metrics["uf1"] <= 1.0 and metrics["epe"] > 0 and metrics["nme"] > 0
        confusion = np.array(metrics["confusion"]).reshape(3, 3)  # row = true class, flattened row-major
        assert confusion.sum() == metrics[p.NUM_EXAMPLES]
        assert np.trace(confusion) / confusion.sum() == pytest.approx(metrics["accuracy"])
    assert smic["au-f1"] == 0.0


# ----------------------------------------------------------------------------------------------- query


def test_query_counts_au_cooccurrence_over_the_training_split(run_config: dict) -> None:
    casme2 = query(message("query"), context(run_config, 0)).content
    smic = client_app.app(message("query"), context(run_config, 1)).content  # through the app's dispatch
    (key,) = casme2.metric_records
    assert key == p.AU_COUNTS
    assert set(casme2[p.AU_COUNTS]) == set(smic[p.AU_COUNTS]) == set(p.QUERY_METRIC_KEYS)
    assert casme2[p.AU_COUNTS][p.SITE_INDEX] == 0 and smic[p.AU_COUNTS][p.SITE_INDEX] == 1
    counts = np.array(casme2[p.AU_COUNTS][p.COUNTS]).reshape(12, 12)

    settings = RunSettings.from_config(run_config)
    spec = SiteSpec.from_config({"partition-id": 0}, run_config)
    data = load_data(spec, SplitSettings.of(settings))
    coded = [{u.number for u in s.action_units} for s in data.train.samples]
    expected = np.array([[sum(a in c and b in c for c in coded) for b in AU_NODES] for a in AU_NODES])
    assert np.array_equal(counts, counts.T) and np.array_equal(counts, expected) and counts.trace() > 0
    assert casme2[p.AU_COUNTS][p.SAMPLES] == len(data.train) < len(data.site.samples)  # test subjects left out

    assert smic[p.AU_COUNTS][p.COUNTS] == [0] * 144 and smic[p.AU_COUNTS][p.SAMPLES] == 0


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_sites_stop_with_one_clear_error(run_config: dict, tmp_path: Path) -> None:
    casme2 = str(Path(run_config["data-root"]) / "casme2")
    cases = [
        ({"dataset": "casme9", "data-path": casme2}, {}, ["casme9", "site 0", "casme2, samm"]),
        ({"dataset": "casme2", "data-path": str(tmp_path / "nowhere")}, {}, ["nowhere", "does not exist", "data-path"]),
        ({"partition-id": 2, "num-partitions": 3}, {}, ["site 2", "partition-id 2", "sites"]),
        ({"partition-id": 0}, {"labels": "samm-5"}, ["site 0 (casme2", "samm-5"]),
        ({"partition-id": 0}, {"cache-root": str(tmp_path / "empty")}, ["site 0 (casme2", "fedmer prepare"]),
    ]
    for node_config, run, words in cases:
        with pytest.raises(DataError) as error:
            train(message("train", server_round=1), context(run_config, node_config=node_config, **run))
        for word in words:
            assert word in str(error.value), (word, str(error.value))


class Stop(Exception):
    """Raised by a stub once it has seen what it was called with."""


def test_the_run_config_chooses_the_training_precision(run_config: dict, monkeypatch) -> None:
    chosen = []

    def record(model, data, classes, options, **kwargs):
        chosen.append(options)
        raise Stop

    monkeypatch.setattr(client_app, "train_local", record)
    with pytest.raises(Stop):
        train(message("train", server_round=1), context(run_config, precision="bf16"))
    assert chosen[0].precision == "bf16"
    with pytest.raises(DataError, match="precision='fp16'"):
        train(message("train", server_round=1), context(run_config, precision="fp16"))


def test_a_round_trains_on_its_part_of_the_run_schedule(run_config: dict, monkeypatch) -> None:
    """Round 2 of 2 (one local epoch, cosine, no warm-up) steps at the second half of the run's curve."""
    rates: list[float] = []
    step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    recipe = {"lr-schedule": "cosine", "warmup-epochs": 0.0, "num-server-rounds": 2, "batch-size": 2}
    node = context(run_config, **recipe)
    _, _, data = client_app._site(node)
    steps = -(-len(data.train) // 2)
    train(message("train", server_round=2, local_epochs=1, lr=0.002), node)
    expected = [0.002 * 0.5 * (1 + np.cos(np.pi * (1 + i / steps) / 2)) for i in range(steps)]
    assert rates == pytest.approx(expected)


def test_class_balance_weights_the_sites_own_classes_but_not_under_dp(run_config: dict, monkeypatch) -> None:
    weights: list[torch.Tensor | None] = []

    def record(loss_weights, class_weights=None, **options):
        weights.append(class_weights)
        raise Stop

    monkeypatch.setattr(client_task, "MultitaskLoss", record)
    node = context(run_config, **{"class-balance": True})
    with pytest.raises(Stop):
        train(message("train", server_round=1), node)
    _, _, data = client_app._site(node)
    counts = torch.bincount(torch.tensor(data.train.targets), minlength=len(weights[0])).float()
    present = counts > 0
    assert present.sum() >= 2
    products = weights[0][present] * counts[present]
    assert torch.allclose(products, products[0].expand_as(products))  # weight x count is one constant: 1 / frequency
    with pytest.raises(Stop):
        private = {"class-balance": True, "dp": True, "dp-noise-multiplier": 1.0}
        train(message("train", server_round=1), context(run_config, **private))
    assert weights[1] is None
