"""Crash-safe files: everything durable is written to a temporary sibling and renamed.

A run killed half-way leaves either the old file or the new one, never a torn one, so a resumed
run never reads a half-written checkpoint, index or feature store as valid. The temporary file is
created with mode ``0666 & ~umask``, as ``open`` would, so another user can read what the umask
lets them (``tempfile.mkstemp`` would make every output 0600).

File-system failures on outputs (``--out`` naming a file, a folder this user may not write, a full
or read-only disk) are user errors: :func:`os_error` turns the ``OSError`` into one
:class:`DeepEMDError` naming the path and the fix, and the CLI prints it with exit code 2.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from deepemd.errors import DeepEMDError

_FIXES = {
    errno.EEXIST: "a file stands where a folder is needed: give a folder path, or move the file away",
    errno.ENOTDIR: "a file stands where a folder is needed: give a folder path, or move the file away",
    errno.EISDIR: "a folder stands where a file is written: give another path, or move the folder away",
    errno.EACCES: "give this user the access it needs (chmod / chown), or choose a path it may use",
    errno.EPERM: "give this user the access it needs (chmod / chown), or choose a path it may use",
    errno.EROFS: "the file system is read-only: write to a folder on a writable disk",
    errno.ENOSPC: "the disk is full: free some space, or write to a folder on another disk",
    errno.EDQUOT: "the disk quota is used up: free some space, or write to a folder on another disk",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.ELOOP: "the path has a symbolic-link loop: give the real folder",
}
#: ``errno`` values that come from the user's file system, not from a bug: :func:`os_error` and
#: the CLI turn them into one message.
USER_ERRNOS = frozenset(_FIXES)


def os_error(exc: OSError, path: str | Path | None = None, action: str = "create or write") -> DeepEMDError:
    """One user error for ``exc`` (met trying to ``action`` ``path``), naming ``path`` (else the
    file the system named: never a temporary name the user did not choose) and a fix for that
    kind of failure."""
    named = path if path is not None else exc.filename
    reason = exc.strerror or type(exc).__name__
    return DeepEMDError(
        f"cannot {action} it ({reason})",
        named,
        _FIXES.get(exc.errno or 0, "check the path and that this user may write it"),
    )


def check_output_folder(path: str | Path) -> Path:
    """Refuse, before any work, an output folder that cannot be made: ``path`` is an existing
    file, a file stands on its way, or its nearest existing folder is not writable by this user.
    Creates nothing, so a run that fails later for another reason leaves no empty folder."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise DeepEMDError(
            "--out names an existing file, not a folder",
            path,
            "give --out a new or existing folder, or move the file away",
        )
    existing = next((p for p in (path, *path.absolute().parents) if p.exists()), Path("/"))
    if not existing.is_dir():
        raise DeepEMDError(
            "--out lies under a file, not a folder",
            existing,
            "give --out a path whose parents are folders, or move the file away",
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DeepEMDError(
            "--out cannot be created or written by this user (permission denied)", existing, _FIXES[errno.EACCES]
        )
    return path


def output_folder(path: str | Path) -> Path:
    """Create ``path`` (and its parents) to write outputs into, or raise one DeepEMDError."""
    path = Path(path)
    if path.is_dir():
        return path
    check_output_folder(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, path) from None
    return path


def _create_temp(path: Path) -> Path:
    """A new empty file beside ``path``, created with the umask's mode (``os.open`` applies it)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # a name another writer drew: draw again
            continue


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The parent folder is created if needed. An ``OSError`` of the user's file system (see
    :data:`USER_ERRNOS`) on the temporary file or ``path`` becomes a :class:`DeepEMDError`."""
    path = Path(path)
    output_folder(path.parent)
    try:
        tmp_path = _create_temp(path)
    except OSError as exc:
        raise os_error(exc, path) from None
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:  # make the bytes durable before the rename
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        ours = exc.filename is None or Path(exc.filename) in (tmp_path, path)
        if ours and exc.errno in USER_ERRNOS:
            raise os_error(exc, path) from None
        raise
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
    except Exception as exc:  # noqa: BLE001 -- torch raises many types for truncated / foreign files
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
