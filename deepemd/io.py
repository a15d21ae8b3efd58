"""Crash-safe files: everything durable is written to a temporary sibling and renamed.

A run killed half-way leaves either the old file or the new one, never a torn one, so a resumed
run never reads a half-written checkpoint, index or feature store as valid.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from deepemd.errors import DeepEMDError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:  # make the bytes durable before the rename
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_path`; ``obj`` must hold only tensors and plain types
    so that :func:`load_checkpoint` can read it back with ``weights_only=True``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no pickled code runs), or explain why not."""
    path = Path(path)
    if not path.is_file():
        raise DeepEMDError("checkpoint not found", path, "check the path, or train first to create it")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated / foreign files
        raise DeepEMDError(
            f"not a readable deepemd checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
            path,
            "the file is truncated or was not written by deepemd; delete it and re-run to recreate it",
        ) from None
    if not isinstance(obj, dict):
        raise DeepEMDError("checkpoint does not hold a dict", path, "use a checkpoint written by deepemd")
    return obj


def load_state_dict_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """``module.load_state_dict`` with a one-line error naming the file when shapes or keys differ."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = [line.strip() for line in str(exc).splitlines() if line.strip()][:3]
        raise DeepEMDError(
            "checkpoint does not match the model (" + "; ".join(first)[:300] + ")",
            path,
            "use the same --backbone / embedding size the checkpoint was trained with",
        ) from None
