"""One site's local work on plain torch objects: shared/local parameter split, training, evaluation, AU counts.

No Flower types here, so the ClientApp stays a thin translation layer and all of this runs in plain tests.
Training minimises :class:`models.MultitaskLoss` plus, for FedProx, ``(mu / 2) * ||w - w_global||^2`` over the
shared trainable parameters (Li et al., MLSys 2020), added at every step. Every random draw (weight init aside,
dropout, shuffling, augmentation) is seeded by the caller, so one config gives one result on CPU.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from client import protocol
from client.precision import autocast_dtype
from client.privacy import (
    HistoryRecord,
    PrivacyLedger,
    PrivacySettings,
    make_private,
    noise_generator,
    noised_cooccurrence,
)
from client.schedule import LearningRateSchedule, ScheduledSteps
from client.training import Predictions, predict, scores, train_epoch
from models import F5CNet, LossWeights, MultitaskLoss
from models.au_graph import N_AUS, cooccurrence_counts
from models.losses import balanced_class_weights
from partitions.action_units import au_target
from partitions.records import Sample

LOSS_TERMS = ("loss", "mer", "flow", "landmarks", "au")
"""Loss terms a training round reports (the weighted total first); a head that is off reports 0."""


# ----------------------------------------------------------------------------------------------- parameters


def is_local(name: str, prefixes: Iterable[str]) -> bool:
    """Whether a state-dict entry stays on the site: its name is a prefix or lies under one (``flow_head``)."""
    return any(name == p or name.startswith(p.rstrip(".") + ".") for p in prefixes)


def check_prefixes(model: nn.Module, prefixes: Sequence[str]) -> None:
    """ValueError for a local-params prefix that matches nothing (a typo would silently share everything)."""
    names = list(model.state_dict())
    unmatched = [p for p in prefixes if not any(is_local(n, [p]) for n in names)]
    if unmatched:
        tops = sorted({n.split(".")[0] for n in names})
        raise ValueError(
            f"local-params {','.join(unmatched)} match no parameter of the model; "
            f"use dotted prefixes of parameter names such as {', '.join(tops)}"
        )


def split_state(state: Mapping[str, Tensor], prefixes: Sequence[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A state dict -> (shared entries, local entries), each in the state dict's order."""
    shared = {k: v for k, v in state.items() if not is_local(k, prefixes)}
    local = {k: v for k, v in state.items() if is_local(k, prefixes)}
    return shared, local


def load_arrays(model: nn.Module, *parts: Mapping[str, Tensor]) -> None:
    """Load the given entries over the model's own (later parts win); ValueError for names the model lacks.

    Entries absent from every part keep their current values, so a reply that carries only shared
    parameters leaves the local ones alone. Integer buffers that arrive as floats (FedAvg) are cast back.
    """
    own = model.state_dict()
    merged = {name: value for part in parts for name, value in part.items()}
    unknown = sorted(set(merged) - set(own))
    if unknown:
        raise ValueError(
            f"{len(unknown)} received arrays are not in this model (first: {unknown[0]}); the server "
            "and the site must build the same preset, ccc-graph and label space"
        )
    model.load_state_dict({name: value.to(own[name].dtype) for name, value in merged.items()}, strict=False)


def set_au_prior(model: F5CNet, cooccurrence: Sequence[float]) -> None:
    """Install the federation's AU co-occurrence prior (144 floats, row-major) when the model has the AU head."""
    if model.au_head is not None:
        model.au_head.set_cooccurrence(torch.tensor(list(cooccurrence), dtype=torch.float64).reshape(N_AUS, N_AUS))


def shared_trainable(model: nn.Module, prefixes: Sequence[str]) -> dict[str, Tensor]:
    """Detached copies of the shared trainable parameters: FedProx's anchor w_global."""
    return {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if p.requires_grad and not is_local(name, prefixes)
    }


def proximal_term(model: nn.Module, anchor: Mapping[str, Tensor]) -> Tensor:
    """``||w - w_global||^2`` over the anchor's parameters (the caller scales by mu / 2)."""
    parameters = dict(model.named_parameters())
    return sum((parameters[name] - value).pow(2).sum() for name, value in anchor.items())


@torch.no_grad()
def add_proximal_gradient(model: nn.Module, anchor: Mapping[str, Tensor], mu: float) -> None:
    """Add the gradient of ``(mu / 2) ||w - w_global||^2``, ``mu (w - w_global)``, to the parameters' gradients:
    under DP this happens after clipping and noise, since the term does not touch the data."""
    parameters = dict(model.named_parameters())
    for name, value in anchor.items():
        parameter = parameters[name]
        if parameter.grad is not None:
            parameter.grad.add_(parameter - value, alpha=mu)


# ----------------------------------------------------------------------------------------------- seeding


def seeded_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """A single-process loader whose order comes from its own generator, not the global RNG."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)


# ----------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class LocalTraining:
    """How one round of local training runs; ``seed`` is already mixed with site and round by the caller."""

    epochs: int = 1
    lr: float = 3e-4  # the schedule's peak
    lr_schedule: str = "constant"  # or "cosine" (client.schedule), over ``total_epochs``
    warmup_epochs: float = 0.0
    total_epochs: int | None = None  # the whole run's epochs (rounds x epochs); None: this call's ``epochs``
    weight_decay: float = 0.0  # AdamW's decoupled decay
    balance_classes: bool = False  # CE weighted by inverse class frequency of this training set (not under DP)
    label_smoothing: float = 0.0
    mu: float = 0.0
    prior_weight: float = 0.0
    batch_size: int = 8
    seed: int = 0
    first_epoch: int = 0  # augmentation epoch of the first local epoch, so rounds see different augmentations
    local_params: tuple[str, ...] = ()
    weights: LossWeights = field(default_factory=LossWeights)
    device: str = "cpu"
    precision: str = "fp32"  # or "bf16": autocast where the device computes bf16 natively (client.precision)
    server_round: int = 1  # for progress lines only

    @property
    def schedule(self) -> LearningRateSchedule:
        """The run's learning-rate curve, of which this call trains epochs ``first_epoch`` onwards."""
        total = self.total_epochs if self.total_epochs is not None else self.first_epoch + self.epochs
        return LearningRateSchedule(self.lr, self.lr_schedule, self.warmup_epochs, total)


@dataclass(frozen=True)
class PrivateRound:
    """DP-SGD for one round: the site's settings, the run's noise and the accountant history of earlier rounds."""

    settings: PrivacySettings
    noise_multiplier: float
    history: HistoryRecord | None = None


@dataclass(frozen=True)
class TrainOutcome:
    """The last local epoch's mean loss terms and train UF1 (on augmented clips, in train mode); under DP also
    the accountant history including this round."""

    terms: dict[str, float]
    train_uf1: float
    seconds: float
    examples: int
    privacy_history: HistoryRecord | None = None


EpochCallback = Callable[[int, dict[str, float]], None]


def train_local(
    model: F5CNet,
    dataset: Dataset,
    num_classes: int,
    options: LocalTraining,
    on_epoch: EpochCallback | None = None,
    privacy: PrivateRound | None = None,
) -> TrainOutcome:
    """Train ``model`` in place for ``options.epochs`` epochs with AdamW (fresh each round) on the options' learning
    rate schedule, and FedProx if mu > 0; with ``privacy``, by DP-SGD on Poisson batches (Opacus), the proximal
    gradient added after the noise.

    ``balance_classes`` weights the CE by the inverse class frequency of ``dataset`` (its ``targets``). Not under
    DP: the weights are a function of every clip's label outside the clipped, noised gradient, so the privacy
    guarantee would not cover them; a private round trains unweighted.
    """
    torch.manual_seed(options.seed)
    model.to(options.device)
    anchor = shared_trainable(model, options.local_params) if options.mu > 0 else {}
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=options.lr, weight_decay=options.weight_decay
    )
    balanced = options.balance_classes and privacy is None
    loss_fn = MultitaskLoss(
        options.weights,
        class_weights=balanced_class_weights(class_targets(dataset), num_classes) if balanced else None,
        label_smoothing=options.label_smoothing,
    )
    loader = seeded_loader(dataset, options.batch_size, shuffle=True, seed=options.seed)
    if privacy is None:
        penalty = (lambda: options.mu / 2 * proximal_term(model, anchor)) if anchor else None
        dtype = autocast_dtype(options.precision, options.device)
        return _train_epochs(
            model, loader, optimizer, loss_fn, dataset, num_classes, options, on_epoch, penalty, precision=dtype
        )
    private = make_private(
        model,
        optimizer,
        loader,
        privacy.settings,
        loss_fn=loss_fn,
        noise_multiplier=privacy.noise_multiplier,
        history=privacy.history,
        generator=noise_generator(privacy.settings, options.seed, options.device),
        after_noise=(lambda: add_proximal_gradient(model, anchor, options.mu)) if anchor else None,
    )
    try:
        with warnings.catch_warnings():
            # Opacus's hooks on the first layer, whose input (the clip) needs no gradient, and functorch's autocast
            # probe on CPU: both harmless, and once per step they would bury the progress lines
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            warnings.filterwarnings("ignore", message="In CPU autocast")
            outcome = _train_epochs(
                private.model,
                private.loader,
                private.optimizer,
                private.loss,
                dataset,
                num_classes,
                options,
                on_epoch,
                empty_step=private.empty_step,
            )
    finally:
        private.release()  # the plain network again: hooks off, per-sample gradients dropped
    return replace(outcome, privacy_history=private.history())


def _train_epochs(
    forward: nn.Module,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., tuple[Any, dict[str, float]]],
    dataset: Dataset,
    num_classes: int,
    options: LocalTraining,
    on_epoch: EpochCallback | None,
    penalty: Callable[[], Tensor] | None = None,
    empty_step: Callable[[], None] | None = None,
    precision: torch.dtype | None = None,
) -> TrainOutcome:
    """The epoch loop shared by plain and DP training (``forward``: the model or its per-sample wrapper). DP
    trains in fp32: Opacus's per-sample gradients and noise are not set up for autocast."""
    start = time.perf_counter()
    terms, uf1 = dict.fromkeys(LOSS_TERMS, 0.0), 0.0
    rates = ScheduledSteps(optimizer, options.schedule, _steps_per_epoch(loader), options.first_epoch)
    for epoch in range(options.epochs):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(options.first_epoch + epoch)
        rates.start_epoch(options.first_epoch + epoch)
        predictions = Predictions()
        means = train_epoch(
            forward,
            loader,
            optimizer,
            loss_fn,
            options.prior_weight,
            options.device,
            on_step=lambda _: rates.advance(),
            penalty=penalty,
            predictions=predictions,
            empty_step=_then(empty_step, rates.advance) if empty_step is not None else None,
            precision=precision,
        )
        terms = {name: means.get(name, 0.0) for name in LOSS_TERMS}  # every site reports every key
        uf1 = scores(predictions, num_classes)["uf1"]
        if on_epoch is not None:
            on_epoch(epoch, {**terms, "train_uf1": uf1})
    return TrainOutcome(terms, uf1, time.perf_counter() - start, len(dataset))


def _steps_per_epoch(loader: Iterable[Any]) -> int:
    """Optimiser steps in one epoch: the loader's length (a Poisson loader's expected number of batches)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return 1


def _then(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        first()
        second()

    return both


def class_targets(dataset: Dataset) -> list[int]:
    """Every clip's class in a training set: a ``ClipDataset`` (or anything with ``targets``) or a torch
    ``ConcatDataset`` of them."""
    if hasattr(dataset, "targets"):
        return [int(t) for t in dataset.targets]
    if hasattr(dataset, "datasets"):
        return [t for part in dataset.datasets for t in class_targets(part)]
    raise TypeError(f"{type(dataset).__name__} has no class targets: give a ClipDataset or a ConcatDataset of them")


# ----------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Evaluation:
    """Per-video scores on a held-out split; a missing head or target scores 0.0 so every site has every value.

    ``confusion`` is the CxC confusion matrix (row = true class, column = predicted) flattened row-major: the
    additive statistic from which the server pools UF1 / UAR over all sites' clips.
    """

    uf1: float
    uar: float
    accuracy: float
    class_recall: list[float]
    confusion: list[int]
    epe: float
    nme: float
    au_f1: float
    examples: int
    seconds: float = 0.0  # prediction and scoring time: the site's evaluate compute, for the federation overhead


def evaluate_local(
    model: F5CNet, dataset: Dataset, num_classes: int, batch_size: int = 8, device: str = "cpu", seed: int = 0
) -> Evaluation:
    """Predict every clip of ``dataset`` (no augmentation, the model's own landmarks) and score it."""
    torch.manual_seed(seed)
    model.to(device)
    start = time.perf_counter()
    predictions = predict(model, seeded_loader(dataset, batch_size, shuffle=False, seed=seed), device)
    result = scores(predictions, num_classes)
    confusion = (
        confusion_matrix(predictions.labels, predictions.predicted, labels=list(range(num_classes)))
        if predictions.labels
        else np.zeros((num_classes, num_classes), dtype=np.int64)
    )
    support = confusion.sum(axis=1)
    recall = np.divide(np.diag(confusion), support, out=np.zeros(num_classes), where=support > 0)
    return Evaluation(
        uf1=result["uf1"],
        uar=result["uar"],
        accuracy=result["accuracy"],
        class_recall=[float(r) for r in recall],
        confusion=[int(v) for v in confusion.flatten()],
        epe=result.get("flow_epe", 0.0),
        nme=result.get("landmark_nme", 0.0),
        au_f1=result.get("au_f1", 0.0),
        examples=len(predictions.labels),
        seconds=time.perf_counter() - start,
    )


# ----------------------------------------------------------------------------------------------- AU statistics


def au_cooccurrence(
    samples: Sequence[Sample], privacy: PrivacySettings | None = None, seed: int = 0
) -> tuple[Tensor, int]:
    """(12, 12) co-occurrence counts over the samples whose database codes AUs, and how many those are; under
    ``privacy``, released through the Gaussian mechanism at its ``query_noise``
    (:func:`client.privacy.noised_cooccurrence`; ``seed`` only with ``seeded_noise``).

    Only these additive counts leave the site; the server sums them and builds the prior
    (:func:`models.au_graph.cooccurrence_from_counts`).
    """
    coded = [s for s in samples if s.has_action_units]
    targets = torch.from_numpy(np.stack([au_target(s) for s in coded]) if coded else np.zeros((0, N_AUS), np.float32))
    if privacy is not None and privacy.enabled:
        return noised_cooccurrence(targets, privacy.query_noise, noise_generator(privacy, seed))
    return cooccurrence_counts(targets), len(coded)


# ----------------------------------------------------------------------------------------------- reported metrics


def privacy_metrics(ledger: PrivacyLedger | None, exhausted: bool = False) -> dict[str, float | int]:
    """The site's ``DP_METRIC_KEYS`` values: its spending so far, or epsilon inf (no guarantee) without DP."""
    if ledger is None or ledger.delta is None:
        values: tuple[float | int, ...] = (math.inf, 0.0, 0.0, 0.0, 0)
    else:
        values = (ledger.epsilon(), ledger.delta, ledger.noise_multiplier or 0.0, ledger.sample_rate, ledger.steps)
    return dict(zip(protocol.DP_METRIC_KEYS, (*values, int(exhausted)), strict=True))


def train_metrics(
    site_index: int | None, outcome: TrainOutcome, bytes_sent: int, privacy: Mapping[str, float | int] | None = None
) -> dict[str, Any]:
    """A train reply's metrics: ``num-examples`` and exactly the contract's ``TRAIN_METRIC_KEYS`` (without
    ``site-index`` when ``site_index`` is None: a central baseline belongs to no site). ``privacy``: the
    :func:`privacy_metrics` (default: no DP)."""
    terms = outcome.terms
    values = {
        protocol.SITE_INDEX: site_index,
        "loss": terms["loss"],
        "loss-mer": terms["mer"],
        "loss-flow": terms["flow"],
        "loss-landmarks": terms["landmarks"],
        "loss-au": terms["au"],
        "train-uf1": outcome.train_uf1,
        "train-seconds": outcome.seconds,
        "bytes-sent": bytes_sent,
        **(privacy if privacy is not None else privacy_metrics(None)),
    }
    keys = [key for key in protocol.TRAIN_METRIC_KEYS if not (key == protocol.SITE_INDEX and site_index is None)]
    return {protocol.NUM_EXAMPLES: outcome.examples, **{key: values[key] for key in keys}}


def evaluate_metrics(site_index: int, result: Evaluation) -> dict[str, Any]:
    """An evaluate reply's metrics: ``num-examples`` and exactly the contract's ``EVALUATE_METRIC_KEYS``."""
    values = {
        protocol.SITE_INDEX: site_index,
        "uf1": result.uf1,
        "uar": result.uar,
        "accuracy": result.accuracy,
        "class-recall": result.class_recall,
        "confusion": result.confusion,
        "epe": result.epe,
        "nme": result.nme,
        "au-f1": result.au_f1,
        "evaluate-seconds": result.seconds,
    }
    return {protocol.NUM_EXAMPLES: result.examples, **{key: values[key] for key in protocol.EVALUATE_METRIC_KEYS}}
