"""FED-PsyAU's hierarchical AU-coordination graph head.

After Li, Qian, Zhao and Wang, "FED-PsyAU: Privacy-Preserving Micro-Expression Recognition via Psychological
AU Coordination and Dynamic Facial Motion Modeling", ICCV 2025 (arXiv 2507.20557). Own implementation; the
psychological masks and the published co-occurrence matrix come from ``models/data/au_coordination_prior.json``.

Pipeline of :class:`AUGraphHead` (``B`` samples, ``C`` feature channels, ``D = node_dim``)::

    features (B, C, h, w), landmarks (B, 68, 2)
      -> RegionPooling            (B, 12, C)   Gaussian windows around two centres per AU
      -> Linear + node embedding  (B, 12, D)
      -> upper GraphAttention on AU1..AU7  (6 nodes, upper mask)  \\ concatenated
      -> lower GraphAttention on AU9..AU17 (6 nodes, lower mask)  /  (B, 12, D)
      -> global GraphAttention on all 12 (global mask: self-loops + cross-region edges)
      -> AU logits (B, 12) from one shared Linear(D, 1); embedding (B, 12 * D)

Each graph layer mixes learned GAT attention with the statistical co-occurrence prior, weighted by
``beta * r`` (the release's rule; ``r`` decays from 1 to 0 over training), over the psychological mask's
edges only. Unlike the release, non-edges get ``-inf`` before the softmax, so attention never leaks onto them.

Landmarks are iBUG-68 (0-based) with x, y normalised to [0, 1] over the crop (``pixel / (size - 1)``).
"""

from __future__ import annotations

import functools
import json
import textwrap
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from partitions.action_units import AU_NODES

from .config import AUGraphConfig
from .landmarks import inter_ocular_distance

N_AUS = len(AU_NODES)
N_UPPER = 6  # AU1, 2, 4, 5, 6, 7 come first in AU_NODES; AU9 .. AU17 follow
N_LANDMARKS = 68
MIN_INTEROCULAR = 1e-2  # floor (crop units) so degenerate landmarks give a sharp window, not a NaN


# ----------------------------------------------------------------------------------------------- prior


@dataclass(frozen=True)
class AUPrior:
    """FED-PsyAU's priors as float32 tensors, nodes in :data:`AU_NODES` order.

    ``upper_mask`` (6, 6) and ``lower_mask`` (6, 6): within-region adjacency; ``global_mask`` (12, 12):
    self-loops plus the cross-region edges; ``cooccurrence`` (12, 12): the release's row-normalised
    statistical matrix (its source data set is unknown, so it is a fallback for site counts).
    """

    aus: tuple[int, ...]
    upper_mask: Tensor
    lower_mask: Tensor
    global_mask: Tensor
    cooccurrence: Tensor


@functools.cache
def _prior_text() -> str:
    """The json file's text (immutable, so caching it shares no mutable state)."""
    return resources.files("models").joinpath("data/au_coordination_prior.json").read_text(encoding="utf-8")


def _au_number(name: str) -> int:
    return int(name.upper().removeprefix("AU"))


def load_prior() -> AUPrior:
    """Read ``models/data/au_coordination_prior.json``; fresh tensors on every call.

    Raises ValueError when the file's AU order differs from :data:`partitions.action_units.AU_NODES` (every
    matrix would silently be permuted against the targets) or a matrix has the wrong shape.
    """
    raw = json.loads(_prior_text())
    aus = tuple(_au_number(name) for name in raw["aus"])
    if aus != AU_NODES:
        raise ValueError(f"AU prior lists AUs {aus}, but the targets use AU_NODES={AU_NODES}: the orders must match")
    upper = tuple(_au_number(name) for name in raw["upper_face"])
    lower = tuple(_au_number(name) for name in raw["lower_face"])
    if upper != AU_NODES[:N_UPPER] or lower != AU_NODES[N_UPPER:]:
        raise ValueError(f"AU prior's face regions {upper} / {lower} are not the first / last six of {AU_NODES}")
    masks = raw["psychological_masks"]

    def matrix(values: list, n: int, name: str) -> Tensor:
        tensor = torch.tensor(values, dtype=torch.float32)
        if tensor.shape != (n, n):
            raise ValueError(f"AU prior {name} has shape {tuple(tensor.shape)}, expected ({n}, {n})")
        return tensor

    return AUPrior(
        aus=aus,
        upper_mask=matrix(masks["upper"], N_UPPER, "upper mask"),
        lower_mask=matrix(masks["lower"], N_AUS - N_UPPER, "lower mask"),
        global_mask=matrix(masks["global"], N_AUS, "global mask"),
        cooccurrence=matrix(raw["statistical_cooccurrence"]["global"], N_AUS, "global co-occurrence"),
    )


def cooccurrence_counts(targets: Tensor) -> Tensor:
    """Multi-hot AU targets (N, 12) -> count matrix (12, 12): ``C[i, j]`` = samples coding both AU i and AU j.

    ``C[i, i]`` is the number of samples coding AU i. Count matrices add up across sites, so a federation
    sums the sites' matrices and then calls :func:`cooccurrence_from_counts`.
    """
    if targets.ndim != 2 or targets.shape[1] != N_AUS:
        raise ValueError(f"targets have shape {tuple(targets.shape)}, expected (N, {N_AUS})")
    hot = (targets > 0.5).to(torch.float64)
    return (hot.T @ hot).to(torch.float32)


def cooccurrence_from_counts(counts: Tensor) -> Tensor:
    """Count matrix (12, 12) (see :func:`cooccurrence_counts`) -> ``P[i, j] = count(i and j) / count(i)``.

    Takes counts, not targets, so sites only ever share the additive (12, 12) matrix. ``P`` is the conditional
    probability of AU j given AU i (diagonal 1); rows of AUs never seen (``count(i) = 0``) become identity rows.
    :meth:`AUGraphHead.set_cooccurrence` row-normalises it, which gives the release's convention
    ``count(i and j) / sum_k count(i and k)``. Returns float32 on the input's device.
    """
    if counts.shape != (N_AUS, N_AUS):
        raise ValueError(
            f"counts have shape {tuple(counts.shape)}, expected ({N_AUS}, {N_AUS}); "
            "turn multi-hot targets (N, 12) into counts with cooccurrence_counts"
        )
    counts = counts.to(torch.float64)
    if not torch.isfinite(counts).all():
        raise ValueError("counts must be finite")
    if (counts < 0).any():
        raise ValueError("counts must be non-negative")
    seen = counts.diagonal() > 0
    eye = torch.eye(N_AUS, dtype=counts.dtype, device=counts.device)
    ratio = counts / counts.diagonal().clamp_min(1e-12)[:, None]
    return torch.where(seen[:, None], ratio, eye).to(torch.float32)


def _row_normalise(matrix: Tensor) -> Tensor:
    """Rows scaled to sum 1; rows summing to 0 become identity rows (no evidence: the AU keeps to itself)."""
    sums = matrix.sum(dim=-1, keepdim=True)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    return torch.where(sums > 0, matrix / sums.clamp_min(torch.finfo(matrix.dtype).tiny), eye)


# ----------------------------------------------------------------------------------------------- regions

# Each AU's two centres (subject's right = image left first), as weights over the 68 landmarks. Every weight
# vector sums to 1 (offsets are landmark differences, summing to 0), so the centres move with any affine
# transform of the face. ``DOWN`` is the nose (27 -> 33), the face's own vertical axis.
_REGION_TABLE = """
| AU | region                 | subject's right (image left)   | subject's left (image right)   |
|----|------------------------|--------------------------------|--------------------------------|
|  1 | above the inner brows  | mean(20, 21) - 0.15 DOWN       | mean(22, 23) - 0.15 DOWN       |
|  2 | above the outer brows  | mean(17, 18) - 0.15 DOWN       | mean(25, 26) - 0.15 DOWN       |
|  4 | between the brows      | 0.75 p21 + 0.25 p22 + 0.1 DOWN | 0.75 p22 + 0.25 p21 + 0.1 DOWN |
|  5 | upper lids             | mean(37, 38)                   | mean(43, 44)                   |
|  6 | cheeks below the eyes  | mean(36, 41) + 0.4 DOWN        | mean(45, 46) + 0.4 DOWN        |
|  7 | lower lids             | mean(40, 41)                   | mean(46, 47)                   |
|  9 | nose bridge and sides  | mean(28, 29, 31)               | mean(28, 29, 35)               |
| 10 | upper lip below nose   | (2 p50 + p31) / 3              | (2 p52 + p35) / 3              |
| 12 | lip corners            | p48                            | p54                            |
| 14 | just outside corners   | p48 + 0.15 (p48 - p54)         | p54 + 0.15 (p54 - p48)         |
| 15 | below the lip corners  | p48 + 0.25 DOWN                | p54 + 0.25 DOWN                |
| 17 | chin boss (midline)    | mean(57, 8)                    | mean(57, 8)                    |
"""


def _points(*indices: int) -> np.ndarray:
    """Weights (68,) of the mean of the given landmarks."""
    weights = np.zeros(N_LANDMARKS)
    np.add.at(weights, list(indices), 1.0 / len(indices))
    return weights


def region_weights() -> Tensor:
    """The constant (12, 2, 68) float32 map from landmarks to AU centres; see :func:`au_region_centres`."""
    p = _points
    down = p(33) - p(27)
    mouth_out_right = p(48) - p(54)
    centres = {
        1: (p(20, 21) - 0.15 * down, p(22, 23) - 0.15 * down),
        2: (p(17, 18) - 0.15 * down, p(25, 26) - 0.15 * down),
        4: (0.75 * p(21) + 0.25 * p(22) + 0.1 * down, 0.75 * p(22) + 0.25 * p(21) + 0.1 * down),
        5: (p(37, 38), p(43, 44)),
        6: (p(36, 41) + 0.4 * down, p(45, 46) + 0.4 * down),
        7: (p(40, 41), p(46, 47)),
        9: (p(28, 29, 31), p(28, 29, 35)),
        10: ((2 * p(50) + p(31)) / 3, (2 * p(52) + p(35)) / 3),
        12: (p(48), p(54)),
        14: (p(48) + 0.15 * mouth_out_right, p(54) - 0.15 * mouth_out_right),
        15: (p(48) + 0.25 * down, p(54) + 0.25 * down),
        17: (p(57, 8), p(57, 8)),
    }
    weights = np.stack([np.stack(centres[au]) for au in AU_NODES])  # (12, 2, 68)
    return torch.tensor(weights, dtype=torch.float32)


def au_region_centres(landmarks: Tensor, weights: Tensor | None = None) -> Tensor:
    """Landmarks (B, 68, 2) -> AU centres (B, 12, 2, 2): [batch, AU, side (subject's right, left), (x, y)].

    ``weights`` is :func:`region_weights` (built on the landmarks' device when omitted). Midline AUs (AU17)
    repeat one point. Landmark choice per AU (``pN`` = landmark N, ``DOWN = p33 - p27`` along the nose):
    """
    if weights is None:
        weights = region_weights().to(device=landmarks.device, dtype=landmarks.dtype)
    return torch.einsum("ksl,bld->bksd", weights, landmarks)


au_region_centres.__doc__ = (au_region_centres.__doc__ or "") + textwrap.indent(_REGION_TABLE, "    ")


class RegionPooling(nn.Module):
    """Pool a feature map into one vector per AU with Gaussian windows around its two landmark centres.

    Why windows and not crops: they are smooth in the centres, work at any feature resolution and stay one
    einsum over batch, AUs and pixels. Landmarks are detached: predicted landmarks have their own loss, and
    training them through this path would let the AU loss move landmarks to wherever pooling is convenient.
    """

    def __init__(self, sigma: float) -> None:
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"sigma={sigma}: the window width must be positive")
        self.sigma = float(sigma)
        self.register_buffer("region_weights", region_weights(), persistent=False)

    def weights(self, landmarks: Tensor, size: tuple[int, int]) -> Tensor:
        """Landmarks (B, 68, 2) -> pooling windows (B, 12, h, w), each summing to 1 over the map.

        Cell (i, j) of an h x w map sits at ((j + 0.5) / w, (i + 0.5) / h) in crop units. Window std is
        ``sigma`` times the inter-ocular distance (outer eye corners 36, 45). The two Gaussians of an AU are
        added in log space (logsumexp) and normalised by a softmax over cells, so far-off centres cannot
        underflow to 0 / 0.
        """
        landmarks = landmarks.detach()
        h, w = size
        centres = au_region_centres(landmarks, self.region_weights.to(landmarks.dtype))  # (B, 12, 2, 2)
        std = self.sigma * inter_ocular_distance(landmarks).clamp_min(MIN_INTEROCULAR)  # (B,)
        ys = (torch.arange(h, device=landmarks.device, dtype=landmarks.dtype) + 0.5) / h
        xs = (torch.arange(w, device=landmarks.device, dtype=landmarks.dtype) + 0.5) / w
        dx2 = (xs[None, None, None, None, :] - centres[..., 0, None, None]) ** 2  # (B, 12, 2, 1, w)
        dy2 = (ys[None, None, None, :, None] - centres[..., 1, None, None]) ** 2  # (B, 12, 2, h, 1)
        log_window = -(dx2 + dy2) / (2 * std[:, None, None, None, None] ** 2)  # (B, 12, 2, h, w)
        logits = torch.logsumexp(log_window, dim=2).flatten(2)  # (B, 12, h * w)
        return torch.softmax(logits, dim=-1).view(-1, N_AUS, h, w)

    def forward(self, features: Tensor, landmarks: Tensor) -> Tensor:
        """Features (B, C, h, w), landmarks (B, 68, 2) -> node features (B, 12, C)."""
        windows = self.weights(landmarks.to(features.dtype), (features.shape[-2], features.shape[-1]))
        return torch.einsum("bkhw,bchw->bkc", windows, features)


# ----------------------------------------------------------------------------------------------- graph


def _as_batch_r(r: float | Tensor, batch: int, like: Tensor) -> Tensor:
    """r as float, shape () or (B,) -> (B or 1, 1, 1) on ``like``'s device and dtype."""
    r = torch.as_tensor(r, dtype=like.dtype, device=like.device)
    if r.ndim == 0:
        return r.view(1, 1, 1)
    if r.shape != (batch,):
        raise ValueError(
            f"r has shape {tuple(r.shape)}; give a float, a scalar tensor or one value per sample ({batch},)"
        )
    return r.view(batch, 1, 1)


class GraphAttention(nn.Module):
    """One GAT layer over ``n`` nodes with a fixed edge mask and a co-occurrence prior mixed into attention.

    ``e_ij = LeakyReLU_0.2(a_src(W h_i) + a_dst(W h_j))`` on mask edges, ``-inf`` elsewhere, softmax over j;
    ``A = L1normalise((1 - beta r) softmax + beta r prior_edges)``, where ``prior_edges`` is the prior restricted
    to the mask's edges and row-renormalised (uniform over the edges where the prior puts no mass on them);
    ``h_i' = LayerNorm(h_i + ELU(sum_j A_ij W h_j))``. Attention stays within each sample.

    ``r`` lies in [0, 1] (1 early in training, decaying to 0). ``a_src`` and ``a_dst`` have no bias: a bias
    shifts a whole row of scores, which the softmax ignores but for the LeakyReLU kink.
    """

    def __init__(self, dim: int, mask: Tensor, beta: float = 0.3) -> None:
        super().__init__()
        mask = torch.as_tensor(mask)
        if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
            raise ValueError(f"mask has shape {tuple(mask.shape)}; it must be square (n, n)")
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must be binary (0 = no edge, 1 = edge)")
        if not (mask != 0).any(dim=1).all():
            raise ValueError("every node needs at least one edge in the mask (a row of zeros has no attention)")
        self.beta = float(beta)
        self.register_buffer("mask", mask != 0, persistent=False)  # bool: stays bool under .to(dtype)
        self.W = nn.Linear(dim, dim)
        self.a_src = nn.Linear(dim, 1, bias=False)
        self.a_dst = nn.Linear(dim, 1, bias=False)
        self.norm = nn.LayerNorm(dim)

    def prior_on_edges(self, prior: Tensor) -> Tensor:
        """Prior (n, n) -> its edge entries, rows renormalised to 1; rows with no mass on edges: uniform."""
        mask = self.mask.to(prior.dtype)
        kept = prior * mask
        sums = kept.sum(dim=-1, keepdim=True)
        uniform = mask / mask.sum(dim=-1, keepdim=True)
        return torch.where(sums > 0, kept / sums.clamp_min(torch.finfo(prior.dtype).tiny), uniform)

    def forward(
        self, nodes: Tensor, prior: Tensor, r: float | Tensor = 0.0, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Nodes (B, n, dim), prior (n, n), r (float, () or (B,)) -> nodes (B, n, dim) [, attention (B, n, n)]."""
        projected = self.W(nodes)  # (B, n, dim)
        scores = F.leaky_relu(self.a_src(projected) + self.a_dst(projected).transpose(1, 2), 0.2)  # (B, n, n)
        scores = scores.masked_fill(~self.mask, float("-inf"))
        learned = torch.softmax(scores, dim=-1)
        weight = self.beta * _as_batch_r(r, nodes.shape[0], nodes)
        attention = F.normalize(
            (1 - weight) * learned + weight * self.prior_on_edges(prior.to(nodes.dtype)), p=1, dim=-1
        )
        out = self.norm(nodes + F.elu(attention @ projected))
        return (out, attention) if return_attention else out


class AUGraphHead(nn.Module):
    """FED-PsyAU's hierarchical AU graph: region pooling, upper and lower graphs, then the global graph.

    ``forward(features (B, C, h, w), landmarks (B, 68, 2), r)`` returns AU logits (B, 12) in
    :data:`AU_NODES` order and the graph embedding (B, 12 * node_dim). Every trainable parameter sits in an
    nn.Linear, nn.Embedding or nn.LayerNorm, so Opacus computes per-sample gradients natively.

    The co-occurrence prior is the buffer ``cooccurrence`` (12, 12), initialised from the published matrix;
    the federation replaces it with :meth:`set_cooccurrence`. It is persistent (saved and shipped with the
    state dict) so a checkpoint keeps the prior it was trained with.
    """

    def __init__(self, in_channels: int, config: AUGraphConfig | None = None) -> None:
        super().__init__()
        config = config or AUGraphConfig()
        prior = load_prior()
        dim = config.node_dim
        self.node_dim = dim
        self.pool = RegionPooling(config.region_sigma)
        self.project = nn.Linear(in_channels, dim)
        self.node_embedding = nn.Embedding(N_AUS, dim)  # which AU a node is: the pooled features do not say
        self.register_buffer("node_index", torch.arange(N_AUS), persistent=False)
        self.upper_graph = GraphAttention(dim, prior.upper_mask, config.beta)
        self.lower_graph = GraphAttention(dim, prior.lower_mask, config.beta)
        self.global_graph = GraphAttention(dim, prior.global_mask, config.beta)
        self.classifier = nn.Linear(dim, 1)  # shared by all AUs: nodes already differ by their embedding
        self.register_buffer("cooccurrence", _row_normalise(prior.cooccurrence))

    @property
    def embedding_dim(self) -> int:
        """Width of the flattened graph embedding: 12 * node_dim."""
        return N_AUS * self.node_dim

    @torch.no_grad()
    def set_cooccurrence(self, matrix: Tensor | np.ndarray) -> None:
        """Replace the prior with a (12, 12) non-negative finite matrix, row-normalised (zero rows: identity)."""
        matrix = torch.as_tensor(matrix, dtype=torch.float64)
        if matrix.shape != (N_AUS, N_AUS):
            raise ValueError(f"co-occurrence matrix has shape {tuple(matrix.shape)}, expected ({N_AUS}, {N_AUS})")
        if not torch.isfinite(matrix).all():
            raise ValueError("co-occurrence matrix must be finite (found NaN or inf)")
        if (matrix < 0).any():
            raise ValueError("co-occurrence matrix must be non-negative")
        normalised = _row_normalise(matrix).to(device=self.cooccurrence.device, dtype=self.cooccurrence.dtype)
        self.cooccurrence.copy_(normalised)

    def forward(self, features: Tensor, landmarks: Tensor, r: float | Tensor = 0.0) -> tuple[Tensor, Tensor]:
        """Features (B, C, h, w), landmarks (B, 68, 2), r (float, () or (B,)) -> (logits (B, 12), embedding)."""
        pooled = self.pool(features, landmarks)  # (B, 12, C)
        index = self.node_index.expand(features.shape[0], N_AUS)
        nodes = self.project(pooled) + self.node_embedding(index)  # (B, 12, D)
        prior = self.cooccurrence.to(nodes.dtype)
        upper = self.upper_graph(nodes[:, :N_UPPER], prior[:N_UPPER, :N_UPPER], r)
        lower = self.lower_graph(nodes[:, N_UPPER:], prior[N_UPPER:, N_UPPER:], r)
        nodes = self.global_graph(torch.cat([upper, lower], dim=1), prior, r)
        return self.classifier(nodes).squeeze(-1), nodes.flatten(1)
