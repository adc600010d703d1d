"""FlowNetC-style optical-flow head: correlation of each consecutive frame pair at 1/8 resolution, fused with the
pair's F5C features, then a coarse-to-fine decoder back to full resolution.

Follows the flow head of MOL's release (Shao et al., TPAMI 2025), itself FlowNetC (Dosovitskiy et al., ICCV 2015),
with these changes: every normalisation is ``norm_layer`` (GroupNorm by default, so Opacus can clip per sample);
the correlation is plain PyTorch (no CUDA extension); every level's flow is in full-resolution pixels, so
upsampling a coarse flow never rescales it (the transposed flow upsamplers start as bilinear interpolation); with
``skip_both_frames`` (``lite``) the decoder's 1/4, 1/2 and full-resolution skips carry frame B next to frame A; and
widths, depth and upsampling come from ``FlowHeadConfig`` (``lite``: no stage below 1/8, bilinear upsampling).

Clip layout: the head takes a whole clip, (B, C, T, H, W), and every layer with weights sees the clip as its batch
item with time as a separate axis. Opacus computes one per-sample gradient per row of a layer's input, so folding
the T-1 pairs into the batch would give one gradient per pair and break the clip-level privacy guarantee. Hence
every 2-D convolution is a Conv3d with a (1, k, k) kernel (the same per-frame operation) and every transposed one a
ConvTranspose3d with a (1, 4, 4) kernel; only the parameter-free correlation folds pairs into its batch. GroupNorm's
statistics span all frames (encoder) or pairs (decoder) of a clip, so one pair's flow depends on the others of its
clip, never on other clips. Every weight sits in Conv3d, ConvTranspose3d or GroupNorm; Opacus has no native
ConvTranspose3d sampler and falls back to functorch for it, which gives the same per-sample gradients (tested).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import FlowHeadConfig, Norm
from .layers import norm_layer

SLOPE = 0.1  # FlowNetC's LeakyReLU slope, also applied to the correlation


def _displacement_index(h: int, w: int, patch: int, dilation: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Flat target position of every (position, displacement) pair and whether it falls inside the map.

    Returns index (h*w, patch*patch) int64 into a flattened h*w map (clamped where invalid) and valid (h*w,
    patch*patch) bool. Rebuilt per call: it is tiny next to the cost volume and keeps the function stateless.
    """
    offsets = (torch.arange(patch, device=device) - patch // 2) * dilation  # (p,)
    ty = torch.arange(h, device=device)[:, None, None, None] + offsets[None, None, :, None]  # (h, 1, p, 1)
    tx = torch.arange(w, device=device)[None, :, None, None] + offsets[None, None, None, :]  # (1, w, 1, p)
    valid = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)  # (h, w, p, p)
    index = ty.clamp(0, h - 1) * w + tx.clamp(0, w - 1)  # (h, w, p, p)
    return index.reshape(h * w, patch * patch), valid.reshape(h * w, patch * patch)


def correlation(a: Tensor, b: Tensor, patch: int, dilation: int) -> Tensor:
    """FlowNetC correlation with kernel 1: how well each position of ``a`` matches nearby positions of ``b``.

    a, b: (N, C, h, w) -> (N, patch*patch, h, w); channel ``i*patch + j`` is the channel mean of
    ``a[:, :, y, x] * b[:, :, y + (i - r)*dilation, x + (j - r)*dilation]`` with ``r = patch // 2``, zero where the
    displaced position leaves ``b``, then LeakyReLU(0.1). One batched matmul builds the full (N, h*w, h*w) cost
    volume (cheap at 1/8 resolution) and a gather picks the displacements, so (N, C, patch^2, h, w) never exists.
    Per pair and without weights: :class:`FlowHead` folds a clip's pairs into N for it.
    """
    if patch < 1 or patch % 2 == 0:
        raise ValueError(f"patch={patch}: the correlation patch must be a positive odd number")
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"correlation needs two (N, C, h, w) maps of one shape: {tuple(a.shape)}, {tuple(b.shape)}")
    n, c, h, w = a.shape
    cost = torch.bmm(a.flatten(2).transpose(1, 2), b.flatten(2)) / c  # (N, hw, hw)
    index, valid = _displacement_index(h, w, patch, dilation, a.device)
    picked = cost.gather(2, index.expand(n, -1, -1))  # (N, hw, p*p)
    picked = picked.masked_fill(~valid, 0.0)
    out = picked.transpose(1, 2).reshape(n, patch * patch, h, w)
    return F.leaky_relu(out, SLOPE)


def pair_correlation(a: Tensor, b: Tensor, patch: int, dilation: int) -> Tensor:
    """:func:`correlation` of every pair of a clip: a, b (B, C, P, h, w) -> (B, patch*patch, P, h, w).

    Folds the P pairs into the batch only for this weightless step, then restores the clip layout.
    """
    batch, pairs = a.shape[0], a.shape[2]
    out = correlation(a.transpose(1, 2).flatten(0, 1), b.transpose(1, 2).flatten(0, 1), patch, dilation)
    return out.unflatten(0, (batch, pairs)).transpose(1, 2)


def crop_like(x: Tensor, target: Tensor) -> Tensor:
    """Crop ``x``'s last two (spatial) axes to ``target``'s (h <= h', w <= w'): upsampling a map whose side was
    rounded up by a stride-2 convolution overshoots by one. Works on (N, C, h, w) and (B, C, T, h, w)."""
    return x[..., : target.shape[-2], : target.shape[-1]]


def conv_block(
    in_channels: int, out_channels: int, kernel: int, stride: int, padding: int, norm: Norm, groups: int
) -> nn.Sequential:
    """Per-frame conv (no bias: the norm has one) -> norm -> LeakyReLU(0.1), FlowNetC's ``conv`` unit, on clips:
    Conv3d with kernel (1, k, k), stride (1, s, s), padding (0, p, p). (B, in, T, h, w) -> (B, out, T, h', w')."""
    return nn.Sequential(
        nn.Conv3d(
            in_channels,
            out_channels,
            (1, kernel, kernel),
            stride=(1, stride, stride),
            padding=(0, padding, padding),
            bias=False,
        ),
        norm_layer(norm, out_channels, groups),
        nn.LeakyReLU(SLOPE),
    )


class FrameEncoder(nn.Module):
    """Three stride-2 stages on raw grey frames (the release's kernels 6/4/2, paddings 2/1/0: exact halvings).

    (B, 1, T, H, W) -> [(B, widths[0], T, H/2, W/2), (B, widths[1], T, H/4, W/4), (B, widths[2], T, H/8, W/8)].
    """

    def __init__(self, widths: tuple[int, int, int], norm: Norm = "group", groups: int = 8) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            [
                conv_block(1, widths[0], 6, 2, 2, norm, groups),
                conv_block(widths[0], widths[1], 4, 2, 1, norm, groups),
                conv_block(widths[1], widths[2], 2, 2, 0, norm, groups),
            ]
        )

    def forward(self, frames: Tensor) -> list[Tensor]:
        outputs = []
        x = frames
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


def _upsample(x: Tensor, factor: int = 2) -> Tensor:
    """Bilinear x``factor`` of every frame of (B, C, T, h, w). Frames are folded into the batch here only because
    interpolation has no weights (Opacus is unaffected); 2-D bilinear is 1.5x faster than trilinear on CPU."""
    batch, frames = x.shape[0], x.shape[2]
    folded = x.transpose(1, 2).flatten(0, 1)
    up = F.interpolate(folded, scale_factor=float(factor), mode="bilinear", align_corners=False)
    return up.unflatten(0, (batch, frames)).transpose(1, 2)


class FeatureUpsample(nn.Module):
    """Doubles a decoder map's side: ConvTranspose (1x4x4, stride 1x2x2, padding 0x1x1; FlowNetC's ``deconv``) or
    1x3x3 conv then bilinear x2, then LeakyReLU(0.1). (B, in_channels, P, h, w) -> (B, out_channels, P, 2h, 2w).

    The conv runs before the upsampling, at a quarter of the pixels: the full-resolution stage was half the
    ``lite`` training step when it convolved after upsampling.
    """

    def __init__(self, in_channels: int, out_channels: int, transposed: bool) -> None:
        super().__init__()
        self.transposed = transposed
        if transposed:
            self.conv = nn.ConvTranspose3d(
                in_channels, out_channels, (1, 4, 4), stride=(1, 2, 2), padding=(0, 1, 1), bias=False
            )
        else:
            self.conv = nn.Conv3d(in_channels, out_channels, (1, 3, 3), padding=(0, 1, 1))
        self.act = nn.LeakyReLU(SLOPE)

    def forward(self, x: Tensor) -> Tensor:
        if self.transposed:
            return self.act(self.conv(x))
        return self.act(_upsample(self.conv(x)))


def _bilinear_kernel(size: int = 4) -> Tensor:
    """(size, size) weights that make a transposed conv (k=size, s=2, p=1) a bilinear x2 upsampler."""
    factor = (size + 1) // 2
    centre = factor - 0.5
    taps = 1.0 - (torch.arange(size, dtype=torch.float32) - centre).abs() / factor
    return taps[:, None] * taps[None, :]


class FlowUpsample(nn.Module):
    """Doubles a flow's side without rescaling it: flows are in full-resolution pixels at every level.

    (B, 2, P, h, w) -> (B, 2, P, 2h, 2w). Transposed: FlowNetC's learned transposed conv (2 -> 2, 1x4x4, stride
    1x2x2, padding 0x1x1), initialised to per-component bilinear interpolation so the unit convention holds from
    the start; otherwise bilinear per frame, no weights.
    """

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.conv = (
            nn.ConvTranspose3d(2, 2, (1, 4, 4), stride=(1, 2, 2), padding=(0, 1, 1), bias=False) if transposed else None
        )
        if self.conv is not None:
            with torch.no_grad():
                self.conv.weight.zero_()  # (in, out, 1, 4, 4)
                kernel = _bilinear_kernel(4)
                self.conv.weight[0, 0, 0] = kernel
                self.conv.weight[1, 1, 0] = kernel

    def forward(self, flow: Tensor) -> Tensor:
        if self.conv is not None:
            return self.conv(flow)
        return _upsample(flow)


def _pairs(x: Tensor, both: bool) -> Tensor:
    """A clip's per-frame maps (B, C, T, ...) as per-pair skips: frame A's (B, C, T-1, ...), or with ``both``
    frame A's then frame B's channels (B, 2C, T-1, ...)."""
    if both:
        return torch.cat([x[:, :, :-1], x[:, :, 1:]], dim=1)
    return x[:, :, :-1]


class FlowHead(nn.Module):
    """Optical flow of every consecutive frame pair of a clip, helped by the pairs' F5C features (MOL's auxiliary
    flow task).

    forward(frames (B, 1, T, H, W), features (B, feature_channels, T-1, H/8, W/8)) -> (B, 2, T-1, H, W): pair t's
    flow from frame t (A) to frame t+1 (B), in full-resolution pixels, channel 0 horizontal (x), channel 1
    vertical (y); H and W multiples of 8, T at least 2. The encoder runs once on all T frames; pair t takes frame
    t's maps as A and frame t+1's as B. Only the finest prediction is returned (the coarse ones feed the next
    level and are not supervised).
    """

    def __init__(self, config: FlowHeadConfig, feature_channels: int, norm: Norm = "group", groups: int = 8) -> None:
        super().__init__()
        self.config = config
        enc = config.encoder
        self.encoder = FrameEncoder(enc, norm, groups)
        self.redirect = conv_block(enc[2], config.redirect, 1, 1, 0, norm, groups)
        fuse_in = config.redirect + config.patch * config.patch + feature_channels
        self.fuse = conv_block(fuse_in, config.fuse, 3, 1, 1, norm, groups)
        widths = [config.fuse, *config.deep]  # channels of the pyramid at 1/8, 1/16, ...
        self.deep = nn.ModuleList(
            nn.Sequential(conv_block(cin, cout, 3, 2, 1, norm, groups), conv_block(cout, cout, 3, 1, 1, norm, groups))
            for cin, cout in itertools.pairwise(widths)
        )
        # Skips, coarse to fine: the deep outputs above the deepest, the fused 1/8 map, then the 1/4 and 1/2
        # encoder maps and the frame itself: frame A's, and with skip_both_frames frame B's too.
        frames = 2 if config.skip_both_frames else 1
        fine = [frames * enc[1], frames * enc[0], frames][: config.fine_stages]  # skips at 1/4, 1/2, 1
        skip_channels = [*reversed(widths[:-1]), *fine]
        in_channels = widths[-1]
        predict, up_features, up_flows = [], [], []
        for skip, width in zip(skip_channels, config.decoder, strict=True):
            predict.append(self._predictor(in_channels))
            up_features.append(FeatureUpsample(in_channels, width, config.transposed))
            up_flows.append(FlowUpsample(config.transposed))
            in_channels = skip + width + 2
        predict.append(self._predictor(in_channels))
        self.predict = nn.ModuleList(predict)
        self.up_features = nn.ModuleList(up_features)
        self.up_flows = nn.ModuleList(up_flows)
        self._init_weights()

    @staticmethod
    def _predictor(in_channels: int) -> nn.Conv3d:
        """FlowNetC's ``predict_flow``: a per-frame 3x3 conv to the two flow components."""
        return nn.Conv3d(in_channels, 2, (1, 3, 3), padding=(0, 1, 1), bias=False)

    def _init_weights(self) -> None:
        """FlowNetC's init (Kaiming normal for LeakyReLU(0.1), zero biases), except the bilinear flow upsamplers."""
        flow_upsamplers = {up.conv for up in self.up_flows if up.conv is not None}
        for module in self.modules():
            if isinstance(module, nn.Conv3d | nn.ConvTranspose3d) and module not in flow_upsamplers:
                nn.init.kaiming_normal_(module.weight, a=SLOPE)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _check(self, frames: Tensor, features: Tensor) -> None:
        if frames.dim() != 5 or frames.shape[1] != 1 or frames.shape[2] < 2:
            raise ValueError(f"frames {tuple(frames.shape)}: the flow head takes grey clips (B, 1, T >= 2, H, W)")
        batch, _, t, h, w = frames.shape
        if h % 8 or w % 8:
            raise ValueError(f"frames are {h}x{w}; the flow head needs sides that are multiples of 8")
        if features.dim() != 5 or (features.shape[0], *features.shape[2:]) != (batch, t - 1, h // 8, w // 8):
            raise ValueError(
                f"features {tuple(features.shape)} do not match frames {tuple(frames.shape)}: they must be "
                f"(B, channels, T-1, H/8, W/8) = ({batch}, channels, {t - 1}, {h // 8}, {w // 8}) (1/8 resolution)"
            )

    def forward(self, frames: Tensor, features: Tensor) -> Tensor:
        self._check(frames, features)
        both = self.config.skip_both_frames
        # One encoder call on the whole clip: the batch stays B for Opacus and each frame is encoded once.
        e2, e4, e8 = self.encoder(frames)
        corr = pair_correlation(e8[:, :, :-1], e8[:, :, 1:], self.config.patch, self.config.dilation)
        pyramid = [self.fuse(torch.cat([self.redirect(e8[:, :, :-1]), corr, features], dim=1))]
        for stage in self.deep:
            pyramid.append(stage(pyramid[-1]))
        fine = (e4, e2, frames)[: self.config.fine_stages]  # skips at 1/4, 1/2 and 1, as far as the decoder goes
        skips = [*reversed(pyramid[:-1]), *(_pairs(level, both) for level in fine)]
        x = pyramid[-1]
        stages = zip(skips, self.predict[:-1], self.up_features, self.up_flows, strict=True)
        for skip, predict, up_features, up_flow in stages:
            flow = predict(x)
            x = torch.cat([skip, crop_like(up_features(x), skip), crop_like(up_flow(flow), skip)], dim=1)
        flow = self.predict[-1](x)
        stride = self.config.output_stride
        return flow if stride == 1 else _upsample(flow, stride)  # flows are in full-resolution pixels already
