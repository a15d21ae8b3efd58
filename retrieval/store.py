"""Disk-backed store of local feature sets, aligned with the FAISS index ids.

A gallery of a million images has a million local sets (25 x 640 float16 = 32 KB each, 32 GB in
all): far more than memory, and the reranker only ever needs ~100 of them per query. So the sets
live in fixed-size ``.npy`` chunk files (``chunk_000000.4096.npy``: chunk index and row count,
``chunk_size`` sets each). :meth:`LocalFeatureStore.get` reads just the rows it is asked for with
positioned reads (see ``_read_rows`` for why not through the mmap), and
:meth:`LocalFeatureStore.iter_chunks` streams whole chunks opened with ``mmap_mode="r"``.

Values: ``dtype="float16"`` (default, half the disk) stores each set divided by a power-of-two
scale of its own (``2**ceil(log2(max |x|))``, kept per row), so sets of any magnitude keep
float16's 11-bit relative precision: a network whose features are ~1e-8 (an untrained
EfficientNet-Lite0) or ~1e6 is stored as faithfully as one near 1. A set whose nodes span more
than float16's range *within* the set (a node > 1% off after the round trip) is refused with a
message naming ``dtype="float32"`` (``--store-dtype float32``), which stores values unscaled.
:meth:`get` always returns float32 values with the scale applied.

Crash safety, verification and resumability:

* a chunk is written to a temporary sibling, fsynced and renamed (``deepemd.io.atomic_path``);
  only then is ``manifest.json`` rewritten (also atomically) to list it. The manifest is the
  commit point: a chunk file it does not list (killed between the two renames) or a leftover
  temporary file is never read and is overwritten by a resumed build;
* chunk ``i`` always holds rows ``[i*chunk_size, (i+1)*chunk_size)`` (only the last may be short),
  so a row's chunk is a division and a resumed build ends byte-identical to an uninterrupted one;
* each manifest entry records the rows and a CRC-32 of each file's array bytes, and each chunk
  has a small ``.rows.npy`` sidecar with one CRC-32 per row (of its local set and of its global
  vector) and the row's scale. **Every read is verified**: :meth:`get` checks the CRC of each row
  it reads (~6 us per 32 KB row, under 1 ms for a 100-row shortlist), whole-chunk reads
  (:meth:`iter_chunks`, refilling a short chunk) check the chunk's CRC, and the sidecar is checked
  against the manifest when first used. A mismatch (a flipped byte, a NaN written over a value,
  a truncated file) is one DeepEMDError naming the file and the fix (``deepemd retrieval index
  --repair``). ``open`` checks every listed file's size (one ``stat`` each: milliseconds at 1M);
  :meth:`verify` re-reads everything.

Optionally each chunk also carries the images' global vectors (``chunk_000000.4096.vec.npy``,
float32) so that a killed gallery build resumes both halves from disk and the FAISS index can be
built from the store without running the network again.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from deepemd.errors import DeepEMDError
from deepemd.io import atomic_path
from deepemd.manifest import REPAIR_FIX, check_fingerprint, crc32, normalise_fingerprint

MANIFEST = "manifest.json"
FORMAT = "deepemd-local-store"
VERSION = 2
DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
VECTOR_DTYPE = np.dtype(np.float32)
ROW_DTYPE = np.dtype([("crc", "<u4"), ("vec_crc", "<u4"), ("scale", "<f4")])
#: a float16 node whose norm moves by more than this in the scaled round trip is refused
MAX_NODE_ERROR = 1e-2
FLOAT32_FIX = "store it unscaled in float32: --store-dtype float32 (LocalFeatureStore.create(..., dtype='float32'))"
REBUILD_FIX = "delete the store folder and rebuild it (deepemd retrieval index)"


def _npy_nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Exact size of a ``.npy`` file ``np.save`` writes for this shape and dtype (format 1.0)."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return len(buf.getvalue()) + int(np.prod(shape)) * dtype.itemsize


#: Rows per positioned read: each row is one iovec of it (Linux allows 1,024 per call).
READ_ROWS = 64


def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.lib.format.write_array(fh, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)


def _row_crcs(array: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(array).reshape(len(array), -1).view(np.uint8)
    return np.fromiter((crc32(row) for row in flat), dtype=np.uint32, count=len(array))


def encode(local: np.ndarray, dtype: np.dtype, path: Path, block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """``(stored values, per-row scales)`` of finite sets ``(n, m, d)``; refuses what would not
    survive. Works ``block`` rows at a time so a 4,096-row chunk needs no GB of temporaries."""
    local = np.asarray(local)
    stored = np.empty(local.shape, dtype)
    scale = np.ones(len(local), np.float32)
    for s in range(0, len(local), block):
        stored[s : s + block], scale[s : s + block] = _encode_block(
            local[s : s + block].astype(np.float32), dtype, path, s
        )
    return stored, scale


def _encode_block(local: np.ndarray, dtype: np.dtype, path: Path, first: int) -> tuple[np.ndarray, np.ndarray]:
    """One block through torch: numpy's float16 cast and reductions were ~10x slower here
    (imported here so ``import deepemd.retrieval.index`` stays free of torch)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(local))
    bad = ~torch.isfinite(t).flatten(1).all(dim=1)
    if bool(bad.any()):
        raise DeepEMDError(
            f"local sets of {int(bad.sum())} images contain NaN or inf "
            f"(first: row {first + int(torch.nonzero(bad)[0, 0])} of this batch)",
            path,
            "the network produced them: check the backbone, checkpoint and input images",
        )
    if dtype == np.float32:
        return local, np.ones(len(local), np.float32)
    peak = t.abs().flatten(1).amax(dim=1)
    scale = torch.exp2(torch.ceil(torch.log2(torch.where(peak > 0, peak, torch.ones_like(peak)))))  # exact divisor
    scaled = t / scale[:, None, None]  # |values| <= 1: the norms below cannot overflow
    stored = scaled.half()
    norm = torch.linalg.vector_norm(scaled, dim=2)
    error = torch.linalg.vector_norm(stored.float() - scaled, dim=2)
    lost = (error > MAX_NODE_ERROR * norm) & (norm > 0)
    if bool(lost.any()):
        row, node = (int(v) for v in torch.nonzero(lost)[0])
        raise DeepEMDError(
            f"float16 cannot hold these local sets: node {node} of row {first + row} (norm "
            f"{float(norm[row, node] * scale[row]):.3g}, the set's largest value {float(peak[row]):.3g}) changes by "
            f"{float(error[row, node] / norm[row, node]):.1%} when stored; {int(lost.any(dim=1).sum())} sets of "
            "this batch are affected",
            path,
            FLOAT32_FIX,
        )
    return stored.numpy(), scale.numpy().astype(np.float32)


class LocalFeatureStore:
    """Local sets ``(N, m, d)`` (and optional global vectors ``(N, D)`` float32) on disk.

    Build with :meth:`create` + :meth:`append` (or :func:`build_store`), read with :meth:`open`
    + :meth:`get`. Row ``i`` is the image at gallery position ``i``, which is also its FAISS id.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], mode: str):
        self.path = path
        self.mode = mode
        self._manifest = manifest
        self.m: int = manifest["m"]
        self.d: int = manifest["d"]
        self.dtype = np.dtype(manifest["dtype"])
        self.chunk_size: int = manifest["chunk_size"]
        self.vector_dim: int | None = manifest["vector_dim"]
        self.fingerprint: dict[str, Any] = manifest["fingerprint"]
        self._chunks: list[dict[str, Any]] = manifest["chunks"]
        self._buffer: list[np.ndarray] = []
        self._vec_buffer: list[np.ndarray] = []
        self._scale_buffer: list[np.ndarray] = []
        self._row_info: dict[int, np.ndarray] = {}  # verified .rows.npy sidecars (12 bytes a row)
        self._replaced: list[str] = []  # short chunk files superseded once the refilled chunk commits

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(
        cls,
        path: str | Path,
        m: int,
        d: int,
        fingerprint: dict[str, Any] | None,
        chunk_size: int = 4096,
        vector_dim: int | None = None,
        dtype: str = "float16",
    ) -> LocalFeatureStore:
        """Start an empty store in folder ``path`` (which must not already hold one)."""
        path = Path(path)
        if (path / MANIFEST).exists():
            raise DeepEMDError(
                "a feature store already exists here",
                path,
                "open it with LocalFeatureStore.open(..., mode='a') to resume, or delete the folder",
            )
        if min(m, d, chunk_size) < 1 or (vector_dim is not None and vector_dim < 1):
            raise DeepEMDError(
                f"store sizes must be positive (m={m}, d={d}, chunk_size={chunk_size}, vector_dim={vector_dim})", path
            )
        if dtype not in DTYPES:
            raise DeepEMDError(f"unknown store dtype {dtype!r}", path, "use float16 (scaled per set) or float32")
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "m": int(m),
            "d": int(d),
            "dtype": DTYPES[dtype].str,
            "chunk_size": int(chunk_size),
            "vector_dim": None if vector_dim is None else int(vector_dim),
            "fingerprint": normalise_fingerprint(fingerprint),
            "chunks": [],
        }
        path.mkdir(parents=True, exist_ok=True)
        store = cls(path, manifest, "a")
        store._write_manifest()
        return store

    @classmethod
    def open(
        cls, path: str | Path, expected_fingerprint: dict[str, Any] | None = None, mode: str = "r"
    ) -> LocalFeatureStore:
        """Open a store; ``mode="a"`` also allows :meth:`append` (resuming a build).

        Checks the manifest, the fingerprint and that every listed chunk file exists with the
        size the manifest promises; anything else is one DeepEMDError.
        """
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise DeepEMDError(
                "no feature store here (manifest.json missing)",
                path,
                "build the gallery store first, or check the path",
            )
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format is {manifest.get('format')!r}, not {FORMAT!r}")
            if manifest.get("version") != VERSION:
                raise ValueError(
                    f"version {manifest.get('version')!r} is not supported (want {VERSION}: "
                    "written by another deepemd version)"
                )
            for key in ("m", "d", "chunk_size", "vector_dim", "fingerprint", "chunks"):
                manifest[key]  # noqa: B018 - presence check
            if np.dtype(manifest["dtype"]) not in DTYPES.values():
                raise ValueError(f"dtype {manifest['dtype']!r}")
        except (ValueError, KeyError, TypeError) as exc:
            raise DeepEMDError(f"unreadable store manifest ({exc})", manifest_path, REBUILD_FIX) from None
        check_fingerprint(manifest["fingerprint"], expected_fingerprint, "feature store", path)
        store = cls(path, manifest, mode)
        store._check_files()
        if mode == "a":
            store._remove_leftovers()
        return store

    def _chunk_shapes(self, index: int, rows: int) -> list[tuple[str, tuple[int, ...], np.dtype, str]]:
        """(file, shape, dtype, manifest CRC key) of each file of a chunk. File names carry the row
        count, so refilling a short last chunk writes NEW files and the manifest switches to them
        atomically (never a listed name whose size changed)."""
        stem = f"chunk_{index:06d}.{rows}"
        shapes = [
            (f"{stem}.npy", (rows, self.m, self.d), self.dtype, "crc32"),
            (f"{stem}.rows.npy", (rows,), ROW_DTYPE, "rows_crc32"),
        ]
        if self.vector_dim is not None:
            shapes.append((f"{stem}.vec.npy", (rows, self.vector_dim), VECTOR_DTYPE, "vec_crc32"))
        return shapes

    def chunk_files(self, index: int) -> list[Path]:
        """Paths of chunk ``index``'s files (local sets, row sidecar, vectors)."""
        return [self.path / name for name, *_ in self._chunk_shapes(index, self._chunks[index]["rows"])]

    def _check_files(self) -> None:
        """Every listed chunk must be full (except the last), present, and of the promised size."""
        for i, entry in enumerate(self._chunks):
            rows = entry.get("rows")
            last = i == len(self._chunks) - 1
            if (
                not isinstance(rows, int)
                or rows < 1
                or rows > self.chunk_size
                or (not last and rows != self.chunk_size)
            ):
                raise DeepEMDError(
                    f"manifest lists chunk {i} with {rows} rows (chunk size {self.chunk_size})",
                    self.path / MANIFEST,
                    REBUILD_FIX,
                )
            if entry.get("file") != self._chunk_shapes(i, rows)[0][0]:
                raise DeepEMDError(
                    f"manifest entry {i} names {entry.get('file')!r}, not the expected chunk file",
                    self.path / MANIFEST,
                    REBUILD_FIX,
                )
            for name, shape, dtype, crc_key in self._chunk_shapes(i, rows):
                file = self.path / name
                want = _npy_nbytes(shape, dtype)
                have = file.stat().st_size if file.is_file() else None
                if have != want:
                    state = "missing" if have is None else f"{have} bytes, expected {want}"
                    raise DeepEMDError(
                        f"chunk file is {state}: truncated, half-written or removed after the manifest listed it",
                        file,
                        REPAIR_FIX,
                    )
                if crc_key not in entry:
                    raise DeepEMDError(
                        f"manifest entry for chunk {i} has no {crc_key}", self.path / MANIFEST, REBUILD_FIX
                    )

    def _remove_leftovers(self) -> None:
        """Drop temp files and chunk files the manifest does not list (a build killed mid-write)."""
        listed = {name for i, e in enumerate(self._chunks) for name, *_ in self._chunk_shapes(i, e["rows"])}
        for file in self.path.iterdir():
            is_temp = file.name.startswith(".") and file.name.endswith(".tmp")
            is_orphan = file.name.startswith("chunk_") and file.name not in listed
            if is_temp or is_orphan:
                file.unlink(missing_ok=True)

    def _write_manifest(self) -> None:
        self._manifest["chunks"] = self._chunks
        with atomic_path(self.path / MANIFEST) as tmp:
            tmp.write_text(json.dumps(self._manifest, indent=1, sort_keys=True))

    # ------------------------------------------------------------------ sizes
    @property
    def committed(self) -> int:
        """Rows durable on disk and listed in the manifest."""
        return sum(entry["rows"] for entry in self._chunks)

    def __len__(self) -> int:
        return self.committed + sum(len(b) for b in self._buffer)

    def nbytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def __repr__(self) -> str:
        return (
            f"LocalFeatureStore({str(self.path)!r}, n={len(self)}, m={self.m}, d={self.d}, "
            f"dtype={self.dtype.name}, chunks={len(self._chunks)}, vector_dim={self.vector_dim})"
        )

    # ------------------------------------------------------------------ writing
    def append(self, local: np.ndarray, vectors: np.ndarray | None = None) -> None:
        """Buffer ``local (n, m, d)`` (and ``vectors (n, D)`` if the store keeps them); every full
        chunk is written and committed at once, the remainder waits for more rows or :meth:`flush`.
        Non-finite values and (float16) sets float16 cannot hold are refused here, before any write."""
        if self.mode != "a":
            raise DeepEMDError("store is open read-only", self.path, "open it with mode='a' to append")
        local = np.asarray(local)
        if local.ndim != 3 or local.shape[1:] != (self.m, self.d):
            raise DeepEMDError(
                f"local sets have shape {local.shape}, the store holds (n, {self.m}, {self.d})",
                self.path,
                "use the same local extractor the store was created with",
            )
        if (vectors is None) != (self.vector_dim is None):
            raise DeepEMDError(
                "global vectors must be given exactly when the store was created with vector_dim", self.path
            )
        if vectors is not None:
            vectors = np.asarray(vectors, dtype=VECTOR_DTYPE)
            if vectors.shape != (len(local), self.vector_dim):
                raise DeepEMDError(
                    f"vectors have shape {vectors.shape}, expected ({len(local)}, {self.vector_dim})", self.path
                )
            if not np.isfinite(vectors).all():
                raise DeepEMDError(
                    "global vectors contain NaN or inf",
                    self.path,
                    "the network produced them: check the backbone, checkpoint and input images",
                )
        stored, scale = encode(local, self.dtype, self.path)
        if vectors is not None:
            self._vec_buffer.append(vectors)
        self._buffer.append(stored)
        self._scale_buffer.append(scale)
        self._drain(final=False)

    def flush(self) -> None:
        """Commit buffered rows as a (possibly short) last chunk. Later appends rewrite that chunk,
        so chunk boundaries stay at multiples of ``chunk_size``."""
        if self.mode == "a":
            self._drain(final=True)

    def _drain(self, final: bool) -> None:
        pending = sum(len(b) for b in self._buffer)
        if pending == 0:
            return
        # a short last chunk on disk is reopened and refilled, keeping chunk i = rows [i*cs, (i+1)*cs)
        if self._chunks and self._chunks[-1]["rows"] < self.chunk_size:
            index = len(self._chunks) - 1
            self._buffer.insert(0, np.array(self._verified_chunk(index, vectors=False)))
            self._scale_buffer.insert(0, self._rows(index)["scale"].copy())
            if self.vector_dim is not None:
                self._vec_buffer.insert(0, np.array(self._verified_chunk(index, vectors=True)))
            self._replaced += [name for name, *_ in self._chunk_shapes(index, self._chunks[index]["rows"])]
            self._chunks.pop()
            self._row_info.pop(index, None)
        local, scales = np.concatenate(self._buffer), np.concatenate(self._scale_buffer)
        vecs = np.concatenate(self._vec_buffer) if self.vector_dim is not None else None
        start = 0
        while len(local) - start >= self.chunk_size or (final and start < len(local)):
            stop = min(start + self.chunk_size, len(local))
            self._commit_chunk(local[start:stop], scales[start:stop], None if vecs is None else vecs[start:stop])
            start = stop
        self._buffer = [local[start:]] if start < len(local) else []
        self._scale_buffer = [scales[start:]] if start < len(local) else []
        self._vec_buffer = [vecs[start:]] if vecs is not None and start < len(local) else []
        if start > 0:  # a refilled chunk is committed: its short predecessor is garbage now
            for name in self._replaced:
                (self.path / name).unlink(missing_ok=True)
            self._replaced = []

    def _commit_chunk(self, local: np.ndarray, scales: np.ndarray, vectors: np.ndarray | None) -> None:
        index = len(self._chunks)
        names = [name for name, *_ in self._chunk_shapes(index, len(local))]
        rows = np.zeros(len(local), ROW_DTYPE)
        rows["crc"], rows["scale"] = _row_crcs(local), scales
        entry = {"file": names[0], "rows": len(local), "crc32": crc32(local)}
        if vectors is not None:
            rows["vec_crc"] = _row_crcs(vectors)
            _write_npy(self.path / names[2], vectors)
            entry.update(vec_file=names[2], vec_crc32=crc32(vectors))
        _write_npy(self.path / names[0], local)
        _write_npy(self.path / names[1], rows)
        entry.update(rows_file=names[1], rows_crc32=crc32(rows))
        self._chunks.append(entry)
        self._write_manifest()  # the commit point: only now does the chunk exist for readers

    # ------------------------------------------------------------------ reading
    def _corrupt(self, file: Path, what: str) -> DeepEMDError:
        return DeepEMDError(
            f"feature store corrupted: {what} does not match the checksum written with it "
            "(a changed byte, NaN or garbage on disk)",
            file,
            REPAIR_FIX,
        )

    def _mmap(self, index: int, which: int) -> np.ndarray:
        """A fresh read-only memmap of one file of a chunk (0 local, 1 rows, 2 vectors). Deliberately
        not cached: pages a memmap has touched count in the process's RSS for as long as it lives,
        so streaming a 1M store through cached maps would grow RSS by the whole store."""
        name, shape, dtype, _ = self._chunk_shapes(index, self._chunks[index]["rows"])[which]
        try:
            array = np.load(self.path / name, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - a damaged header fails in numpy's parser in many ways
            raise DeepEMDError(f"unreadable chunk ({exc})", self.path / name, REPAIR_FIX) from None
        if array.shape != shape or array.dtype != dtype:  # a damaged header: same bytes, other meaning
            raise self._corrupt(self.path / name, f"the header of chunk {index} ({array.dtype}{array.shape})")
        return array

    def _verified_chunk(self, index: int, vectors: bool) -> np.ndarray:
        """The whole chunk (memmap), after checking its CRC against the manifest."""
        which = 2 if vectors else 0
        array = self._mmap(index, which)
        name, _, _, key = self._chunk_shapes(index, self._chunks[index]["rows"])[which]
        if crc32(array) != self._chunks[index][key]:
            raise self._corrupt(self.path / name, f"chunk {index}")
        return array

    def _rows(self, index: int) -> np.ndarray:
        """Chunk ``index``'s row sidecar (per-row CRCs and scales), checked once, then cached."""
        if index not in self._row_info:
            rows = np.array(self._mmap(index, 1))
            if crc32(rows) != self._chunks[index]["rows_crc32"]:
                raise self._corrupt(
                    self.path / self._chunk_shapes(index, len(rows))[1][0], f"row table of chunk {index}"
                )
            self._row_info[index] = rows
        return self._row_info[index]

    def _read_rows(self, index: int, rows: np.ndarray, vectors: bool, out: np.ndarray, slots: np.ndarray) -> None:
        """Read ``rows`` (sorted, chunk-local) of chunk ``index`` into ``out[slots]`` with
        positioned scatter reads, one read per run of consecutive rows, and check each row's CRC.

        Not through the mmap: the kernel maps whole page-cache folios (up to MBs, grown by
        readahead) on each fault, so touching 2,000 random 32 KB rows of a 1.3 GB store through
        the mmap put 1.2 GB into this process's RSS; ``os.preadv`` reads exactly the bytes asked
        for, straight into the caller's order (no gathered copy to reorder afterwards).
        """
        name, shape, dtype, _ = self._chunk_shapes(index, self._chunks[index]["rows"])[2 if vectors else 0]
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        offset = _npy_nbytes(shape, dtype) - shape[0] * row_bytes  # the .npy header length
        # a read per run of consecutive rows, at most READ_ROWS rows (iovecs) each
        breaks = np.flatnonzero((np.diff(rows) != 1) | (np.arange(1, len(rows)) % READ_ROWS == 0)) + 1
        got_crcs = np.empty(len(rows), np.uint32)
        fd = os.open(self.path / name, os.O_RDONLY)

        def read_run(run: tuple[np.ndarray, np.ndarray]) -> None:
            run_rows, run_slots = run
            buffers = [memoryview(out[slots[k]]).cast("B") for k in run_slots]
            if os.preadv(fd, buffers, offset + int(run_rows[0]) * row_bytes) != len(run_rows) * row_bytes:
                raise DeepEMDError(
                    "chunk file is shorter than its manifest entry (truncated after opening)",
                    self.path / name,
                    REPAIR_FIX,
                )
            for k in run_slots:
                got_crcs[k] = crc32(out[slots[k]])

        import torch  # here, as in _encode_block: importing the index module stays free of torch

        from deepemd.emd.threads import run_each_on_threads

        runs = zip(np.split(rows, breaks), np.split(np.arange(len(rows)), breaks))
        try:  # preadv and zlib's crc32 release the GIL: the rows of a shortlist read in parallel
            run_each_on_threads(read_run, runs, min(torch.get_num_threads(), len(breaks) + 1))
        finally:
            os.close(fd)
        want = self._rows(index)["vec_crc" if vectors else "crc"][rows]
        bad = np.flatnonzero(got_crcs != want)
        if len(bad):
            raise self._corrupt(
                self.path / name,
                f"row {int(rows[bad[0]])} of chunk {index}"
                + (f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""),
            )

    def _gather(self, ids: np.ndarray, vectors: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(rows in the stored dtype, per-row scales)`` of ``ids``, in ``ids`` order: each
        distinct row read once (in file order, into its first slot), repeats copied."""
        if vectors and self.vector_dim is None:
            raise DeepEMDError(
                "this store keeps no global vectors", self.path, "create it with vector_dim=... to keep them"
            )
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
        n = len(self)
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            raise IndexError(
                f"ids must lie in [0, {n}); got min {ids.min()} max {ids.max()} "
                "(FAISS returns -1 where it found fewer than k neighbours: drop those first)"
            )
        shape = (self.vector_dim,) if vectors else (self.m, self.d)
        committed = self.committed
        unique, first, inverse = np.unique(ids.astype(np.int64), return_index=True, return_inverse=True)
        out = np.empty((len(ids), *shape), dtype=VECTOR_DTYPE if vectors else self.dtype)
        scales = np.ones(len(unique), np.float32)
        chunk_of = unique // self.chunk_size
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        for start, group, slots in zip(np.r_[0, bounds], np.split(unique, bounds), np.split(first, bounds)):
            if len(group) == 0:
                continue
            if group[0] >= committed:  # still in the write buffer
                out[slots] = np.concatenate(self._vec_buffer if vectors else self._buffer)[group - committed]
                scales[start : start + len(group)] = np.concatenate(self._scale_buffer)[group - committed]
                continue
            chunk = int(chunk_of[start])
            local_rows = group - chunk * self.chunk_size
            self._read_rows(chunk, local_rows, vectors, out, slots)
            scales[start : start + len(group)] = self._rows(chunk)["scale"][local_rows]
        inverse = inverse.reshape(-1)
        repeats = np.flatnonzero(first[inverse] != np.arange(len(ids)))
        out[repeats] = out[first[inverse[repeats]]]
        return out, scales[inverse]

    def get_stored(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Local sets of ``ids`` as stored, ``(len(ids), m, d)`` in the store's dtype, and each
        row's scale ``(len(ids),)`` (the sets are ``rows * scale``; 1 for a float32 store), each
        row CRC-checked. What the rerank reads: it converts only what it multiplies and applies
        the scales to the small dot blocks instead of to every value."""
        return self._gather(ids, vectors=False)

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Local sets of gallery positions ``ids`` -> ``(len(ids), m, d)`` float32, in ``ids`` order.
        Only the requested rows are read from disk (each distinct row once), each checked by CRC."""
        import torch

        rows, scales = self._gather(ids, vectors=False)
        values = torch.from_numpy(rows).float()
        if self.dtype != np.float32:
            values *= torch.from_numpy(scales)[:, None, None]
        return values.numpy()

    def get_vectors(self, ids: np.ndarray) -> np.ndarray:
        """Global vectors of gallery positions ``ids`` -> ``(len(ids), D)`` float32 (CRC-checked)."""
        return self._gather(ids, vectors=True)[0]

    def iter_chunks(self, vectors: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, array)`` per committed chunk, each CRC-checked, and then the unflushed
        buffer. ``vectors=True`` yields the global vectors (memmaps released as the caller moves
        on, so RSS stays about one chunk); otherwise the local sets as float32 with scales applied."""
        if vectors and self.vector_dim is None:
            raise DeepEMDError("this store keeps no global vectors", self.path)
        for i in range(len(self._chunks)):
            array = self._verified_chunk(i, vectors)
            if not vectors:
                array = array.astype(np.float32) * self._rows(i)["scale"][:, None, None]
            yield i * self.chunk_size, array
        if self._buffer:
            if vectors:
                yield self.committed, np.concatenate(self._vec_buffer)
            else:
                yield (
                    self.committed,
                    np.concatenate(self._buffer).astype(np.float32) * np.concatenate(self._scale_buffer)[:, None, None],
                )

    def verify_chunk(self, index: int) -> None:
        """Check every file of one chunk against the manifest (reads the chunk)."""
        self._row_info.pop(index, None)
        self._rows(index)
        self._verified_chunk(index, vectors=False)
        if self.vector_dim is not None:
            self._verified_chunk(index, vectors=True)

    def verify(self, progress: bool = False) -> None:
        """Re-read every chunk and check its CRCs against the manifest (reads the whole store)."""
        for i in tqdm(range(len(self._chunks)), desc="verify store", disable=not progress):
            self.verify_chunk(i)


ProduceFn = Callable[[int, int], "np.ndarray | tuple[np.ndarray, np.ndarray]"]


def build_store(
    path: str | Path,
    n_items: int,
    produce_fn: ProduceFn,
    m: int,
    d: int,
    fingerprint: dict[str, Any] | None,
    chunk_size: int = 4096,
    vector_dim: int | None = None,
    progress: bool = True,
    on_commit: Callable[[int], None] | None = None,
    dtype: str = "float16",
) -> LocalFeatureStore:
    """Fill (or resume filling) a store with rows ``0 .. n_items-1``.

    ``produce_fn(start, stop)`` returns the local sets of items ``[start, stop)`` (or
    ``(vectors, local)`` when ``vector_dim`` is set); it is called one chunk at a time and must
    depend only on ``(start, stop)`` (seed any randomness from them), which is what makes a
    resumed build byte-identical to an uninterrupted one. If the folder already holds a store with
    the same fingerprint and shapes, the build resumes after its last committed chunk; rows that
    were produced but not committed when the process died are produced again.
    ``on_commit(rows_committed)`` is called after each committed chunk (progress reporting, tests).
    """
    path = Path(path)
    if (path / MANIFEST).exists():
        store = LocalFeatureStore.open(path, expected_fingerprint=fingerprint, mode="a")
        mismatch = {
            k: (have, want)
            for k, have, want in (
                ("m", store.m, m),
                ("d", store.d, d),
                ("chunk_size", store.chunk_size, chunk_size),
                ("vector_dim", store.vector_dim, vector_dim),
                ("dtype", store.dtype.name, dtype),
            )
            if have != want
        }
        if mismatch:
            raise DeepEMDError(
                f"existing store has different shapes {mismatch} (stored, requested)",
                path,
                "delete the folder to rebuild, or build with the stored settings",
            )
        if len(store) > n_items:
            raise DeepEMDError(
                f"existing store holds {len(store)} items, more than the {n_items} requested",
                path,
                "delete the folder to rebuild it for this gallery",
            )
    else:
        store = LocalFeatureStore.create(path, m, d, fingerprint, chunk_size, vector_dim, dtype)
    start = len(store)
    with tqdm(total=n_items, initial=start, desc="feature store", unit="img", disable=not progress) as bar:
        while start < n_items:
            stop = min((start // chunk_size + 1) * chunk_size, n_items)
            produced = produce_fn(start, stop)
            if vector_dim is None:
                store.append(produced)
            else:
                vectors, local = produced
                store.append(local, vectors)
            if stop == n_items:
                store.flush()
            bar.update(stop - start)
            start = stop
            if on_commit is not None:
                on_commit(store.committed)
    return store


__all__ = ["DTYPES", "LocalFeatureStore", "build_store", "check_fingerprint", "encode", "normalise_fingerprint"]
