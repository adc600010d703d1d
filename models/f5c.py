"""The F5C backbone of MOL (Shao et al., TPAMI 2025): a convolutional stem, then per frame pair two F5C blocks.

An F5C block is a fully-connected convolution (FCC: depth-wise circular convolutions whose kernels span a whole
axis, so every output position sees the whole map) followed by a channel correspondence convolution (CCC: a
k-nearest-neighbour graph convolution by cosine similarity, with a residual). The sizes follow MOL's public
release (github.com/CYF-cuber/MOL); this is an independent implementation of what the release computes, written
so that every parameter lives either in a standard layer Opacus has a per-sample gradient rule for (Conv3d,
Linear, GroupNorm) or in a parameter-only leaf module (:class:`AxisEmbedding`, handled by Opacus's functorch path).

Layout: the clip is the batch item. Every layer with parameters sees ``B`` clips as its first dimension and
time as a separate axis, (B, C, T, h, w), channels first, time third: Opacus computes one per-sample gradient
per row of a layer's input, so folding frames into the batch would give one gradient per frame and break
differential privacy. 2-D convolutions are therefore written as ``Conv3d`` with kernel (1, kh, kw) and stride
(1, s, s): each frame is convolved on its own. ``B`` is a batch of clips, ``C`` channels, ``T`` frames,
``(h, w)`` the feature map (the image divided by 8), ``P = h*w``. FCC, CCC and F5CBlock also take a single frame
(B, C, h, w) and return the same 4-D shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CCCGraph, ModelConfig, Norm
from .layers import norm_layer

__all__ = ["CCC", "FCC", "AxisEmbedding", "CircularConv", "F5CBackbone", "F5CBlock", "Stem"]

Axis = Literal["vertical", "horizontal"]
_AXES: tuple[str, ...] = ("vertical", "horizontal")


def _frames(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Run ``fn`` (5-D in, 5-D out) on (B, C, T, h, w), or on a single frame (B, C, h, w) as T = 1."""
    if x.dim() == 5:
        return fn(x)
    if x.dim() == 4:
        return fn(x.unsqueeze(2)).squeeze(2)
    raise ValueError(f"expected (B, C, T, h, w) or a single frame (B, C, h, w), got shape {tuple(x.shape)}")


def _frame_conv(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Conv3d:
    """A 2-D convolution applied to every frame on its own, as a Conv3d over (B, C, T, H, W)."""
    return nn.Conv3d(cin, cout, (1, kernel, kernel), stride=(1, stride, stride), padding=(0, padding, padding))


class Stem(nn.Module):
    """Four strided convolutions that bring frames to 1/8 resolution: (B, in, T, H, W) -> (B, out, T, H/8, W/8).

    The release's kernels and strides (k4 s2 p0, k3 s2 p0, k2 s2 p1, k1 s1) map H = 8m to exactly m; they are
    Conv3d with kernel (1, k, k), so each frame is convolved on its own. The release stacks them with no
    nonlinearity, which makes the first three one linear map; ``activation=True`` puts a GELU after each of
    them. A normalisation closes the stem so that FCC's positional embeddings (initialised small) meet
    features of a known scale. With GroupNorm its statistics span all the clip's frames (and, per group, its
    channels): they are computed per clip, so the stem stays batch-independent and Opacus-safe, but a frame's
    features depend on the other frames of its clip. A single frame (B, in, H, W) is taken as a clip of one.
    """

    def __init__(
        self,
        in_channels: int,
        widths: tuple[int, int, int],
        out_channels: int,
        activation: bool = True,
        norm: Norm = "group",
        groups: int = 8,
    ) -> None:
        super().__init__()
        w1, w2, w3 = widths
        layers: list[nn.Module] = []
        specs = ((in_channels, w1, 4, 2, 0), (w1, w2, 3, 2, 0), (w2, w3, 2, 2, 1))
        for cin, cout, kernel, stride, padding in specs:
            layers.append(_frame_conv(cin, cout, kernel, stride, padding))
            if activation:
                layers.append(nn.GELU())
        layers.append(_frame_conv(w3, out_channels, 1))
        layers.append(norm_layer(norm, out_channels, groups))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in, T, H, W) with H, W multiples of 8 -> (B, out, T, H/8, W/8); 4-D (B, in, H, W) also works."""
        return _frames(self.layers, x)


class AxisEmbedding(nn.Module):
    """A learned positional embedding that varies along one spatial axis and is broadcast along the others.

    Holds a single parameter, (1, C, 1, length, 1) for ``axis="vertical"`` or (1, C, 1, 1, length) for
    ``"horizontal"``, and no child module: Opacus computes per-sample gradients of custom parameters only
    in leaf modules (through functorch). Forward: (B, C, T, h, w) -> x + embedding, same shape (the same
    embedding for every frame); a single frame (B, C, h, w) also works.
    """

    def __init__(self, channels: int, length: int, axis: Axis) -> None:
        super().__init__()
        if axis not in _AXES:
            raise ValueError(f"axis={axis!r}: choose 'vertical' or 'horizontal'")
        self.axis = axis
        shape = (1, channels, 1, length, 1) if axis == "vertical" else (1, channels, 1, 1, length)
        self.weight = nn.Parameter(torch.empty(shape))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, T, h, w) -> (B, C, T, h, w), or (B, C, h, w) -> (B, C, h, w)."""
        return x + (self.weight if x.dim() == 5 else self.weight[:, :, 0])


class CircularConv(nn.Module):
    """Depth-wise convolution whose kernel spans the whole ``axis``, applied with wrap-around.

    out[c, i] = sum_s k[c, s] x[c, (i + s) mod L] + b[c] (the release pads with ``cat((x, x[:-1]))`` and
    convolves), frame by frame. Computed as one batched matmul with each channel's circulant matrix: the
    same arithmetic as the depth-wise convolution, but CPU depth-wise Conv3d backward made FCC a third of
    F5C's time. A leaf module (Opacus takes its per-sample gradients through functorch).
    (B, C, T, h, w) -> same shape.
    """

    def __init__(self, channels: int, length: int, axis: Axis) -> None:
        super().__init__()
        if axis not in _AXES:
            raise ValueError(f"axis={axis!r}: choose 'vertical' or 'horizontal'")
        self.axis = axis
        self.weight = nn.Parameter(torch.empty(channels, length))
        self.bias = nn.Parameter(torch.empty(channels))
        bound = 1.0 / length**0.5  # Conv's default fan-in bound for a depth-wise kernel of this length
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        length = self.weight.shape[1]
        steps = torch.arange(length, device=x.device)
        offsets = (steps[None, :] - steps[:, None]) % length  # computed, not a buffer: Opacus refuses those
        circulant = self.weight[:, offsets]  # (C, L, L): row i holds k[(j - i) mod L] at column j
        bias = self.bias[:, None, None, None]
        if self.axis == "vertical":
            return torch.einsum("cij,bctjw->bctiw", circulant, x) + bias
        return torch.einsum("cij,bcthj->bcthi", circulant, x) + bias


class _FCCBranch(nn.Module):
    """One half of FCC: embedding, norm, global circular conv along ``first``, embedding, conv along the other axis.

    (B, C, T, h, w) -> (B, C, T, h, w), with the residual: x + branch(x).
    """

    def __init__(self, channels: int, size: tuple[int, int], first: Axis, norm: Norm, groups: int) -> None:
        super().__init__()
        second: Axis = "horizontal" if first == "vertical" else "vertical"
        h, w = size
        length = {"vertical": h, "horizontal": w}
        self.first, self.second = first, second
        self.embed1 = AxisEmbedding(channels, length[first], first)
        self.norm = norm_layer(norm, channels, groups)
        self.conv1 = CircularConv(channels, length[first], first)
        self.embed2 = AxisEmbedding(channels, length[second], second)
        self.conv2 = CircularConv(channels, length[second], second)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.embed1(x))
        y = self.conv1(y)
        y = self.conv2(self.embed2(y))
        return x + y


class FCC(nn.Module):
    """Fully-connected convolution (ParC-style global circular convolution): (B, C, T, h, w) -> same shape.

    Why: a depth-wise kernel as long as the axis, applied with wrap-around, gives every output position a
    view of the whole map (first along one axis, then the other) at the cost of a depth-wise convolution.
    The channels are split in two halves; the first half goes vertical then horizontal, the second
    horizontal then vertical, each with its own positional embeddings, norm and residual; the halves are
    concatenated back. ``size`` must equal (h, w) of the input: kernels and embeddings are sized from it.
    The convolutions work frame by frame; with GroupNorm the norm's statistics span all T frames of a clip
    (per sample, so still Opacus-safe and independent of the other clips in the batch), which is the only
    place frames meet. A single frame (B, C, h, w) is taken as a clip of one.
    The release also builds a channel FFN in FCC that its forward never calls; it is left out here.
    """

    def __init__(self, channels: int, size: tuple[int, int], norm: Norm = "group", groups: int = 8) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"channels={channels}: FCC splits channels in two halves, so it must be even")
        self.size = (int(size[0]), int(size[1]))
        half = channels // 2
        self.branch1 = _FCCBranch(half, self.size, "vertical", norm, groups)
        self.branch2 = _FCCBranch(half, self.size, "horizontal", norm, groups)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, T, h, w) -> (B, C, T, h, w), or (B, C, h, w) -> (B, C, h, w)."""
        if tuple(x.shape[-2:]) != self.size:
            raise ValueError(f"FCC built for maps of size {self.size}, got {tuple(x.shape[-2:])}")
        return _frames(self._forward, x)

    def _forward(self, x: Tensor) -> Tensor:
        x1, x2 = torch.chunk(x, 2, dim=1)
        return torch.cat((self.branch1(x1), self.branch2(x2)), dim=1)


class CCC(nn.Module):
    """Channel correspondence convolution: a k-NN graph convolution by cosine similarity, with a residual.

    (B, C, T, h, w) -> same shape, returning x + edge(x), each frame on its own graph. With X = x as
    (B, C, T, P), P = h*w, and for one clip b and frame t:

    * ``graph="positions"`` (what the release computes): the nodes are the P positions, each described by
      its C-vector; idx (B, T, P, k) are every position's k most cosine-similar positions (itself included).
      For each channel map x_c and g_j(x_c)[p] = x_c[idx[p, j]]:
      edge_c = max_j ReLU(W1 x_c + b1 + W2 (g_j(x_c) - 2 x_c) + b2), W1, W2 dense P x P maps shared by channels.
    * ``graph="channels"`` (the paper's wording): the nodes are the C channels, each described by its map;
      idx (B, T, C, k); edge_c = max_j ReLU(W1 x_c + W2 (x_{idx[c, j]} - x_c)), then a 1x1 convolution
      (a Conv3d with kernel 1).

    Why: the graph links features that respond alike wherever they are, so the block relates distant facial
    regions (or channels) that move together. W1 and W2 are ``nn.Linear(P, P)`` on the last (map) axis, so
    ``size`` fixes P; the extra axes ride along (Opacus's Linear rule sums over them per sample).
    A single frame (B, C, h, w) is taken as a clip of one.
    """

    def __init__(self, channels: int, size: tuple[int, int], k: int = 4, graph: CCCGraph = "positions") -> None:
        super().__init__()
        if graph not in ("positions", "channels"):
            raise ValueError(f"graph={graph!r}: choose 'positions' or 'channels'")
        self.size = (int(size[0]), int(size[1]))
        positions = self.size[0] * self.size[1]
        nodes = positions if graph == "positions" else channels
        if not 1 <= k <= nodes:
            raise ValueError(f"k={k}: the {graph} graph has {nodes} nodes, so k must be in [1, {nodes}]")
        self.graph = graph
        self.k = k
        bias = graph == "positions"
        self.node = nn.Linear(positions, positions, bias=bias)  # W1
        self.edge = nn.Linear(positions, positions, bias=bias)  # W2
        self.mix = nn.Conv3d(channels, channels, 1) if graph == "channels" else None

    def neighbours(self, flat: Tensor) -> Tensor:
        """Indices of each node's k most cosine-similar nodes in its frame, most similar first (itself, barring ties).

        (B, C, T, P) -> (B, T, P, k) for ``"positions"``, (B, T, C, k) for ``"channels"``. Not differentiable.
        """
        flat = flat.detach()
        feats = flat.permute(0, 2, 3, 1) if self.graph == "positions" else flat.transpose(1, 2)  # (B, T, nodes, dim)
        unit = F.normalize(feats, p=2, dim=-1)
        similarity = unit @ unit.transpose(-1, -2)  # (B, T, nodes, nodes)
        return similarity.topk(self.k, dim=-1).indices

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, T, h, w) -> (B, C, T, h, w), or (B, C, h, w) -> (B, C, h, w)."""
        if tuple(x.shape[-2:]) != self.size:
            raise ValueError(f"CCC built for maps of size {self.size}, got {tuple(x.shape[-2:])}")
        return _frames(self._forward, x)

    def _forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        p = h * w
        flat = x.reshape(b, c, t, p)
        idx = self.neighbours(flat)
        if self.graph == "positions":
            # g[b, c, t, j, p] = flat[b, c, t, idx[b, t, p, j]]: every channel map resampled at the j-th neighbours.
            order = idx.transpose(2, 3).reshape(b, 1, t, self.k * p).expand(b, c, t, -1)
            moved = torch.gather(flat, 3, order).view(b, c, t, self.k, p)
            centre = flat.unsqueeze(3)
            edge = F.relu(self.node(centre) + self.edge(moved - 2 * centre)).amax(dim=3)
            return x + edge.view(b, c, t, h, w)
        # neighbour maps: nbr[b, t, c, j] = flat[b, idx[b, t, c, j], t]
        per_frame = flat.transpose(1, 2)  # (B, T, C, P)
        batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
        frame = torch.arange(t, device=x.device).view(1, t, 1, 1)
        nbr = per_frame[batch, frame, idx]  # (B, T, C, k, P)
        centre = per_frame.unsqueeze(3)
        edge = F.relu(self.node(centre) + self.edge(nbr - centre)).amax(dim=3)  # (B, T, C, P)
        assert self.mix is not None
        return x + self.mix(edge.transpose(1, 2).reshape(b, c, t, h, w))


class F5CBlock(nn.Module):
    """FCC then CCC: (B, C, T, h, w) -> same shape (or a single frame (B, C, h, w) -> same shape).

    Global spatial context first, then the similarity graph.
    """

    def __init__(
        self,
        channels: int,
        size: tuple[int, int],
        k: int = 4,
        graph: CCCGraph = "positions",
        norm: Norm = "group",
        groups: int = 8,
    ) -> None:
        super().__init__()
        self.fcc = FCC(channels, size, norm, groups)
        self.ccc = CCC(channels, size, k, graph)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, T, h, w) -> (B, C, T, h, w), or (B, C, h, w) -> (B, C, h, w)."""
        return _frames(lambda y: self.ccc(self.fcc(y)), x)


class F5CBackbone(nn.Module):
    """Shared stem, then F5C block 1 on each pair's first frame and block 2 on its second.

    forward: clip (B, T, 1, H, W) -> (first, second), each (B, C, T-1, H/8, W/8); pair k is (frame k, frame k+1),
    so first[:, :, k] comes from block1 on stem frame k and second[:, :, k] from block2 on stem frame k+1. As in
    the release, a middle frame passes through both blocks (as the second frame of one pair and the first of
    the next). The stem runs once on (B, 1, T, H, W), block 1 once on frames 0..T-2 and block 2 once on frames
    1..T-1, always with the clip as the batch item (see the module docstring). With GroupNorm, the norms'
    statistics span the frames each layer sees, so a frame's features depend on the rest of its clip (never on
    other clips); with eval-mode BatchNorm every frame is processed on its own.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        side = config.feature_size
        size = (side, side)
        self.stem = Stem(
            1, config.stem_widths, config.channels, config.stem_activation, config.norm, config.norm_groups
        )
        blocks = [
            F5CBlock(config.channels, size, config.k, config.ccc_graph, config.norm, config.norm_groups)
            for _ in range(2)
        ]
        self.block1, self.block2 = blocks

    def forward(self, clip: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, 1, H, W) -> (first, second), each (B, C, T-1, H/8, W/8)."""
        if clip.dim() != 5 or clip.shape[1] < 2:
            raise ValueError(f"expected a clip (B, T>=2, 1, H, W), got shape {tuple(clip.shape)}")
        feats = self.stem(clip.transpose(1, 2))  # (B, C, T, h, w)
        return self.block1(feats[:, :, :-1]), self.block2(feats[:, :, 1:])

    @staticmethod
    def stack_pairs(first: Tensor, second: Tensor) -> Tensor:
        """Interleave pair features in time as the release does: [first_0, second_0, first_1, second_1, ...].

        (B, C, T-1, h, w) twice -> (B, C, 2(T-1), h, w), ready for a 3-D convolution over time.
        """
        b, c, pairs, h, w = first.shape
        return torch.stack((first, second), dim=3).reshape(b, c, 2 * pairs, h, w)
