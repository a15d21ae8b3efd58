"""Where the exact solver's threads come from: torch's own OpenMP pool when torch runs on one.

After any parallel torch op, libgomp's idle workers spin (``GOMP_SPINCOUNT``, read once when
the library loads) for milliseconds before they sleep. Threads of our own pool then share the
cores with those spinners: on 2 cores a 1,000-problem solve right after a torch op took ~1.7x
as long as without it. Run on the *same* pool instead, the spinning workers are exactly the
threads that pick the solve up, at once: ``GOMP_parallel`` of torch's libgomp (through
ctypes, which releases the GIL) calls back into Python on each pool thread, and the callback
enters the ``nogil`` kernel. Without an OpenMP torch (or in a forked child, where libgomp's
pool is not usable), a ``ThreadPoolExecutor`` plus the calling thread do the same work.
"""

from __future__ import annotations

import ctypes
import os
import queue
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

#: The process that loaded this module: libgomp's pool is not valid in a forked child.
_PID = os.getpid()
_POOL: tuple[int, int, ThreadPoolExecutor] | None = None
_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _torch_gomp_parallel():
    """``GOMP_parallel`` of the libgomp torch itself loaded, or None (no OpenMP backend, or a
    torch build whose OpenMP runtime is not a libgomp next to it)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    try:  # the same path torch loaded, so dlopen hands back that very library
        fn = ctypes.CDLL(path).GOMP_parallel
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    fn.restype = None
    return fn


_GOMP_PARALLEL = _torch_gomp_parallel()
#: Set False to use the own thread pool even where torch's is usable (the benchmark's
#: before/after row).
PREFER_TORCH_POOL = True


def uses_torch_pool() -> bool:
    """Whether :func:`run_on_threads` runs on torch's OpenMP pool in this process."""
    return PREFER_TORCH_POOL and _GOMP_PARALLEL is not None and os.getpid() == _PID


def run_on_threads(work: Callable[[], None], threads: int) -> None:
    """Call ``work()`` on ``threads`` threads at once (the calling thread is one of them) and
    return when every call has; the first exception raised in any call is re-raised here."""
    errors: list[BaseException] = []

    def guarded(_data=None) -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, on the calling thread
            errors.append(exc)

    if uses_torch_pool():
        callback = _CALLBACK(guarded)  # kept alive by this frame during the call
        _GOMP_PARALLEL(ctypes.cast(callback, ctypes.c_void_p), None, threads, 0)
    else:
        helpers = [_thread_pool(threads - 1).submit(guarded) for _ in range(threads - 1)]
        guarded()
        for helper in helpers:
            helper.result()
    if errors:
        raise errors[0]


def run_each_on_threads(work: Callable[[Any], None], items: Iterable[Any], threads: int) -> None:
    """Call ``work(item)`` for every item, on ``threads`` threads (:func:`run_on_threads`) that
    take the items from one queue as they finish the last: a thread the OS delays (the machine
    may be shared) holds back only its own item, not a fixed share of them."""
    pending: queue.SimpleQueue = queue.SimpleQueue()
    for item in items:
        pending.put(item)

    def drain() -> None:
        while True:
            try:
                item = pending.get_nowait()
            except queue.Empty:
                return
            work(item)

    run_on_threads(drain, threads)


def _thread_pool(threads: int) -> ThreadPoolExecutor:
    """One pool per process, grown on demand. Keyed by pid: a forked child (a DataLoader
    worker) inherits the parent's pool object but not its threads, so it gets its own."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] < threads:
        _POOL = (os.getpid(), threads, ThreadPoolExecutor(max_workers=threads, thread_name_prefix="deepemd-exact"))
    return _POOL[2]
