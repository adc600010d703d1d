"""Refuse, before training, a model whose per-sample gradients Opacus would get wrong, naming the layer.

Opacus's ``ModuleValidator`` looks layers up by exact type and its messages do not say where the layer sits
(its own TODO). The release's BatchNorm here is a subclass (``models.layers._AnyBatchNorm``), which Opacus
would let through to functorch: each sample would be normalised with batch statistics that mix samples,
and the per-sample gradients would be wrong. So any ``_BatchNorm`` (subclasses included) is refused, and
every error names the layer's path in the model.
"""

from __future__ import annotations

from opacus.validators import ModuleValidator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

BATCHNORM_FIX = (
    "BatchNorm mixes the samples of a batch, so per-sample clipping cannot bound one sample's influence; "
    "build the model with norm='group' (models.config.ModelConfig.norm, the lite and mol presets' default) "
    "or replace it with GroupNorm (opacus.validators.ModuleValidator.fix)"
)


class PrivacyIncompatibleModel(ValueError):
    """The model has layers differentially private training cannot handle; the message names them."""


def layer_problems(name: str, module: nn.Module) -> list[str]:
    """What is wrong with one layer under per-sample clipping, as readable sentences (none: fine)."""
    if isinstance(module, _BatchNorm):
        return [f"{name or 'the model'} ({type(module).__name__}): {BATCHNORM_FIX}"]
    validator = ModuleValidator.VALIDATORS.get(type(module))
    if validator is None or not any(p.requires_grad for p in module.parameters(recurse=False)):
        return []
    return [f"{name or 'the model'} ({type(module).__name__}): {error}" for error in validator(module)]


def validate_model(model: nn.Module) -> None:
    """PrivacyIncompatibleModel listing every offending layer by its path, with the fix."""
    problems = [problem for name, module in model.named_modules() for problem in layer_problems(name, module)]
    if problems:
        raise PrivacyIncompatibleModel(
            "this model cannot be trained with differential privacy:\n  " + "\n  ".join(problems)
        )
