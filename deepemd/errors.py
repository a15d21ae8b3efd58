"""The one exception users see.

Every failure caused by the user's input (a missing folder, a corrupt image, an unknown config
key, a checkpoint from another model) is raised as :class:`DeepEMDError` with a message that
names the file and says how to fix it. The CLI prints that message alone and exits with code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class DeepEMDError(Exception):
    """A user-facing error: ``str(err)`` is the whole message shown to the user."""

    def __init__(self, message: str, path: str | Path | None = None, fix: str | None = None):
        parts = [f"{path}: {message}" if path is not None else message]
        if fix:
            parts.append(f"fix: {fix}")
        super().__init__("\n".join(parts))
        self.path = None if path is None else Path(path)
