"""What the store's always-on checks cost, measured in one process against the old path's core
work: writing a 4,096 x 25 x 640 chunk (old: float16 cast + np.save + one CRC; new:
``store.append`` = per-set scale check, row CRCs, three files) and reading 30 shortlists of 100
rows (old: one ``preadv`` per row into float16; new: ``store.get`` = reads + row CRCs + decoding
to float32). Prints the two ratios and the load average.

    python benchmarks/store_verify_cost.py
"""

import argparse
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from deepemd.retrieval.store import LocalFeatureStore

argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
M, D, N, CH = 25, 640, 8192, 4096
rng = np.random.default_rng(0)
tmp = Path(tempfile.mkdtemp())
local = rng.random((CH, M, D), dtype=np.float32)
vec = rng.standard_normal((CH, 128), dtype=np.float32)
# write one chunk: old = float16 cast + np.save + whole CRC; new = store.append (encode, row CRCs, 3 files)


def write_old(i: int) -> None:
    """The old path's core work for one chunk: float16 cast, np.save, one CRC per file."""
    h = local.astype(np.float16)
    np.save(tmp / f"old{i}.npy", h)
    zlib.crc32(memoryview(h).cast("B"))
    np.save(tmp / f"oldv{i}.npy", vec)
    zlib.crc32(memoryview(vec).cast("B"))


t = time.perf_counter()
for i in range(2):
    write_old(i)
old_w = (time.perf_counter() - t) / 2
store = LocalFeatureStore.create(tmp / "s", M, D, {}, chunk_size=CH, vector_dim=128)
t = time.perf_counter()
for _ in range(2):
    store.append(local, vec)
new_w = (time.perf_counter() - t) / 2
store = LocalFeatureStore.open(tmp / "s")
qs = [np.sort(rng.choice(N, 100, replace=False)) for _ in range(30)]
path = tmp / "s" / "chunk_000000.4096.npy"
off = os.path.getsize(path) - CH * M * D * 2


def raw(ids: np.ndarray) -> np.ndarray:
    """The old get's core: one preadv per row into float16, no check, no decoding."""
    out = np.empty((len(ids), M, D), np.float16)
    fd = os.open(path, os.O_RDONLY)
    for j, r in enumerate(ids % CH):
        os.preadv(fd, [memoryview(out[j]).cast("B")], off + int(r) * M * D * 2)
    os.close(fd)
    return out


for f in (raw, store.get):
    f(qs[0])
res = {}
for name, f in (("raw", raw), ("get", store.get), ("raw2", raw), ("get2", store.get)):
    t = time.perf_counter()
    for ids in qs:
        f(ids)
    res[name] = 1e3 * (time.perf_counter() - t) / len(qs)
print(f"write one 4096-row chunk: old {old_w:.2f} s, new {new_w:.2f} s (x{new_w / old_w:.2f})")
print(
    f"read 100 rows: raw preadv {res['raw']:.1f}/{res['raw2']:.1f} ms, verified+decoded get {res['get']:.1f}/{res['get2']:.1f} ms "
    f"(x{(res['get'] + res['get2']) / (res['raw'] + res['raw2']):.2f}); loadavg {os.getloadavg()}"
)
shutil.rmtree(tmp)
