"""Recognition head: MOL's 3-D convolution over the stacked pair features, then the classifier.

The classifier's input also takes the AU-graph embedding (FED-PsyAU), so the emotion decision sees
which AUs the graph found and how they coordinate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import RecognitionHeadConfig


def motion_channels(depth: int, config: RecognitionHeadConfig) -> int:
    """Channels of the time-folded motion features: one map per (3-D conv channel, output time step)."""
    return config.channels * (depth - min(config.kernel[0], depth) + 1)


class RecognitionHead(nn.Module):
    """Stacked pair features (B, C, D, h, w), D = 2(T-1) -> class logits (B, classes).

    ``motion_features`` exposes the 3-D convolution's output, (B, channels * D', h', w') with time
    folded into channels: the AU graph pools its node features from it, so they carry motion.
    """

    def __init__(
        self,
        channels: int,
        depth: int,
        feature_size: int,
        config: RecognitionHeadConfig,
        num_classes: int,
        extra_dim: int = 0,
    ) -> None:
        super().__init__()
        kernel = (min(config.kernel[0], depth), *config.kernel[1:])
        self.conv = nn.Conv3d(channels, config.channels, kernel_size=kernel, stride=(1, 2, 2))
        self.pool = nn.MaxPool3d(2, ceil_mode=True)
        self.dropout = nn.Dropout(config.dropout)
        self.relative = config.relative
        self.normalise_motion = config.relative and config.normalise_motion
        with torch.no_grad():
            flat = self.pool(self.conv(torch.zeros(1, channels, depth, feature_size, feature_size))).numel()
        self.hidden = nn.Linear(flat, config.hidden)
        self.classifier = nn.Linear(config.hidden + extra_dim, num_classes)

    def motion_features(self, stacked: Tensor) -> Tensor:
        """(B, C, D, h, w) -> the 3-D convolution's output (B, channels, D', h', w').

        With ``relative``, each block's features are first expressed against that block's first entry (block #1
        on the onset frame, block #2 on the next), so the convolution sees what moved since the onset rather than
        the face's appearance, which carries no label: a still clip gives all zeros.

        With ``normalise_motion`` the relative stack is then scaled to zero mean and unit variance per clip (a
        GroupNorm of one group, no weights): at initialisation a micro-movement is a tiny difference of two
        feature maps, and without the scaling training sat on the majority class for about ten epochs before
        the head picked the motion up. Per clip, so it stays per-sample under Opacus; zeros stay zeros.
        """
        if self.relative:
            pairs = stacked.unflatten(2, (-1, 2))  # (B, C, T-1, 2, h, w): [block #1, block #2] per pair
            stacked = (pairs - pairs[:, :, :1]).flatten(2, 3)
            if self.normalise_motion:
                stacked = F.group_norm(stacked, 1)
        return self.conv(stacked)

    @staticmethod
    def fold_time(motion: Tensor) -> Tensor:
        """(B, c, D', h', w') -> (B, c * D', h', w'): one map per (channel, time step)."""
        return motion.flatten(1, 2)

    def forward(self, motion: Tensor, extra: Tensor | None = None) -> Tensor:
        """Motion features (B, channels, D', h', w') and optional extra (B, extra_dim) -> logits (B, classes)."""
        x = self.dropout(self.pool(motion)).flatten(1)
        x = self.dropout(torch.relu(self.hidden(x)))
        if extra is not None:
            x = torch.cat([x, extra], dim=1)
        return self.classifier(x)
