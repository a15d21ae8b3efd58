"""Gallery writes as transactions: one writer at a time, built aside, swapped in whole.

A gallery folder ``G`` is several files that must agree (id map, index, store). Rewriting them
in place means a failed or killed run leaves a mix that no longer searches, and two runs at
once interleave. So a writer

1. takes ``.G.lock`` beside ``G`` (``fcntl.flock``, released by the kernel when the process
   dies, so a SIGKILLed run never leaves a stale lock); the file names the holder (pid, host,
   command, start time) for the error the next writer gets;
2. builds the complete new gallery in ``.G.staging`` beside ``G`` (hidden, so a gallery inside a
   data root is never listed as a class); a killed build resumes there;
3. verifies it, then swaps it in with one ``renameat2(RENAME_EXCHANGE)``: readers see the old
   gallery or the new one, never a mix. Where the file system cannot exchange, ``G`` is renamed
   to ``.G.old`` and the staging folder to ``G``; a run killed between the two renames is
   undone by the next writer (``.G.old`` goes back) before it does anything else.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from deepemd.errors import DeepEMDError


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}.staging"


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _old_path(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


_held: dict[Path, int] = {}  # locks this process holds -> nesting depth (the lock is re-entrant)


class GalleryLock:
    """``with GalleryLock(out):`` -- exclusive right to write gallery ``out``, or one DeepEMDError.
    Re-entrant within a process, so a command can take it before its slow setup (loading the
    network) and the gallery writer inside can take it again."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = lock_path(self.out)
        self._fd: int | None = None

    def __enter__(self) -> Self:
        key = Path(os.path.abspath(self.path))
        if key in _held:
            _held[key] += 1
            return self
        if self.out.exists() and not self.out.is_dir():
            raise DeepEMDError(
                "the gallery output exists and is not a folder",
                self.out,
                "give --out a folder path (new, or a gallery to update)",
            )
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise DeepEMDError(
                f"cannot create the gallery's lock file ({exc.strerror})",
                self.path,
                "give --out a folder in a place you can write to",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "details not written yet"
            os.close(fd)
            raise DeepEMDError(
                f"another deepemd run is writing this gallery ({holder})",
                self.out,
                f"wait for it to finish (its lock {self.path} is released when it ends), or write to another --out",
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv)[:500],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        _held[key] = 1
        _undo_half_swap(self.out)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        key = Path(os.path.abspath(self.path))
        _held[key] -= 1
        if _held[key] == 0:
            del _held[key]
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _undo_half_swap(out: Path) -> None:
    old = _old_path(out)
    if old.exists():
        if not out.exists():
            os.rename(old, out)  # killed between the fallback's two renames: the old gallery returns
        else:
            shutil.rmtree(old)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(staging: Path, out: Path) -> None:
    """Make the complete folder ``staging`` the gallery ``out``; the previous one is deleted."""
    if not out.exists():
        os.rename(staging, out)
    elif _exchange(staging, out):
        _fsync_dir(out.parent)
        shutil.rmtree(staging)  # now the previous gallery; a kill here leaves a stale staging folder
    else:
        os.rename(out, _old_path(out))
        os.rename(staging, out)
        shutil.rmtree(_old_path(out))
    _fsync_dir(out.parent)


__all__ = ["GalleryLock", "lock_path", "staging_path", "swap_in"]
