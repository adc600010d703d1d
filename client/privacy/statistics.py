"""Private statistics: the site's AU co-occurrence counts released through the Gaussian mechanism.

The counts are a sum over clips, so one clip changes them by its own contribution: the upper triangle of
``a a^T`` for its multi-hot AU vector ``a`` (diagonal included; the lower triangle repeats it) plus 1 in the
sample count. That contribution is clipped to L2 norm :data:`QUERY_CLIP` (a clip with at most
:data:`QUERY_MAX_AUS` AUs passes unchanged; one with more is scaled down), so the release has L2 sensitivity
:data:`QUERY_CLIP` under adding or removing a clip, and Gaussian noise of std ``noise_multiplier * QUERY_CLIP``
on every released value gives the RDP of one Gaussian step at sample rate 1 (Mironov, CSF 2017), which the
site's ledger counts (:class:`client.privacy.accountant.PrivacyLedger`). Rounding, clamping at zero and
capping each pair count by its two AU counts are post-processing: they cost no privacy and keep the matrix a
valid count matrix for the server.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

QUERY_MAX_AUS = 4
"""Clips coding at most this many AUs enter the noised counts unscaled (CASME II / SAMM clips code 1-4 AUs)."""
QUERY_CLIP = math.sqrt(QUERY_MAX_AUS * (QUERY_MAX_AUS + 1) / 2 + 1)


def clip_contributions(targets: Tensor) -> tuple[Tensor, Tensor]:
    """Multi-hot targets (N, A) -> each clip's (A, A) co-occurrence matrix and sample count, scaled so that the
    upper triangle plus the count has L2 norm at most :data:`QUERY_CLIP`: ((N, A, A), (N,))."""
    hot = (targets > 0.5).to(torch.float64)
    pairs = hot[:, :, None] * hot[:, None, :]
    upper = torch.triu(torch.ones(hot.shape[1], hot.shape[1], dtype=torch.bool))
    norms = (pairs[:, upper].square().sum(dim=1) + 1.0).sqrt()
    scale = (QUERY_CLIP / norms).clamp(max=1.0)
    return pairs * scale[:, None, None], scale


def noised_cooccurrence(targets: Tensor, noise_multiplier: float, generator: torch.Generator) -> tuple[Tensor, int]:
    """(A, A) co-occurrence counts and the sample count of the coded clips, with Gaussian noise (see module).

    Noise is drawn for the upper triangle and mirrored, so the released matrix is symmetric like the true one.
    """
    pairs, counts = clip_contributions(targets)
    size = targets.shape[1]
    std = noise_multiplier * QUERY_CLIP
    upper = torch.triu(torch.ones(size, size, dtype=torch.bool))
    noise = torch.zeros(size, size, dtype=torch.float64)
    noise[upper] = torch.normal(0.0, std, (int(upper.sum()),), generator=generator, dtype=torch.float64)
    noise = noise + torch.triu(noise, diagonal=1).T
    released = (pairs.sum(dim=0) + noise).round().clamp_min(0)
    diagonal = released.diagonal()
    released = torch.minimum(released, torch.minimum(diagonal[:, None], diagonal[None, :]))
    samples = float(counts.sum()) + float(torch.normal(0.0, std, (1,), generator=generator, dtype=torch.float64))
    return released.to(torch.float32), max(round(samples), 0)
