"""The F5C multitask network, its AU-coordination graph head, and its losses.

``build_model(preset("lite"))`` gives the federation's network; the building blocks ``FCC``, ``CCC`` and
``F5CBlock`` are public for reuse and tests.
"""

from .au_graph import AUGraphHead
from .config import ModelConfig, preset
from .f5c import CCC, FCC, F5CBackbone, F5CBlock
from .flow import FlowHead
from .landmarks import LandmarkHead
from .losses import LossWeights, MultitaskLoss
from .network import F5CNet, ModelOutput, build_model

__all__ = [
    "CCC",
    "FCC",
    "AUGraphHead",
    "F5CBackbone",
    "F5CBlock",
    "F5CNet",
    "FlowHead",
    "LandmarkHead",
    "LossWeights",
    "ModelConfig",
    "ModelOutput",
    "MultitaskLoss",
    "build_model",
    "preset",
]
