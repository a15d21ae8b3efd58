"""What both jobs' training checkpoints share: generator states, the resume check, the epoch log.

A training checkpoint is one dict of tensors and plain types written by
:func:`deepemd.io.save_checkpoint` (temp file + rename) and read with ``weights_only=True``.
Resuming restores the generators saved with it (:func:`rng_state` / :func:`restore_rng`), so a
killed run continues with the draws an uninterrupted run would have made, and refuses to resume
when an option that shapes the run changed (:func:`check_resumable`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Any, Iterable, cast

import numpy as np
import torch

from deepemd.errors import DeepEMDError
from deepemd.io import atomic_path


def rng_state() -> dict[str, Any]:
    """Generator states as tensors and ints (numpy's tuple is split so weights_only can load it)."""
    _, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos),
        "numpy_gauss": (int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the generators :func:`rng_state` saved (those a checkpoint holds)."""
    torch.set_rng_state(state["torch"])
    if "numpy_keys" in state:
        has_gauss, cached = state["numpy_gauss"]
        np.random.set_state(
            ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, cached)
        )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def check_resumable(saved: dict[str, Any], config: Any, frozen: Iterable[str], path: str | Path) -> None:
    """One clear error when an option in ``frozen`` differs between the checkpoint's saved config
    and this run's ``config`` (a dataclass): resuming would silently mix two different runs."""
    now = dataclasses.asdict(config)
    for key in frozen:
        if key in saved and key in now and _plain(saved[key]) != _plain(now[key]):
            raise DeepEMDError(
                f"cannot resume: option '{key}' was {saved[key]!r} in the checkpoint, now {now[key]!r}",
                path,
                f"use the same --{key.replace('_', '-')} or a new --out folder",
            )


def append_log(path: Path, row: dict[str, Any]) -> None:
    """Rewrite a CSV log atomically with ``row`` appended (tiny file, one row per epoch)."""
    old = path.read_text() if path.exists() else ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(row))
    if not old:
        writer.writeheader()
    writer.writerow(row)
    with atomic_path(path) as tmp:
        tmp.write_text(old + buf.getvalue())


__all__ = ["rng_state", "restore_rng", "check_resumable", "append_log"]
