"""The multitask loss: L = w_mer CE + w_flow EPE + w_ldm NME-L1 + w_au BCE(AU).

Every term is a per-sample loss averaged over the batch (sum / B), with a per-sample mask where a sample
lacks a target (SMIC codes no AUs). Dividing by B rather than by the number of targets present keeps each
sample's gradient independent of the rest of the batch, which per-sample clipping (Opacus) relies on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .landmarks import inter_ocular_distance
from .network import ModelOutput


@dataclass(frozen=True)
class LossWeights:
    """Task weights (see the README's loss-weight measurement for how the defaults were chosen)."""

    mer: float = 1.0
    flow: float = 0.1
    landmarks: float = 1.0
    au: float = 0.5


def endpoint_error(predicted: Tensor, target: Tensor) -> Tensor:
    """Mean Euclidean flow error per sample: (B, ..., 2, H, W) pairs -> (B,)."""
    return torch.linalg.vector_norm(predicted - target, dim=-3).flatten(1).mean(dim=1)


def landmark_error(predicted: Tensor, target: Tensor, norm: str = "l1") -> Tensor:
    """Per-sample landmark error over inter-ocular distance: (B, T, 68, 2) -> (B,).

    ``l1`` (the training loss) sums |dx| + |dy| per point; ``l2`` gives the usual NME for reporting.
    """
    difference = predicted - target
    per_point = difference.abs().sum(-1) if norm == "l1" else torch.linalg.vector_norm(difference, dim=-1)
    return (per_point.mean(-1) / inter_ocular_distance(target).clamp_min(1e-6)).flatten(1).mean(dim=1)


def balanced_class_weights(targets: Sequence[int], num_classes: int) -> Tensor:
    """Inverse class frequency, mean 1 over the classes present: ME databases are imbalanced (CASME II's
    "others" and "disgust" dwarf "fear"), and an unweighted CE settles on the majority class."""
    counts = torch.bincount(torch.as_tensor(list(targets), dtype=torch.int64), minlength=num_classes).float()
    weights = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp_min(1)), torch.zeros_like(counts))
    return weights / weights[counts > 0].mean()


class MultitaskLoss(nn.Module):
    """Model output and a batch from ``partitions.dataset.ClipDataset`` -> (total, detached terms).

    ``class_weights`` (optional, see :func:`balanced_class_weights`) weight each sample's CE by its class;
    ``label_smoothing`` moves that much of each CE target's mass evenly onto all classes (Szegedy et al., 2016),
    so a hundred training clips cannot be fitted with ever larger logits.
    """

    def __init__(
        self, weights: LossWeights | None = None, class_weights: Tensor | None = None, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self.weights = weights or LossWeights()
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, output: ModelOutput, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        terms = self.terms(output, batch)
        total = sum(getattr(self.weights, name) * value.mean() for name, value in terms.items())
        return total, self.report(terms)

    def per_sample(self, output: ModelOutput, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """(weighted total per sample (B,), detached terms): Opacus's ghost clipping rescales each sample's loss."""
        terms = self.terms(output, batch)
        return sum(getattr(self.weights, name) * value for name, value in terms.items()), self.report(terms)

    def terms(self, output: ModelOutput, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each head's unweighted per-sample loss (B,), masked where a sample lacks the target."""
        terms = {
            "mer": F.cross_entropy(
                output.logits,
                batch["label"],
                weight=self.class_weights,
                reduction="none",
                label_smoothing=self.label_smoothing,
            )
        }
        if output.flow is not None:
            terms["flow"] = endpoint_error(output.flow, batch["flow"])
        if output.landmarks is not None:
            terms["landmarks"] = landmark_error(output.landmarks, batch["landmarks"])
        if output.au_logits is not None:
            per_au = F.binary_cross_entropy_with_logits(output.au_logits, batch["au"], reduction="none")
            terms["au"] = per_au.mean(dim=1) * batch["au_mask"].to(per_au.dtype)
        return terms

    @staticmethod
    def report(terms: dict[str, Tensor]) -> dict[str, float]:
        return {name: float(value.detach().mean()) for name, value in terms.items()}
