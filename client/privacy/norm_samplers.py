"""Ghost clipping for the F5C network: Opacus 1.6's fast-gradient-clipping module with two norm samplers fixed.

Ghost clipping (Li et al., ICLR 2022; ``grad_sample_mode="ghost"``) runs two backward passes: the first only
measures each sample's gradient norm, the second backpropagates the loss with each sample's clipping factor
folded in, so per-sample gradients are never stored. Opacus 1.6's norm samplers break on this network:

* ``nn.Linear``: Opacus handles 2-D and 3-D inputs only. CCC applies ``nn.Linear(P, P)`` to (B, C, T, k, P);
  for that rank Opacus returns no norm at all, so ``get_norm_sample`` fails (or, after an earlier step,
  would silently reuse a stale norm). Here any rank is flattened to (B, S, features), and the norm is
  computed whichever way is cheaper: ghost (S x S Gram matrices) for short sequences such as the AU graph's
  12 nodes, the per-sample gradient itself where S is large (CCC: S = C * T * k, thousands).
* ``nn.Embedding``: Opacus ``view``s the indices, which fails on the AU head's expanded (non-contiguous) index.

Every other layer (Conv3d, GroupNorm, LayerNorm) goes through its Opacus grad sampler and custom leaf
modules (``CircularConv``, ``AxisEmbedding``) through functorch, inside the same first pass.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import Tensor, nn

NormSample = dict[nn.Parameter, Tensor]


def _weight_norm(activations: Tensor, backprops: Tensor) -> Tensor:
    """||sum_s g_s a_s^T||_F per sample, for (n, S, i) activations and (n, S, o) backprops."""
    steps, inputs, outputs = activations.shape[1], activations.shape[2], backprops.shape[2]
    if steps * (inputs + outputs) < inputs * outputs:  # Gram matrices cost n S^2 (i + o), the gradient n S i o
        gram_g = torch.bmm(backprops, backprops.transpose(1, 2))
        gram_a = torch.bmm(activations, activations.transpose(1, 2))
        return (gram_g * gram_a).sum(dim=(1, 2)).clamp_min(0).sqrt()
    return torch.bmm(backprops.transpose(1, 2), activations).flatten(1).norm(dim=1)


def linear_norm_sample(layer: nn.Linear, activations: list[Tensor], backprops: Tensor) -> NormSample:
    """Per-sample gradient norms of a Linear layer applied to input of any rank (batch first)."""
    n = backprops.shape[0]
    a = activations[0].to(backprops.dtype).reshape(n, -1, layer.in_features)
    g = backprops.reshape(n, -1, layer.out_features)
    norms: NormSample = {}
    if layer.weight.requires_grad:
        norms[layer.weight] = _weight_norm(a, g)
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = g.sum(dim=1).norm(dim=1)
    return norms


_OPACUS_EMBEDDING = GradSampleModuleFastGradientClipping.NORM_SAMPLERS[nn.Embedding]


def embedding_norm_sample(layer: nn.Embedding, activations: list[Tensor], backprops: Tensor) -> NormSample:
    """Opacus's Embedding norm sampler on contiguous indices (it ``view``s them)."""
    return _OPACUS_EMBEDDING(layer, [a.contiguous() for a in activations], backprops)


class GhostClippingModule(GradSampleModuleFastGradientClipping):
    """``GradSampleModuleFastGradientClipping`` with the fixed samplers, kept to this class (Opacus's registry,
    shared by every model in the process, is left as it is)."""

    NORM_SAMPLERS = {  # noqa: RUF012 (class registry, as in Opacus)
        **GradSampleModuleFastGradientClipping.NORM_SAMPLERS,
        nn.Linear: linear_norm_sample,
        nn.Embedding: embedding_norm_sample,
    }
