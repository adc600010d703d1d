"""Sample-level differential privacy for one site's local training (DP-SGD through Opacus, no Flower here).

``make_private`` wraps the model, optimizer and loader the way ``opacus.PrivacyEngine.make_private`` does, but
assembles the pieces itself: ghost clipping needs :class:`GhostClippingModule` (Opacus's engine accepts only its
own module classes), and the accountant must continue the site's history from earlier rounds rather than start
at zero. The clip is the privacy unit: every layer with weights sees clips as its batch items.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.grad_sample import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping, DPTensorFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import Tensor, nn
from torch.utils.data import DataLoader

from models.losses import MultitaskLoss
from models.network import ModelOutput

from .accountant import HistoryRecord, history_record, restore_accountant
from .norm_samplers import GhostClippingModule
from .validators import validate_model

Mode = Literal["ghost", "hooks", "functorch"]
MODES: tuple[str, ...] = ("functorch", "hooks", "ghost")
"""Per-sample gradient modes, all exact on the whole lite model. On CPU (benchmarks/results/dp_step_cpu.json)
``functorch`` (the default) and ``hooks`` cost about 1.7-2.3x a plain step, ``functorch`` with the least memory
(about plain + 5% against + 50%); ``ghost`` was the slowest (2.6-3.0x): this network's cost is in convolutions,
whose per-sample gradients every mode materialises, so ghost clipping only adds its second backward pass."""

Batch = dict[str, Tensor]
Loss = Tensor | DPTensorFastGradientClipping


@dataclass(frozen=True)
class PrivacySettings:
    """One site's DP settings.

    ``target_epsilon`` is the site's budget for the whole run. Without ``noise_multiplier`` the training noise is
    chosen once to spend it by the last round; with both, the noise is as given and training stops when the
    next round would exceed the budget; with ``noise_multiplier`` alone there is no budget (epsilon is only
    reported). ``delta`` None: :func:`default_delta` of the site's training clips. ``query_noise`` is the noise
    multiplier of the AU-count release (:mod:`client.privacy.statistics`). The noise and the Poisson batches
    are drawn from the operating system's entropy: whoever knows a seed (the server knows the run seed) could
    subtract seeded noise. ``seeded_noise`` draws them from the run seed instead, for reproducible experiments
    on synthetic data only.
    """

    enabled: bool = False
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    delta: float | None = None
    poisson_sampling: bool = True  # what the accountant assumes; off only approximates the guarantee
    mode: Mode = "functorch"
    query_noise: float = 10.0
    seeded_noise: bool = False  # True: noise and Poisson batches from the run seed (reproducible, NOT private)

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("differential privacy needs a target_epsilon (budget) or a noise_multiplier, or both")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier={self.noise_multiplier}: must be at least 0")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError(f"target_epsilon={self.target_epsilon}: must be positive")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm}: must be positive")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta={self.delta}: must lie in (0, 1), well below 1 / (clips at the site)")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: choose one of {', '.join(MODES)}")
        if self.query_noise <= 0:
            raise ValueError(f"query_noise={self.query_noise}: must be positive")


def noise_generator(settings: PrivacySettings, seed: int, device: str = "cpu") -> torch.Generator:
    """The generator of a DP mechanism's randomness: from ``seed`` only with ``settings.seeded_noise``."""
    generator = torch.Generator(device=device)
    if settings.seeded_noise:
        generator.manual_seed(seed)
    else:
        generator.seed()  # a non-deterministic seed from the operating system
    return generator


def default_delta(examples: int) -> float:
    """delta well below 1 / n, as DP needs (a mechanism releasing one of n records at random has delta 1 / n):
    ``min(1e-5, 1 / (10 n))``."""
    return min(1e-5, 1.0 / (10 * max(examples, 1)))


class PerSampleLoss(nn.Module):
    """:class:`MultitaskLoss` in the form Opacus's ghost-clipping wrapper calls: it sets ``reduction = "none"``
    to get one loss per clip. Keeps the last call's detached terms for reporting."""

    def __init__(self, loss_fn: MultitaskLoss) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.reduction = "mean"
        self.terms: dict[str, float] = {}

    def forward(self, output: ModelOutput, batch: Batch) -> Tensor:
        per_sample, self.terms = self.loss_fn.per_sample(output, batch)
        return per_sample if self.reduction == "none" else per_sample.mean()


@dataclass
class PrivateTraining:
    """What a site trains with under DP: call ``model`` as the network, get the loss from :meth:`loss`, then
    ``loss.backward()`` and ``optimizer.step()`` (which clips, adds noise and advances ``accountant``)."""

    model: AbstractGradSampleModule
    optimizer: DPOptimizer
    loader: DataLoader
    accountant: RDPAccountant
    noise_multiplier: float
    settings: PrivacySettings
    loss_fn: MultitaskLoss
    _ghost: DPLossFastGradientClipping | None = field(default=None, repr=False)

    def loss(self, output: ModelOutput, batch: Batch) -> tuple[Loss, dict[str, float]]:
        """(loss to call ``backward`` on, detached mean terms); ``float(loss.detach())`` is the batch mean."""
        if self._ghost is None:
            return self.loss_fn(output, batch)
        loss = self._ghost(output, batch)
        return loss, self._ghost.criterion.terms

    def epsilon(self, delta: float) -> float:
        """Epsilon of the DP-SGD steps so far at ``delta``, over every round the restored history covers."""
        return self.accountant.get_epsilon(delta)

    def history(self) -> HistoryRecord:
        """The accountant's state as plain lists, for the next round (see :mod:`client.privacy.accountant`)."""
        return history_record(self.accountant)

    def empty_step(self) -> None:
        """The step of a Poisson batch that drew no clip: no forward pass (a batch of none has nothing to run),
        but the step still releases noise and the accountant counts it, as DP-SGD's analysis assumes."""
        for param in self.optimizer.params:
            if self._ghost is not None:
                param.grad = torch.zeros_like(param)
            else:
                param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
        self.optimizer.step()

    def release(self) -> nn.Module:
        """The plain network (hooks removed, per-sample attributes cleared), e.g. to send its weights."""
        return self.model.to_standard_module()


def wrap_model(model: nn.Module, settings: PrivacySettings) -> AbstractGradSampleModule:
    """The per-sample gradient wrapper for ``settings.mode`` (mean loss reduction, batch first)."""
    if settings.mode == "ghost":
        return GhostClippingModule(model, loss_reduction="mean", max_grad_norm=settings.max_grad_norm)
    return GradSampleModule(model, loss_reduction="mean", force_functorch=settings.mode == "functorch")


def poisson_loader(loader: DataLoader, sample_rate: float, generator: torch.Generator | None) -> DataLoader:
    """``loader``'s dataset in Poisson batches: each clip joins each batch with probability ``sample_rate``, as
    many batches per epoch as ``loader`` has. An empty batch comes as ``{}`` (see
    :meth:`PrivateTraining.empty_step`): Opacus's own ``DPDataLoader`` builds empty batches from the first
    sample's entries and fails on samples that are dicts."""
    sampler = UniformWithReplacementSampler(
        num_samples=len(loader.dataset), sample_rate=sample_rate, generator=generator
    )
    collate = loader.collate_fn

    def collate_or_empty(items: list) -> Any:
        return collate(items) if items else {}

    return DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=collate_or_empty, num_workers=0)


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    settings: PrivacySettings,
    *,
    loss_fn: MultitaskLoss,
    noise_multiplier: float,
    history: Mapping[str, Sequence[float] | Sequence[int]] | None = None,
    generator: torch.Generator | None = None,
    after_noise: Callable[[], None] | None = None,
) -> PrivateTraining:
    """DP-SGD for one round at a site, at ``noise_multiplier`` (the run's, see :func:`client.privacy.plan_round`).

    ``history`` is the DP-SGD accountant state from earlier rounds (:meth:`PrivateTraining.history`).
    ``generator`` seeds both the noise and the Poisson batches. ``after_noise`` runs at every step once the
    gradients are clipped, noised and averaged, before the optimizer moves: the place for data-independent terms
    such as FedProx's proximal gradient, which must not be clipped with the data's. PrivacyIncompatibleModel
    names any layer DP cannot train."""
    if not settings.enabled:
        raise ValueError("make_private called with privacy disabled; train the plain model instead")
    model.train()
    validate_model(model)
    sample_rate = 1.0 / len(loader)
    accountant = restore_accountant(history)
    module = wrap_model(model, settings)
    if settings.poisson_sampling:
        module.forbid_grad_accumulation()
        loader = poisson_loader(loader, sample_rate, generator)
    dp_optimizer = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=settings.mode)(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        expected_batch_size=int(len(loader.dataset) * sample_rate),
        loss_reduction="mean",
        generator=generator,
    )
    account = accountant.get_optimizer_hook_fn(sample_rate=sample_rate)

    def step_hook(dp: DPOptimizer) -> None:
        account(dp)
        if after_noise is not None:
            after_noise()

    dp_optimizer.attach_step_hook(step_hook)
    ghost = (
        DPLossFastGradientClipping(module, dp_optimizer, PerSampleLoss(loss_fn), loss_reduction="mean")
        if settings.mode == "ghost"
        else None
    )
    return PrivateTraining(module, dp_optimizer, loader, accountant, noise_multiplier, settings, loss_fn, ghost)
