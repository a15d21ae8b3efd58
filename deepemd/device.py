"""Pick CUDA when present, CPU otherwise; one place so every job agrees."""

from __future__ import annotations

import torch


def default_device(requested: str | None = None) -> torch.device:
    """``requested`` ("cpu", "cuda", "cuda:1") wins; else CUDA if available, else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
