"""Where derived data lives (``$DEEPEMD_CACHE`` or ``~/.cache/deepemd``) and how a folder is
published atomically: built in a temporary sibling, then renamed into place, so a run killed
half-way never leaves a half-extracted folder that a later run would trust."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    return Path(os.environ.get("DEEPEMD_CACHE") or Path.home() / ".cache" / "deepemd").expanduser()


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; rename it to ``final`` if the block succeeds. If
    another process published ``final`` meanwhile, its copy wins and ours is discarded."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
