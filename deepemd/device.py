"""Pick CUDA when present, CPU otherwise, and the precision the backbone runs in at inference;
one place so every job agrees."""

from __future__ import annotations

import contextlib
import warnings
from typing import ContextManager

import torch

from deepemd.errors import DeepEMDError

#: ``--inference-dtype`` values: the autocast dtype of the backbone's inference forwards.
INFERENCE_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}

_WARNED: set[str] = set()


def default_device(requested: str | None = None) -> torch.device:
    """``requested`` ("cpu", "cuda", "cuda:1") wins; else CUDA if available, else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 in hardware (CPUs: AVX512-BF16 or AMX, which
    oneDNN uses; elsewhere torch emulates it, slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def inference_autocast(device: torch.device | str, dtype: str = "float32") -> ContextManager:
    """The context the backbone's inference forwards run in: nothing for ``float32``,
    ``torch.autocast`` for ``bfloat16`` (convolutions and matmuls in bfloat16, the rest in
    float32). Measured by ``benchmarks/pipeline_speed.py --compare-inference-dtypes 1``: the
    whole retrieval eval of 1,000 demo images 1.40x faster on a CPU with AMX, every metric within
    0.7 points (README, "Image retrieval"). Warns once where the hardware lacks bfloat16.

    >>> inference_autocast("cpu").__class__.__name__
    'nullcontext'
    """
    if dtype not in INFERENCE_DTYPES:
        raise DeepEMDError(f"unknown inference dtype {dtype!r}", fix=f"use one of {', '.join(INFERENCE_DTYPES)}")
    autocast_dtype = INFERENCE_DTYPES[dtype]
    if autocast_dtype is None:
        return contextlib.nullcontext()
    device = torch.device(device)
    if not native_bfloat16(device) and device.type not in _WARNED:
        _WARNED.add(device.type)
        warnings.warn(
            f"{device.type} has no bfloat16 arithmetic: --inference-dtype bfloat16 is emulated and "
            "likely slower than float32 here",
            stacklevel=2,
        )
    return torch.autocast(device_type=device.type, dtype=autocast_dtype)
