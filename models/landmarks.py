"""Landmark head: each frame's F5C features to the 68 facial points (MOL's auxiliary landmark task).

MOL's release (Shao et al., TPAMI 2025): 3x3 conv 128->32 without padding, ReLU, flatten (32*14*14 = 6272),
Linear 512, ReLU, Linear 136. Here the conv stride and widths come from ``LandmarkHeadConfig``, the flattened size
from the feature map's side, a norm sits between conv and ReLU (``norm=None`` for the release's none), and the
output is offset by 0.5 with a small last layer so an untrained head already predicts points near the crop centre.

Clip layout: the head takes a clip's T frames at once, (B, C, T, s, s), so every layer with weights sees the clip
as its batch item (Opacus computes one per-sample gradient per input row; folding frames into the batch would clip
per frame, not per clip). The conv is a Conv3d with a (1, 3, 3) kernel (the release's per-frame conv) and the MLP
runs on the last axis of (B, T, c*s'*s'). GroupNorm's statistics span the clip's T frames.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import LandmarkHeadConfig, Norm
from .layers import norm_layer

POINTS = 68  # iBUG 68-point markup
CENTRE = 0.5  # crop centre in normalised coordinates: where untrained predictions start
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 36, 45  # iBUG-68 outer eye corners


def inter_ocular_distance(points: Tensor) -> Tensor:
    """(..., 68, 2) -> (...): distance between the outer eye corners, the scale landmark errors and the AU
    regions are measured in."""
    return torch.linalg.vector_norm(points[..., LEFT_EYE_OUTER, :] - points[..., RIGHT_EYE_OUTER, :], dim=-1)


class LandmarkHead(nn.Module):
    """features (B, channels, T, s, s) -> points (B, T, 68, 2): each frame's (x, y) in normalised crop coordinates,
    pixel / (size - 1).

    ``feature_size`` is s (the flattened size of the MLP's input depends on it); s must be at least 3.
    """

    def __init__(
        self,
        channels: int,
        feature_size: int,
        config: LandmarkHeadConfig,
        norm: Norm | None = "group",
        groups: int = 8,
    ) -> None:
        super().__init__()
        if feature_size < 3:
            raise ValueError(f"feature_size={feature_size}: the landmark head's 3x3 conv needs at least 3")
        side = (feature_size - 3) // config.stride + 1
        self.feature_size = feature_size
        self.conv = nn.Conv3d(
            channels, config.channels, (1, 3, 3), stride=(1, config.stride, config.stride), bias=norm is None
        )
        self.norm = nn.Identity() if norm is None else norm_layer(norm, config.channels, groups)
        self.act = nn.ReLU()
        self.hidden = nn.Linear(config.channels * side * side, config.hidden)
        self.out = nn.Linear(config.hidden, POINTS * 2)
        with torch.no_grad():  # small start: predictions begin within a few hundredths of the centre
            self.out.weight.mul_(0.1)
            self.out.bias.zero_()

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 5 or features.shape[3:] != (self.feature_size, self.feature_size):
            raise ValueError(
                f"features {tuple(features.shape)}: expected (B, channels, T, s, s) with side {self.feature_size}"
            )
        x = self.act(self.norm(self.conv(features)))  # (B, c, T, s', s')
        x = x.transpose(1, 2).flatten(2)  # (B, T, c*s'*s'): per frame, in the release's (c, y, x) order
        x = self.act(self.hidden(x))
        return self.out(x).unflatten(-1, (POINTS, 2)) + CENTRE
