"""A site's state on disk (client.state) through the ClientApp's handlers: a SuperNode restarted within a run
(a fresh Context, empty ``state``, the same run) continues its privacy ledger where it stopped, a spent budget
stays spent after any number of restarts, local parameters survive, and a state file that is corrupt or from
another run or site is refused, never replaced by a fresh ledger."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import TinySites
from flwr.app import ArrayRecord, Context, Message
from test_client_app import context, message, only_metrics, state_of, two_site_config

import client.client_app as client_app
from client import protocol as p
from client.client_app import query, train
from client.site import RunSettings, num_classes
from client.state import SiteStateError
from client.task import TrainOutcome
from models import build_model

BUDGET = {"dp": True, "dp-max-grad-norm": 1.0, "dp-query-noise": 8.0, "dp-seeded-noise": True}


@pytest.fixture(scope="module")
def dp_run(tiny_sites: TinySites) -> dict:
    """DP at the site with a target epsilon of 3 over 3 rounds, the noise planned to spend it."""
    return {**two_site_config(tiny_sites), **BUDGET, "dp-target-epsilon": 3.0, "num-server-rounds": 3}


@pytest.fixture(scope="module")
def initial(dp_run: dict) -> ArrayRecord:
    torch.manual_seed(123)
    model = build_model(RunSettings.from_config(dp_run).model_config(num_classes("casme2")))
    return ArrayRecord(torch_state_dict=model.state_dict())


def train_round(node: Context, arrays: ArrayRecord, server_round: int, **config: object) -> Message:
    return train(message("train", arrays, server_round=server_round, local_epochs=1, **config), node)


def restarted(node: Context) -> Context:
    """The same site after its SuperNode restarted: Flower's in-memory state is gone, the run is the same."""
    return context(node.run_config, run_id=node.run_id, node_config=dict(node.node_config))


def epsilons(replies: list[Message]) -> list[float]:
    return [only_metrics(reply)[p.DP_EPSILON] for reply in replies]


# ----------------------------------------------------------------------------------------------- the ledger


def test_a_site_restarted_mid_run_continues_its_epsilon_where_it_stopped(dp_run: dict, initial: ArrayRecord) -> None:
    steady = context(dp_run)
    query(message("query"), steady)
    uninterrupted = [train_round(steady, initial, r) for r in (1, 2, 3)]

    node = context(dp_run)
    query(message("query"), node)
    first = train_round(node, initial, 1)
    node = restarted(node)  # killed after round 1's training
    second = train_round(node, initial, 2)
    node = restarted(node)
    third = train_round(node, initial, 3)

    assert epsilons([first, second, third]) == pytest.approx(epsilons(uninterrupted), rel=1e-12)
    spent = epsilons(uninterrupted)
    assert spent[0] < spent[1] < spent[2] <= 3.0  # cumulative over the run
    assert spent[2] >= 3.0 - 0.05  # the noise was planned to spend the budget by the last round
    noise = {only_metrics(reply)[p.DP_NOISE_MULTIPLIER] for reply in [first, second, third, *uninterrupted]}
    assert len(noise) == 1  # the noise planned at round 1 (after the query) is kept, not re-planned
    ledger = state_of(node).load_ledger()
    assert ledger.queries == [8.0] and ledger.steps == only_metrics(third)[p.DP_STEPS]


@pytest.mark.parametrize("noise", ["", 2.0], ids=["planned noise", "fixed noise 2.0"])
def test_a_spent_budget_stays_spent_after_any_number_of_restarts(
    dp_run: dict, initial: ArrayRecord, noise: object
) -> None:
    node = context({**dp_run, "dp-noise-multiplier": noise, "num-server-rounds": 2})
    query(message("query"), node)
    replies = [train_round(node, initial, 1), train_round(node, initial, 2)]
    spent = only_metrics(replies[-1])[p.DP_EPSILON]
    server_round = 3
    while only_metrics(replies[-1])[p.DP_EXHAUSTED] == 0:  # fixed noise: rounds until the target is reached
        replies.append(train_round(node, initial, server_round))
        server_round += 1
        assert server_round < 20, "the budget was never spent"
    spent = max(epsilons(replies))
    assert spent <= 3.0

    for _ in range(3):
        node = restarted(node)
        reply = train_round(node, initial, server_round)
        metrics = only_metrics(reply)
        assert metrics[p.DP_EXHAUSTED] == 1 and p.ARRAYS not in reply.content and metrics[p.NUM_EXAMPLES] == 0
        assert metrics[p.DP_EPSILON] == pytest.approx(spent, rel=1e-12)  # nothing more was spent
        server_round += 1


def test_the_server_run_key_names_the_ledger_so_a_resumed_run_keeps_it(dp_run: dict, initial: ArrayRecord) -> None:
    """Under ``flwr run`` a resumed run is a new Flower run: the server's run key, not Flower's id, joins them."""
    node = context(dp_run)
    query(message("query", run_key="study-7"), node)
    before = train_round(node, initial, 1, run_key="study-7")
    resumed = context(dp_run)  # another Flower run id
    after = train_round(resumed, initial, 2, run_key="study-7")
    fresh = train_round(context(dp_run), initial, 1, run_key="study-8")

    assert epsilons([after])[0] > epsilons([before])[0]
    assert epsilons([fresh])[0] < epsilons([before])[0]  # no query in study-8, one round: less spent
    (folder,) = {state_of(node).folder}
    assert sorted(path.name for path in folder.glob("study-*")) == ["study-7.json", "study-8.json"]


# ----------------------------------------------------------------------------------------------- refusals


def ledger_file(node: Context, initial: ArrayRecord):
    """A site with one round trained: its ledger file."""
    query(message("query"), node)
    train_round(node, initial, 1)
    path = state_of(node).ledger_path
    assert path.exists()
    return path


@pytest.mark.parametrize(
    "damage, refusal",
    [
        (lambda text: text[: len(text) // 2], "cannot be read"),
        (lambda text: "", "cannot be read"),
        (lambda text: json.dumps({**json.loads(text), "run-key": "flower-run-999999"}), "belongs to run"),
        (lambda text: json.dumps({**json.loads(text), "site": {"index": 1, "dataset": "smic"}}), "belongs to site"),
        (lambda text: json.dumps({**json.loads(text), "ledger": {"rdp-noise": "loud"}}), "holds no valid ledger"),
        (lambda text: json.dumps([1, 2]), "is not a fedmer-site-state/1 file"),
    ],
    ids=["truncated", "empty", "another run", "another site", "bad ledger", "not a state file"],
)
def test_a_damaged_or_foreign_state_file_is_refused_and_left_as_it_was(
    dp_run: dict, initial: ArrayRecord, damage, refusal: str
) -> None:
    node = context(dp_run)
    path = ledger_file(node, initial)
    path.write_text(damage(path.read_text()))
    damaged = path.read_bytes()
    for handler in (lambda n: train_round(n, initial, 2), lambda n: query(message("query"), n)):
        with pytest.raises(SiteStateError, match=refusal) as refused:
            handler(restarted(node))
        text = str(refused.value)
        assert path.name in text and "state-path" in text and "from zero" in text
        assert str(path.parent) not in text  # the folder stays in the site's own log
    assert path.read_bytes() == damaged  # never overwritten by a fresh ledger


def test_a_write_that_fails_midway_leaves_the_previous_ledger(
    dp_run: dict, initial: ArrayRecord, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = context(dp_run)
    path = ledger_file(node, initial)
    before, steps = path.read_bytes(), state_of(node).load_ledger().steps

    def crash(source: object, target: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        train_round(restarted(node), initial, 2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not [entry for entry in path.parent.iterdir() if entry.name.endswith(".tmp")]  # no half file left
    assert state_of(node).load_ledger().steps == steps > 0


# ----------------------------------------------------------------------------------------------- local parameters


def test_local_parameters_survive_a_restart(
    tiny_sites: TinySites, initial: ArrayRecord, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = context(two_site_config(tiny_sites), **{"local-params": "flow_head"})
    reply = train_round(node, initial, 1)
    stored = state_of(node).load_local()
    assert stored and all(name.startswith("flow_head.") for name in stored)

    seen: dict[str, torch.Tensor] = {}

    def record_start(model, dataset, classes, options, on_epoch, privacy) -> TrainOutcome:
        seen.update({k: v.clone() for k, v in model.state_dict().items()})
        return TrainOutcome(dict.fromkeys(("loss", "mer", "flow", "landmarks", "au"), 0.0), 0.0, 0.0, len(dataset))

    monkeypatch.setattr(client_app, "train_local", record_start)
    train_round(restarted(node), reply.content[p.ARRAYS], 2)
    assert all(torch.equal(seen[name], value) for name, value in stored.items())  # the site's own, not the sent
    assert any(not torch.equal(seen[name], torch.from_numpy(initial[name].numpy())) for name in stored)
