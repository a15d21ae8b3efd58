"""Keep freed memory in the process instead of handing it back to the OS after every batch.

glibc's malloc serves large blocks (above its mmap threshold, dynamic up to 32 MiB) with a
fresh ``mmap`` and gives them back with ``munmap`` when they are freed. A job that allocates the
same large tensors batch after batch (backbone activations, a rerank row's gathered sets and
cost block) then faults every page in again each time, and the kernel zeroes each fresh page:
that was 17-45% of all CPU time as system time in ``retrieval eval`` (issue 15). With mmap
switched off (``M_MMAP_MAX = 0``: every block comes from the heap) and the heap's top trimmed
only above 1 GiB, freed blocks are reused as they are: from its second batch on, a conv
forward usually takes no page faults at all (``tests/test_memory.py``); an aligned block freed
and asked for again can still miss its old hole, since memalign asks for a little more than the
hole, so a batch now and then faults one block in. Measured by
``benchmarks/pipeline_speed.py`` on the demo set, whole ``retrieval eval`` with its three
methods, same machine, one after the other: system time 457 s -> 8 s, wall 1,171 s -> 958 s
(``--return-freed-memory`` leaves malloc at its defaults). Raising only the mmap threshold to
its 32 MiB ceiling left 3.2 s of the 6 s system time of the FCN section; activations of a big
batch are larger than that.

The cost: the process keeps its peak heap (up to 1 GiB free at the top of it is not returned),
which is what a caching allocator does anyway. PyTorch's CPU performance guide recommends the
same habit through jemalloc or tcmalloc with ``LD_PRELOAD``; ``mallopt`` gives glibc's own
allocator that habit without a preload or another library. The ``deepemd`` command calls this
at start; library users may call it themselves. Elsewhere (macOS, Windows, musl) it does
nothing and says so by returning False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
#: Free memory at the heap's top above this is returned to the OS (glibc's default is 128 KiB).
TRIM_THRESHOLD = 1 << 30

_DONE = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks (once per process); True when it took effect.

    >>> isinstance(keep_freed_memory(), bool)
    True
    """
    global _DONE
    if _DONE:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _DONE = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _DONE
