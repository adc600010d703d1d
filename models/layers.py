"""Small layers shared by the network's parts."""

from __future__ import annotations

from torch import nn

from .config import Norm


def norm_layer(kind: Norm, channels: int, groups: int = 8) -> nn.Module:
    """GroupNorm by default: per-sample statistics, so Opacus can clip per sample and non-IID sites share one model.

    Works on (B, C, H, W) and on (B, C, T, H, W); on clips the statistics span the clip's frames, which stay
    in their own axis so that the clip is the batch item (Opacus's per-sample gradients need that).
    ``"batch"`` gives the release's BatchNorm (not usable under Opacus). Groups shrink to divide ``channels``.
    """
    if kind == "batch":
        return _AnyBatchNorm(channels)
    if kind != "group":
        raise ValueError(f"norm={kind!r}: choose 'group' or 'batch'")
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


class _AnyBatchNorm(nn.BatchNorm2d):
    """BatchNorm over 4-D or 5-D input (the release's choice; the input's dimensionality is not checked)."""

    def _check_input_dim(self, input) -> None:  # torch names the argument `input`
        if input.dim() not in (4, 5):
            raise ValueError(f"expected 4-D or 5-D input, got {input.dim()}-D")
