"""Local training and evaluation of the F5C network on one site's prepared clips.

Metrics follow the ME literature (MEGC2019): UF1 is the macro F1 over the label space's classes, UAR the
mean per-class recall over the classes present. Flow is scored against the TV-L1 pseudo ground truth the
model trains on and, for synthetic sites, against the exact displacement; landmarks by NME.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import f1_score, recall_score
from torch import Tensor

from client.precision import autocast
from models.losses import MultitaskLoss, endpoint_error, landmark_error
from models.network import F5CNet, ModelOutput

Batch = dict[str, Tensor]


def forward_batch(
    model: F5CNet, batch: Batch, prior_weight: float = 0.0, teacher_landmarks: bool = True
) -> ModelOutput:
    """Training places AU regions on the clip's dlib landmarks; evaluation on the model's own."""
    landmarks = batch["landmarks"] if teacher_landmarks else None
    return model(batch["clip"], landmarks=landmarks, prior_weight=prior_weight)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}


def train_epoch(
    model: F5CNet,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    loss_fn: MultitaskLoss,
    prior_weight: float = 0.0,
    device: torch.device | str = "cpu",
    on_step: Callable[[dict[str, float]], None] | None = None,
    penalty: Callable[[], Tensor] | None = None,
    predictions: Predictions | None = None,
    empty_step: Callable[[], None] | None = None,
    precision: torch.dtype | None = None,
) -> dict[str, float]:
    """One pass over the batches; returns the mean of each loss term (and ``loss``, the weighted total) over the
    non-empty batches. ``model`` may be a per-sample gradient wrapper and ``loss_fn`` its DP loss; an empty
    batch (``{}``, DP's Poisson sampling) calls ``empty_step``.

    ``penalty`` (e.g. FedProx's proximal term) joins the objective but not the reported loss, so losses stay
    comparable across settings; ``predictions``, when given, collects the training predictions (train UF1).
    ``precision`` is the forward pass's autocast dtype (:func:`client.precision.autocast_dtype`; None: fp32); the
    losses are computed in fp32 either way.
    """
    model.train()
    sums: dict[str, float] = {}
    steps = 0
    for batch in batches:
        if not batch:  # a Poisson batch that drew no clip (DP): noise only, nothing to report
            optimizer.zero_grad(set_to_none=True)
            if empty_step is None:
                raise ValueError("an empty batch needs empty_step (DP-SGD's noise-only step)")
            empty_step()
            continue
        batch = to_device(batch, torch.device(device))
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device):
            output = forward_batch(model, batch, prior_weight)
        total, terms = loss_fn(output.float(), batch)
        (total + penalty() if penalty is not None else total).backward()
        optimizer.step()
        terms["loss"] = float(total.detach())
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value
        if predictions is not None:
            predictions.labels += batch["label"].tolist()
            predictions.predicted += output.logits.detach().argmax(dim=1).tolist()
        steps += 1
        if on_step is not None:
            on_step(terms)
    return {name: value / max(steps, 1) for name, value in sums.items()}


@dataclass
class Predictions:
    """Everything evaluation collects, kept per sample so sites can be pooled before scoring."""

    labels: list[int] = field(default_factory=list)
    predicted: list[int] = field(default_factory=list)
    au_true: list[np.ndarray] = field(default_factory=list)
    au_predicted: list[np.ndarray] = field(default_factory=list)
    flow_epe: list[float] = field(default_factory=list)
    flow_epe_exact: list[float] = field(default_factory=list)
    landmark_nme: list[float] = field(default_factory=list)


@torch.no_grad()
def predict(model: F5CNet, batches: Iterable[Batch], device: torch.device | str = "cpu") -> Predictions:
    """Every clip's predictions, in fp32 whatever the training precision: scores compare across sites."""
    model.eval()
    out = Predictions()
    for batch in batches:
        batch = to_device(batch, torch.device(device))
        output = forward_batch(model, batch, teacher_landmarks=False)
        out.labels += batch["label"].tolist()
        out.predicted += output.logits.argmax(dim=1).tolist()
        if output.au_logits is not None:
            mask = batch["au_mask"].cpu().numpy()
            out.au_true += list(batch["au"].cpu().numpy()[mask])
            out.au_predicted += list((output.au_logits > 0).cpu().numpy()[mask])
        if output.flow is not None:
            out.flow_epe += endpoint_error(output.flow, batch["flow"]).tolist()
            exact = batch["gt_mask"]
            if exact.any():
                out.flow_epe_exact += endpoint_error(output.flow[exact], batch["gt_flow"][exact]).tolist()
        if output.landmarks is not None:
            out.landmark_nme += landmark_error(output.landmarks, batch["landmarks"], norm="l2").tolist()
    return out


def scores(predictions: Predictions, num_classes: int) -> dict[str, float]:
    """UF1, UAR and accuracy; AU macro F1, flow EPE and landmark NME where the heads and targets exist.

    Without a single clip (an empty test split, or a DP epoch whose Poisson batches drew none) UF1, UAR and
    accuracy are undefined, not zero: they are NaN, which the run records write as null, and ``samples`` is 0.
    """
    labels, predicted = np.asarray(predictions.labels), np.asarray(predictions.predicted)
    result = {"uf1": math.nan, "uar": math.nan, "accuracy": math.nan, "samples": float(len(labels))}
    if len(labels):
        result["uf1"] = float(f1_score(labels, predicted, labels=range(num_classes), average="macro", zero_division=0))
        result["uar"] = float(recall_score(labels, predicted, labels=np.unique(labels), average="macro"))
        result["accuracy"] = float((labels == predicted).mean())
    if predictions.au_true:
        au_true, au_predicted = np.stack(predictions.au_true), np.stack(predictions.au_predicted)
        result["au_f1"] = float(f1_score(au_true, au_predicted, average="macro", zero_division=0))
    for name in ("flow_epe", "flow_epe_exact", "landmark_nme"):
        values = getattr(predictions, name)
        if values:
            result[name] = float(np.mean(values))
    return result


def evaluate(model: F5CNet, batches: Iterable[Batch], num_classes: int, device: torch.device | str = "cpu") -> dict:
    return scores(predict(model, batches, device), num_classes)
