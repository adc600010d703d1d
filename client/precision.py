"""Training precision: fp32, or bf16 autocast where the hardware computes bf16 natively.

bf16 halves the bytes every convolution moves, so it pays on GPUs and on CPUs with AVX512-BF16 or AMX. Without
them oneDNN emulates bf16: on this project's AVX2 development CPU the ``lite`` network's convolutions ran 6 to 44
times slower in bf16 than in fp32 (``benchmarks/model_step.py`` records the matmul rates per precision). So
``"bf16"`` falls back to fp32, with a warning, where it would be emulated. fp32 stays the default: bf16 rounds
features to 3 significant digits, and whether the micro-motion signal survives that in training has not been
measured on hardware with native bf16 (tests bound the difference of one step: README "Cost of a training step").
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Literal

import torch

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 in hardware (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The dtype to autocast to (None: plain fp32). ``"bf16"`` on hardware without native bf16 warns and gives
    None rather than running emulated bf16, which is slower than fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if native_bf16(device):
        return torch.bfloat16
    warnings.warn(
        f"precision bf16: {torch.device(device)} has no native bf16 (AVX512-BF16, AMX or a bf16 GPU), where it is "
        "slower than fp32; running in fp32 instead",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


@contextlib.contextmanager
def autocast(dtype: torch.dtype | None, device: torch.device | str) -> Iterator[None]:
    """Autocast the forward pass to ``dtype``; a no-op for None (fp32)."""
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
        yield
