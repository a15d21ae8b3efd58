"""FAISS shortlists over a gallery's global vectors: build, shard, save, load, search.

FAISS does all the indexing; this module only fixes the conventions the rest of deepemd relies
on:

* **ids are gallery positions.** Vectors are added in gallery order starting at 0 (checked on
  every batch), so FAISS's sequential ids already are the positions, and shards use
  ``IndexShards(successive_ids=True)`` which offsets each shard's ids by the rows before it.
  That is the job ``IndexIDMap`` would do, without its 8-byte-per-vector id table and without
  blocking the GPU cloners (GPU Flat indexes and HNSW accept no explicit ids).
* **scores are "higher is better"**: inner products for ``metric="ip"``, negated squared L2
  distances for ``metric="l2"``; a slot FAISS could not fill has id -1 and score -inf.
* **a saved index knows what built it**: ``save_index`` writes the FAISS file(s) atomically and
  then a JSON sidecar (``<path>.json``) with the fingerprint (backbone, embed dim, local settings,
  weights hash, count) and each file's size and CRC-32. The sidecar is written last, so it is the
  commit point: a file it does not describe exactly is reported, never searched.
* **GPU when there is one**: with ``faiss.get_num_gpus() > 0`` (the ``faiss-gpu`` package) the
  trained index is cloned to the GPU before vectors are added and after loading; shards are
  spread over the GPUs. Indexes FAISS cannot put on a GPU (HNSW) stay on the CPU. Saving always
  clones back to the CPU first.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from deepemd.errors import DeepEMDError
from deepemd.io import atomic_path
from deepemd.manifest import check_file, check_fingerprint, file_crc32, normalise_fingerprint
from deepemd.retrieval.store import LocalFeatureStore

log = logging.getLogger(__name__)

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
SIDECAR_FORMAT = "deepemd-faiss-index"
SIDECAR_VERSION = 1
DEFAULT_NPROBE = 32  # IVF lists visited per query (FAISS's own default, 1, loses most recall)
DEFAULT_EF_SEARCH = 128  # HNSW candidate list; must exceed the shortlist length k to reach it
SPEC_FIX = (
    "use a FAISS index_factory string such as 'Flat', 'IVF256,Flat', 'IVF1024,PQ32' "
    "(PQ's sub-quantizer count must divide the dimension) or 'HNSW32'"
)


# ---------------------------------------------------------------------------- GPU placement
_gpu_resources: dict[int, Any] = {}


def gpu_count() -> int:
    """GPUs FAISS can use (0 with the faiss-cpu package)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def to_gpu(index: faiss.Index, device: int = 0) -> faiss.Index:
    """Clone ``index`` to GPU ``device`` when FAISS has GPUs; unchanged otherwise or if FAISS has
    no GPU version of this index type (HNSW)."""
    if gpu_count() == 0:
        return index
    if device not in _gpu_resources:  # one resource object per device, kept alive for the process
        _gpu_resources[device] = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(_gpu_resources[device], device, index)
    except RuntimeError as exc:
        log.warning(
            "keeping %s on the CPU: FAISS cannot clone it to a GPU (%s)",
            type(faiss.downcast_index(index)).__name__,
            str(exc).splitlines()[0],
        )
        return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index (shards included); CPU indexes are returned as they are."""
    if gpu_count() == 0:
        return index
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexShards):
        return _make_shards([to_cpu(shard) for shard in _shards(index)], index.metric_type)
    return faiss.index_gpu_to_cpu(index)


# ---------------------------------------------------------------------------- building
def _metric(metric: str) -> int:
    if metric not in METRICS:
        raise DeepEMDError(f"unknown metric {metric!r}", fix=f"use one of {sorted(METRICS)}")
    return METRICS[metric]


def _as_matrix(vectors: np.ndarray, what: str, d: int | None = None) -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise DeepEMDError(f"{what} must be a 2-D array (n, dim), got shape {vectors.shape}")
    if d is not None and vectors.shape[1] != d:
        raise DeepEMDError(
            f"{what} have dimension {vectors.shape[1]} but the index has {d}",
            fix="build the index and the queries with the same model / embedding size",
        )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _seed_training(index: faiss.Index, seed: int) -> None:
    """Make FAISS's k-means (IVF coarse quantizer, PQ codebooks) use our seed."""
    inner = _unwrap(index)
    if isinstance(inner, faiss.IndexIVF):
        inner.cp.seed = seed
    pq = getattr(inner, "pq", None)
    if pq is not None:
        pq.cp.seed = seed


def train_index(spec: str, train_vectors: np.ndarray, metric: str = "ip", seed: int = 0) -> faiss.Index:
    """An empty CPU index from an index_factory ``spec``, trained on ``train_vectors`` if it needs it."""
    train_vectors = _as_matrix(train_vectors, "training vectors")
    d = train_vectors.shape[1]
    try:
        index = faiss.index_factory(d, spec, _metric(metric))
    except RuntimeError as exc:
        raise DeepEMDError(
            f"FAISS cannot build index spec {spec!r} for {d}-d vectors ({str(exc).strip().splitlines()[-1][:200]})",
            fix=SPEC_FIX,
        ) from None
    inner = _unwrap(index)
    if hasattr(inner, "do_polysemous_training"):
        # polysemous codes only serve Hamming pre-filtering (polysemous_ht), which we never enable;
        # their permutation search is most of PQ's training time (25 of 30 CPU-s for PQ16 here)
        inner.do_polysemous_training = False
    if not index.is_trained:
        _seed_training(index, seed)
        try:
            index.train(train_vectors)
        except RuntimeError as exc:
            raise DeepEMDError(
                f"cannot train index {spec!r} on {len(train_vectors)} vectors "
                f"({str(exc).strip().splitlines()[-1][:200]})",
                fix="for a small gallery use fewer IVF lists (about n/39) or 'Flat'; PQ needs at least 256 vectors",
            ) from None
    return index


def _training_sample(n: int, train_sample: int, seed: int) -> np.ndarray:
    """Sorted seeded random positions (all of them when the gallery is small)."""
    if n <= train_sample:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=train_sample, replace=False))


def add_in_batches(
    index: faiss.Index,
    vectors: np.ndarray | Iterable[tuple[int, np.ndarray]],
    batch_size: int = 65536,
    total: int | None = None,
    progress: bool | None = None,
) -> faiss.Index:
    """Add vectors in bounded-memory batches with a progress bar.

    ``vectors`` is an ``(n, d)`` array (a memmap is fine) or an iterable of ``(start, batch)``
    such as ``LocalFeatureStore.iter_chunks(vectors=True)``. Each batch must start where the
    index ends, which is what keeps ids equal to gallery positions.
    """
    if isinstance(vectors, np.ndarray):
        total = len(vectors)
        batches: Iterable[tuple[int, np.ndarray]] = (
            (index.ntotal + s, vectors[s : s + batch_size]) for s in range(0, len(vectors), batch_size)
        )
    else:
        batches = vectors
    show = progress if progress is not None else (total or 0) >= 100_000
    with tqdm(total=total, desc="index add", unit="vec", disable=not show) as bar:
        for start, batch in batches:
            if start != index.ntotal:
                raise ValueError(
                    f"batch starts at {start} but the index holds {index.ntotal} vectors: "
                    "add batches in gallery order so ids stay gallery positions"
                )
            for s in range(0, len(batch), batch_size):
                part = _as_matrix(batch[s : s + batch_size], "gallery vectors", index.d)
                index.add(part)
                bar.update(len(part))
    return index


def _make_shards(shards: list[faiss.Index], metric_type: int) -> faiss.Index:
    combined = faiss.IndexShards(shards[0].d, True, True)  # threaded, successive ids
    for shard in shards:
        combined.add_shard(shard)
    combined.metric_type = metric_type  # decides whether merged results keep the max or the min
    return combined


def _shards(index: faiss.Index) -> list[faiss.Index]:
    return [faiss.downcast_index(index.at(i)) for i in range(index.count())]


def _shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, shards + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def _split_batches(batches: Iterable[tuple[int, np.ndarray]], lo: int, hi: int) -> Iterator[tuple[int, np.ndarray]]:
    for start, batch in batches:
        a, b = max(start, lo), min(start + len(batch), hi)
        if a < b:
            yield a - lo, batch[a - start : b - start]


def _build(
    trained: faiss.Index,
    n: int,
    batches_for,
    shards: int,
    nprobe: int | None,
    ef_search: int | None,
    progress: bool | None,
) -> faiss.Index:
    if shards < 1:
        raise DeepEMDError(f"shards must be >= 1, got {shards}")
    if shards == 1:
        index = add_in_batches(to_gpu(trained), batches_for(0, n), total=n, progress=progress)
    else:
        parts = []
        for s, (lo, hi) in enumerate(_shard_bounds(n, shards)):
            shard = to_gpu(faiss.clone_index(trained), s % max(gpu_count(), 1))
            parts.append(
                add_in_batches(shard, _split_batches(batches_for(lo, hi), lo, hi), total=hi - lo, progress=progress)
            )
        index = _make_shards(parts, trained.metric_type)
    set_search_params(index, nprobe=nprobe or DEFAULT_NPROBE, ef_search=ef_search or DEFAULT_EF_SEARCH)
    return index


def build_index(
    vectors: np.ndarray,
    spec: str = "Flat",
    metric: str = "ip",
    train_sample: int = 100_000,
    seed: int = 0,
    shards: int = 1,
    nprobe: int | None = None,
    ef_search: int | None = None,
    batch_size: int = 65536,
    progress: bool | None = None,
) -> faiss.Index:
    """Index ``vectors (N, d)``: id ``i`` is row ``i``.

    ``spec`` is a FAISS index_factory string ("Flat", "IVF256,Flat", "IVF1024,PQ32", "HNSW32").
    Indexes that need training are trained on ``train_sample`` rows drawn with ``seed``.
    ``shards > 1`` splits the gallery into contiguous parts searched together (``IndexShards``,
    one GPU per shard round-robin when GPUs exist). ``nprobe`` (IVF) and ``ef_search`` (HNSW)
    are search-time knobs; see :func:`set_search_params`.
    """
    vectors = np.asarray(vectors)  # batches are converted to float32 one at a time (memmaps stay on disk)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise DeepEMDError(f"need a non-empty (N, d) array of gallery vectors, got shape {vectors.shape}")
    trained = train_index(spec, vectors[_training_sample(len(vectors), train_sample, seed)], metric, seed)

    def batches_for(lo: int, hi: int) -> Iterator[tuple[int, np.ndarray]]:
        return ((s, vectors[s : min(s + batch_size, hi)]) for s in range(lo, hi, batch_size))

    return _build(trained, len(vectors), batches_for, shards, nprobe, ef_search, progress)


def build_index_from_store(
    store: LocalFeatureStore,
    spec: str = "Flat",
    metric: str = "ip",
    train_sample: int = 100_000,
    seed: int = 0,
    shards: int = 1,
    nprobe: int | None = None,
    ef_search: int | None = None,
    progress: bool | None = None,
) -> faiss.Index:
    """Same as :func:`build_index`, reading the global vectors chunk by chunk from a store created
    with ``vector_dim`` (so a 1M gallery never needs all its vectors in memory at once)."""
    n = len(store)
    if n == 0:
        raise DeepEMDError("the feature store is empty", store.path, "build the gallery store first")
    trained = train_index(spec, store.get_vectors(_training_sample(n, train_sample, seed)), metric, seed)
    return _build(trained, n, lambda lo, hi: store.iter_chunks(vectors=True), shards, nprobe, ef_search, progress)


# ---------------------------------------------------------------------------- search
def _unwrap(index: faiss.Index) -> faiss.Index:
    """The index doing the work inside pre-transforms / id maps / refinement wrappers."""
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexPreTransform, faiss.IndexIDMap, faiss.IndexRefine)):
        index = faiss.downcast_index(index.base_index if isinstance(index, faiss.IndexRefine) else index.index)
    return index


def set_search_params(index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Set IVF ``nprobe`` (lists visited) and HNSW ``efSearch`` (candidates kept) on an index or on
    every shard; settings that do not apply to the index type are ignored. Both are saved with it."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexShards):
        for shard in _shards(index):
            set_search_params(shard, nprobe, ef_search)
        return
    inner = _unwrap(index)
    if nprobe is not None and hasattr(inner, "nprobe") and hasattr(inner, "nlist"):
        inner.nprobe = int(min(nprobe, inner.nlist))
    if ef_search is not None and isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = int(ef_search)


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery positions per query -> ``(scores (Q, k'), ids (Q, k'))``, best first, with
    ``k' = min(k, index size)``; scores are higher-is-better for both metrics (see module doc)."""
    if index.ntotal == 0:
        raise DeepEMDError("the index is empty", fix="add the gallery vectors before searching")
    queries = _as_matrix(queries, "query vectors", index.d)
    k = int(min(k, index.ntotal))
    if k < 1:
        raise DeepEMDError(f"k must be >= 1, got {k}")
    distances, ids = index.search(queries, k)
    scores = -distances if index.metric_type == faiss.METRIC_L2 else distances
    scores = scores.astype(np.float32, copy=False)
    scores[ids < 0] = -np.inf
    return scores, ids


# ---------------------------------------------------------------------------- save / load
def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def save_index(index: faiss.Index, path: str | Path, fingerprint: dict[str, Any] | None) -> Path:
    """Write ``index`` (cloned to CPU) to ``path`` (sharded: ``path.shard0``, ...) and then its
    sidecar ``path.json`` with ``fingerprint`` (``count`` defaults to the index size); all atomic.
    Returns the sidecar path."""
    path = Path(path)
    cpu = faiss.downcast_index(to_cpu(index))
    parts = _shards(cpu) if isinstance(cpu, faiss.IndexShards) else [cpu]
    names = (
        [path.name]
        if len(parts) == 1 and not isinstance(cpu, faiss.IndexShards)
        else [f"{path.name}.shard{i}" for i in range(len(parts))]
    )
    files = []
    for part, name in zip(parts, names):
        target = path.with_name(name)
        with atomic_path(target) as tmp:
            faiss.write_index(part, str(tmp))
            files.append(
                {"name": name, "bytes": tmp.stat().st_size, "crc32": file_crc32(tmp), "ntotal": int(part.ntotal)}
            )
    fp = normalise_fingerprint(fingerprint)
    fp.setdefault("count", int(cpu.ntotal))
    sidecar = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "fingerprint": fp,
        "ntotal": int(cpu.ntotal),
        "d": int(cpu.d),
        "metric": "ip" if cpu.metric_type == faiss.METRIC_INNER_PRODUCT else "l2",
        "index_type": type(_unwrap(parts[0])).__name__,
        "sharded": isinstance(cpu, faiss.IndexShards),
        "files": files,
    }
    with atomic_path(sidecar_path(path)) as tmp:  # written last: the commit point
        tmp.write_text(json.dumps(sidecar, indent=1, sort_keys=True))
    return sidecar_path(path)


def read_sidecar(path: str | Path, fix: str | None = None) -> dict[str, Any]:
    """The sidecar of a saved index (fingerprint, size, metric, files), validated. ``fix``: what
    an error tells the user to do instead of the stand-alone advice (a gallery knows better)."""
    path = Path(path)
    side = sidecar_path(path)
    if not side.is_file():
        if path.is_file():
            raise DeepEMDError(
                f"index has no deepemd sidecar ({side.name} missing), so it is not known what built it",
                path,
                fix
                or "rebuild it with deepemd, or load it as your own FAISS index "
                "(load_foreign_index / the foreign-index option)",
            )
        raise DeepEMDError("index not found", path, fix or "build the gallery index first, or check the path")
    try:
        sidecar = json.loads(side.read_text())
        if sidecar.get("format") != SIDECAR_FORMAT or sidecar.get("version") != SIDECAR_VERSION:
            raise ValueError(f"format {sidecar.get('format')!r} version {sidecar.get('version')!r}")
        for key in ("fingerprint", "files", "ntotal", "d", "metric", "sharded"):
            sidecar[key]  # noqa: B018 - presence check
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DeepEMDError(
            f"unreadable index sidecar ({exc})", side, fix or "delete the index and rebuild it"
        ) from None
    return sidecar


def _read_faiss(path: Path) -> faiss.Index:
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise DeepEMDError(
            f"not a readable FAISS index ({str(exc).strip().splitlines()[-1][:200]})",
            path,
            "the file is truncated or not a FAISS index; rebuild it or point to the right file",
        ) from None


def load_index(
    path: str | Path, expected_fingerprint: dict[str, Any] | None = None, gpu: bool = True, fix: str | None = None
) -> faiss.Index:
    """Load an index written by :func:`save_index` (on the GPU when there is one and ``gpu``).

    A missing file, a file its sidecar does not describe (truncated, replaced, half-saved) or a
    fingerprint that differs from ``expected_fingerprint`` is one DeepEMDError saying what and how
    to fix it; ``fix`` replaces the advice for a missing or damaged index (a gallery rebuilds
    its index from the stored vectors)."""
    path = Path(path)
    rebuild = fix or "delete the index and rebuild it"
    sidecar = read_sidecar(path, fix)
    check_fingerprint(sidecar["fingerprint"], expected_fingerprint, "index", path)
    parts = []
    for entry in sidecar["files"]:
        file = path.with_name(entry["name"])
        check_file(file, entry, "index file", rebuild)
        parts.append(_read_faiss(file))
    if sidecar["sharded"]:
        gpus = max(gpu_count(), 1)
        shards = [to_gpu(p, i % gpus) if gpu else p for i, p in enumerate(parts)]
        index = _make_shards(shards, METRICS[sidecar["metric"]])
    else:
        index = to_gpu(parts[0]) if gpu else parts[0]
    if index.ntotal != sidecar["ntotal"] or index.d != sidecar["d"]:
        raise DeepEMDError(
            f"index holds {index.ntotal} x {index.d}, sidecar says {sidecar['ntotal']} x {sidecar['d']}",
            path,
            rebuild,
        )
    return index


def load_foreign_index(path: str | Path, gpu: bool = True) -> faiss.Index:
    """A user's own index written by ``faiss.write_index`` (no fingerprint). Its ids are whatever the
    user stored; the caller checks ``index.d`` against the model's embedding size."""
    path = Path(path)
    if not path.is_file():
        raise DeepEMDError("FAISS index not found", path, "check the path of your index file")
    index = _read_faiss(path)
    return to_gpu(index) if gpu else index


__all__ = [
    "METRICS",
    "add_in_batches",
    "build_index",
    "build_index_from_store",
    "gpu_count",
    "load_foreign_index",
    "load_index",
    "read_sidecar",
    "save_index",
    "search",
    "set_search_params",
    "sidecar_path",
    "to_cpu",
    "to_gpu",
    "train_index",
]
