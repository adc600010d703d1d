"""The F5C multitask network: MOL's backbone and heads with FED-PsyAU's AU-coordination graph.

MOL (Shao et al., TPAMI 2025) learns straight from a raw 8-frame clip: for each consecutive frame pair a
shared stem, F5C block #1 on the first frame and block #2 on the second; the pair features feed an optical
flow head per pair, a landmark head per frame, and, stacked along time, the recognition head. FED-PsyAU
(Li et al., ICCV 2025) adds a graph over 12 facial action units whose embedding joins the classifier.

Every frame pair runs batched, and every layer with weights sees the clip as its batch item with time
as a separate axis (Conv3d with 1xkxk kernels instead of Conv2d on folded frames): Opacus computes one
per-sample gradient per input row, so folding frames into the batch would clip per frame, not per clip.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn

from .au_graph import AUGraphHead
from .config import ModelConfig
from .f5c import F5CBackbone
from .flow import FlowHead
from .landmarks import LandmarkHead
from .recognition import RecognitionHead, motion_channels


@dataclass
class ModelOutput:
    """What one forward pass predicts; a head that is off gives None."""

    logits: Tensor  # (B, classes)
    flow: Tensor | None  # (B, T-1, 2, H, W), pixels
    landmarks: Tensor | None  # (B, T, 68, 2), normalised crop coordinates
    au_logits: Tensor | None  # (B, 12), AU_NODES order

    def float(self) -> ModelOutput:
        """Every prediction in fp32: losses and scores of an autocast (bf16) forward pass keep full precision."""
        values = {field.name: getattr(self, field.name) for field in fields(self)}
        return replace(self, **{name: value.float() for name, value in values.items() if value is not None})


class F5CNet(nn.Module):
    """Clip (B, T, 1, H, W) in [0, 1] -> :class:`ModelOutput`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c, size = config.channels, config.feature_size
        self.backbone = F5CBackbone(config)
        self.flow_head = FlowHead(config.flow, 2 * c, config.norm, config.norm_groups) if config.flow_head else None
        self.landmark_head = (
            LandmarkHead(c, size, config.landmarks, config.norm, config.norm_groups) if config.landmark_head else None
        )
        depth = 2 * (config.frames - 1)
        motion = motion_channels(depth, config.recognition)
        self.au_head = AUGraphHead(motion, config.au_graph) if config.au_head else None
        extra = self.au_head.embedding_dim if self.au_head is not None else 0
        self.recognition = RecognitionHead(c, depth, size, config.recognition, config.num_classes, extra)

    def forward(self, clip: Tensor, landmarks: Tensor | None = None, prior_weight: float | Tensor = 0.0) -> ModelOutput:
        """``landmarks`` (B, T, 68, 2) place the AU regions when given (training); otherwise the predicted
        ones do (inference). ``prior_weight`` is FED-PsyAU's r, which the server decays over rounds."""
        self._check_clip(clip)
        first, second = self.backbone(clip)  # (B, C, T-1, h, w) each
        flow = predicted = au_logits = embedding = None
        if self.flow_head is not None:
            flow = self.flow_head(clip.transpose(1, 2), torch.cat([first, second], dim=1)).transpose(1, 2)
        if self.landmark_head is not None:
            # frame 0 from block #1's features, frames 1..T-1 from block #2's (the release predicts each
            # pair's second frame)
            predicted = self.landmark_head(torch.cat([first[:, :, :1], second], dim=2))
        motion = self.recognition.motion_features(F5CBackbone.stack_pairs(first, second))
        if self.au_head is not None:
            placement = landmarks if landmarks is not None else predicted
            if placement is None:
                raise ValueError("the AU graph head needs landmarks: pass them or turn the landmark head on")
            au_logits, embedding = self.au_head(
                RecognitionHead.fold_time(motion), placement.detach().mean(dim=1), prior_weight
            )
        logits = self.recognition(motion, embedding)
        return ModelOutput(logits=logits, flow=flow, landmarks=predicted, au_logits=au_logits)

    def _check_clip(self, clip: Tensor) -> None:
        size, frames = self.config.image_size, self.config.frames
        if clip.ndim != 5 or tuple(clip.shape[1:]) != (frames, 1, size, size):
            raise ValueError(
                f"clip of shape {tuple(clip.shape)}: this model takes (batch, {frames}, 1, {size}, {size}); "
                "prepare the site with the same T and crop size, or build the model for this clip shape"
            )


def build_model(config: ModelConfig | None = None) -> F5CNet:
    """The whole network from a plain config (``models.config.preset(...)`` for the presets)."""
    return F5CNet(config or ModelConfig())
