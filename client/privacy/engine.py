"""Sample-level differential privacy for one site's local training (DP-SGD through Opacus, no Flower here).

``make_private`` wraps the model, optimizer and loader the way ``opacus.PrivacyEngine.make_private`` does, but
assembles the pieces itself: ghost clipping needs :class:`GhostClippingModule` (Opacus's engine accepts only its
own module classes), and the accountant must continue the site's history from earlier rounds rather than start
at zero. The clip is the privacy unit: every layer with weights sees clips as its batch items.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping, DPTensorFastGradientClipping
from torch import Tensor, nn
from torch.utils.data import DataLoader

from models.losses import MultitaskLoss
from models.network import ModelOutput

from .accountant import HistoryRecord, RunLength, history_record, noise_for_budget, restore_accountant
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
    """One site's DP-SGD settings: either a fixed ``noise_multiplier`` or a ``target_epsilon`` for the whole run."""

    enabled: bool = False
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    poisson_sampling: bool = True  # what the accountant assumes; off only approximates the guarantee
    mode: Mode = "functorch"

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("differential privacy needs exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier={self.noise_multiplier}: must be at least 0")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError(f"target_epsilon={self.target_epsilon}: must be positive")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm}: must be positive")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta={self.delta}: must lie in (0, 1), well below 1 / (samples at the site)")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: choose one of {', '.join(MODES)}")

    def noise(self, run: RunLength) -> float:
        """The noise multiplier: as given, or the one that spends ``target_epsilon`` by the end of the run."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        assert self.target_epsilon is not None
        return noise_for_budget(self.target_epsilon, self.delta, run)


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

    def epsilon(self) -> float:
        """Epsilon spent so far at the settings' delta, over every round the restored history covers."""
        return self.accountant.get_epsilon(self.settings.delta)

    def history(self) -> HistoryRecord:
        """The accountant's state as plain lists, for the next round (see :mod:`client.privacy.accountant`)."""
        return history_record(self.accountant)

    def release(self) -> nn.Module:
        """The plain network (hooks removed, per-sample attributes cleared), e.g. to send its weights."""
        return self.model.to_standard_module()


def wrap_model(model: nn.Module, settings: PrivacySettings) -> AbstractGradSampleModule:
    """The per-sample gradient wrapper for ``settings.mode`` (mean loss reduction, batch first)."""
    if settings.mode == "ghost":
        return GhostClippingModule(model, loss_reduction="mean", max_grad_norm=settings.max_grad_norm)
    return GradSampleModule(model, loss_reduction="mean", force_functorch=settings.mode == "functorch")


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    settings: PrivacySettings,
    *,
    loss_fn: MultitaskLoss,
    rounds: int = 1,
    local_epochs: int = 1,
    history: Mapping[str, Sequence[float] | Sequence[int]] | None = None,
    noise_generator: torch.Generator | None = None,
) -> PrivateTraining:
    """DP-SGD for one round at a site. ``history`` is the accountant state from earlier rounds
    (:meth:`PrivateTraining.history`); ``rounds`` x ``local_epochs`` is the whole run, which fixes the noise
    when ``settings.target_epsilon`` is given. PrivacyIncompatibleModel names any layer DP cannot train."""
    if not settings.enabled:
        raise ValueError("make_private called with privacy disabled; train the plain model instead")
    model.train()
    validate_model(model)
    run = RunLength(rounds, local_epochs, len(loader))
    noise = settings.noise(run)
    accountant = restore_accountant(history)
    module = wrap_model(model, settings)
    if settings.poisson_sampling:
        module.forbid_grad_accumulation()
        loader = DPDataLoader.from_data_loader(loader)
    dp_optimizer = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=settings.mode)(
        optimizer,
        noise_multiplier=noise,
        max_grad_norm=settings.max_grad_norm,
        expected_batch_size=int(len(loader.dataset) * run.sample_rate),
        loss_reduction="mean",
        generator=noise_generator,
    )
    dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=run.sample_rate))
    ghost = (
        DPLossFastGradientClipping(module, dp_optimizer, PerSampleLoss(loss_fn), loss_reduction="mean")
        if settings.mode == "ghost"
        else None
    )
    return PrivateTraining(module, dp_optimizer, loader, accountant, noise, settings, loss_fn, ghost)
