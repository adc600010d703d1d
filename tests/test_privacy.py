"""Sample-level DP at a site (``client.privacy``): the default (functorch) and ghost clipping on the whole network
equal clipping a per-clip loop, the accountant's history survives a round trip through plain lists and keeps
counting, a target epsilon fixes one noise multiplier for the whole run, and a BatchNorm model is refused with
the layer and the fix named.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import pytest
import torch
from opacus.accountants import RDPAccountant
from test_network import random_batch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.privacy import (
    HISTORY_KEYS,
    BudgetExhausted,
    PrivacyIncompatibleModel,
    PrivacyLedger,
    PrivacySettings,
    RunLength,
    epsilon_of,
    history_record,
    make_private,
    noise_for_budget,
    plan_round,
    poisson_loader,
    restore_accountant,
    validate_model,
)
from client.privacy.norm_samplers import linear_norm_sample
from client.task import add_proximal_gradient
from models import MultitaskLoss, build_model, preset
from models.config import RecognitionHeadConfig

DELTA = 1e-5


def private_sgd(model: nn.Module, samples: int, batch: int, settings: PrivacySettings, lr: float = 0.1, **options):
    """``make_private`` on SGD and a loader of ``samples`` placeholders (sample rate batch / samples)."""
    loader = DataLoader(TensorDataset(torch.zeros(samples)), batch_size=batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    options.setdefault("noise_multiplier", settings.noise_multiplier)
    return make_private(model, optimizer, loader, settings, loss_fn=MultitaskLoss(), **options)


def per_clip_gradients(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """The multitask loss's gradient for each clip on its own (a batch of one)."""
    params, loss_fn = list(model.parameters()), MultitaskLoss()
    grads = []
    for i in range(len(batch["clip"])):
        one = {name: value[i : i + 1] for name, value in batch.items()}
        loss = loss_fn(model(one["clip"], one["landmarks"], prior_weight=0.5), one)[0]
        grads.append(torch.autograd.grad(loss, params))
    return grads


def clipped_mean(grads: list[tuple[torch.Tensor, ...]], norms: torch.Tensor, max_norm: float) -> list[torch.Tensor]:
    """Each clip's gradient scaled to at most ``max_norm`` (with Opacus's 1e-6 guard), summed, over the batch."""
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return [sum(f * clip[k] for f, clip in zip(factors, grads, strict=True)) / len(grads) for k in range(len(grads[0]))]


@dataclass
class ClippingCase:
    """The whole lite network (fp64, 32 px, no dropout), a batch of 4 clips, and the per-clip loop's answer."""

    model: nn.Module
    batch: dict[str, torch.Tensor]
    norms: torch.Tensor
    max_norm: float
    expected: list[torch.Tensor]


@pytest.fixture(scope="module")
def clipping_case() -> ClippingCase:
    config = preset("lite", image_size=32, recognition=RecognitionHeadConfig(dropout=0.0))
    torch.manual_seed(0)
    model = build_model(config).double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in random_batch(config, batch=4).items()}
    batch["au_mask"][1] = False  # a clip without AU codes (SMIC): its AU term is masked
    grads = per_clip_gradients(copy.deepcopy(model), batch)
    norms = torch.stack([torch.sqrt(sum(g.square().sum() for g in clip)) for clip in grads])
    max_norm = float(norms.median())  # half the clips are clipped, half are not
    return ClippingCase(model, batch, norms, max_norm, clipped_mean(grads, norms, max_norm))


@pytest.mark.parametrize("mode", ["functorch", "ghost"])  # hooks: tests/test_network.py
def test_clipped_gradient_equals_clipping_a_per_clip_loop_on_the_whole_model(
    clipping_case: ClippingCase, mode: str
) -> None:
    case, model = clipping_case, copy.deepcopy(clipping_case.model)
    settings = PrivacySettings(
        enabled=True, noise_multiplier=0.0, max_grad_norm=case.max_norm, poisson_sampling=False, mode=mode
    )
    private = private_sgd(model, 4, 4, settings, lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # functorch fallback for CircularConv and AxisEmbedding
        output = private.model(case.batch["clip"], case.batch["landmarks"], prior_weight=0.5)
        loss, terms = private.loss(output, case.batch)
        loss.backward()
    private.optimizer.step()
    assert set(terms) == {"mer", "flow", "landmarks", "au"}
    if mode == "ghost":
        torch.testing.assert_close(private.model.per_sample_gradient_norms, case.norms, rtol=1e-9, atol=0)
    for (name, param), grad in zip(model.named_parameters(), case.expected, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-9, atol=1e-12 * grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("shape", [(5, 7), (5, 3, 7), (5, 2, 3, 4, 7)], ids=["2-D", "3-D ghost", "5-D gradient"])
def test_linear_norm_sampler_handles_any_rank(shape: tuple[int, ...]) -> None:
    # 5-D is CCC's Linear(P, P) on (B, C, T, k, P); Opacus 1.6 returns no norm for it
    gen = torch.Generator().manual_seed(1)
    layer = nn.Linear(7, 6 if len(shape) == 5 else 40).double()
    a = torch.randn(*shape, generator=gen, dtype=torch.float64)
    g = torch.randn(*shape[:-1], layer.out_features, generator=gen, dtype=torch.float64)
    norms = linear_norm_sample(layer, [a], g)
    weight = torch.einsum("n...o,n...i->noi", g, a).flatten(1).norm(dim=1)
    bias = g.reshape(shape[0], -1, layer.out_features).sum(1).norm(dim=1)
    torch.testing.assert_close(norms[layer.weight], weight)
    torch.testing.assert_close(norms[layer.bias], bias)


@pytest.mark.filterwarnings("ignore:Full backward hook")  # the toy input needs no gradient
def test_accountant_history_round_trips_and_keeps_counting_across_rounds() -> None:
    first = RDPAccountant()
    for _ in range(30):
        first.step(noise_multiplier=1.1, sample_rate=0.05)
    first.step(noise_multiplier=0.9, sample_rate=0.1)
    record = history_record(first)
    assert set(record) == set(HISTORY_KEYS)
    assert all(type(x) in (int, float) for values in record.values() for x in values)  # fits a ConfigRecord
    assert restore_accountant(record).history == first.history
    assert restore_accountant(None).history == []

    # next round: a site's optimizer steps advance the restored accountant
    model = nn.Linear(3, 1)
    settings = PrivacySettings(enabled=True, noise_multiplier=1.1, poisson_sampling=False, mode="hooks")
    private = private_sgd(model, 40, 4, settings, history=record)  # sample rate 1/10
    for _ in range(7):
        private.optimizer.zero_grad()
        private.model(torch.randn(4, 3)).square().mean().backward()
        private.optimizer.step()

    independent = RDPAccountant()
    independent.history = [(1.1, 0.05, 30), (0.9, 0.1, 1), (1.1, 0.1, 7)]
    assert private.accountant.history == independent.history
    assert private.epsilon(DELTA) == pytest.approx(independent.get_epsilon(DELTA), rel=1e-12)
    assert private.epsilon(DELTA) > first.get_epsilon(DELTA)
    with pytest.raises(ValueError, match="history-steps"):
        restore_accountant({key: record[key] for key in HISTORY_KEYS[:2]})


def test_target_epsilon_fixes_one_noise_multiplier_that_spends_the_budget_by_the_last_round() -> None:
    run = RunLength(rounds=5, local_epochs=2, steps_per_epoch=10)
    noise = noise_for_budget(3.0, DELTA, run)
    assert 3.0 - 0.01 <= epsilon_of([(noise, 0.1, 100)], DELTA) <= 3.0
    after_query = noise_for_budget(3.0, DELTA, run, spent=[(10.0, 1.0, 1)])
    assert after_query > noise  # the AU-count release took part of the budget: training gets more noise
    assert 3.0 - 0.01 <= epsilon_of([(10.0, 1.0, 1), (after_query, 0.1, 100)], DELTA) <= 3.0
    with pytest.raises(ValueError, match="already spent"):
        noise_for_budget(0.1, DELTA, run, spent=[(1.0, 1.0, 1)])

    ledger = PrivacyLedger(queries=[10.0])
    noises = [
        plan_round(ledger, run, delta=DELTA, noise_multiplier=None, target_epsilon=3.0) for _ in range(2)
    ]  # round 1, and a later round: the noise stays what round 1 fixed
    assert noises[0] == noises[1] == pytest.approx(after_query)
    ledger.training = [(after_query, 0.1, 100)]  # the whole run trained
    with pytest.raises(BudgetExhausted, match="dp-target-epsilon=3"):
        plan_round(ledger, run, delta=DELTA, noise_multiplier=None, target_epsilon=3.0)


def test_batchnorm_model_is_refused_naming_the_layer_and_the_fix() -> None:
    model = build_model(preset("lite", image_size=32, norm="batch"))
    settings = PrivacySettings(enabled=True, noise_multiplier=1.0)
    with pytest.raises(PrivacyIncompatibleModel, match=r"backbone\.stem\.layers\.\d+ \(_AnyBatchNorm\).*norm='group'"):
        private_sgd(model, 4, 4, settings)


def test_layers_opacus_refuses_are_named_by_their_path() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 1))
    with pytest.raises(PrivacyIncompatibleModel, match=r"1 \(MultiheadAttention\).*DPMultiheadAttention"):
        validate_model(model)
    validate_model(build_model(preset("lite", image_size=32)))  # the default network passes


def test_settings_need_a_budget_or_a_noise() -> None:
    with pytest.raises(ValueError, match=r"target_epsilon.*noise_multiplier"):
        PrivacySettings(enabled=True)
    PrivacySettings(enabled=True, noise_multiplier=1.0, target_epsilon=3.0)  # noise as given, training stops at 3
    with pytest.raises(ValueError, match="mode"):
        PrivacySettings(enabled=True, noise_multiplier=1.0, mode="ew")  # type: ignore[arg-type]
    assert not PrivacySettings().enabled


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_fedprox_gradient_joins_after_clipping_and_noise() -> None:
    # clipping to ~0 would erase a proximal gradient added before it: after the noise it arrives whole
    model = nn.Linear(3, 1)
    anchor = {name: p.detach() - 1.0 for name, p in model.named_parameters()}  # w - w_global = 1 everywhere
    settings = PrivacySettings(enabled=True, noise_multiplier=0.0, max_grad_norm=1e-9, poisson_sampling=False)
    private = private_sgd(
        model, 4, 4, settings, lr=0.0, after_noise=lambda: add_proximal_gradient(model, anchor, mu=0.3)
    )
    private.optimizer.zero_grad()
    private.model(torch.randn(4, 3)).square().mean().backward()
    private.optimizer.step()
    for param in model.parameters():
        torch.testing.assert_close(param.grad, torch.full_like(param, 0.3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["functorch", "ghost"])
@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_a_poisson_batch_without_clips_still_releases_noise_and_is_counted(mode: str) -> None:
    clips = [{"clip": torch.full((2,), float(i)), "label": torch.tensor(i)} for i in range(3)]
    loader = DataLoader(clips, batch_size=1)  # 3 batches an epoch: each clip joins a batch with probability 1/3
    poisson = poisson_loader(loader, 1 / 3, torch.Generator().manual_seed(0))
    batches = [batch for _epoch in range(8) for batch in poisson]  # P(empty) = (2/3)^3 per batch
    assert {} in batches and any(batch and batch["clip"].shape[1:] == (2,) for batch in batches)

    for noise, changes in ((0.0, False), (1.0, True)):
        model = nn.Linear(3, 1)
        settings = PrivacySettings(enabled=True, noise_multiplier=noise, poisson_sampling=False, mode=mode)
        private = private_sgd(model, 9, 3, settings, lr=1.0)
        before = [p.detach().clone() for p in model.parameters()]
        private.optimizer.zero_grad()
        private.empty_step()
        moved = any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
        assert moved == changes  # noise alone moves the weights; without noise an empty batch moves nothing
        assert private.accountant.history == [(noise, 1 / 3, 1)]  # and the step is counted
