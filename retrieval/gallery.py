"""A searchable gallery: FAISS index of global vectors + local-feature store + id map.

Layout of a gallery folder (``deepemd retrieval index --out G``)::

    G/index.faiss (+ .json sidecar)   global vectors; id i = row i            (retrieval.index)
    G/local/                          local sets, row i = image i             (retrieval.store)
    G/ids.txt                         "<faiss id>\\t<image path>" per row, paths relative to G
    G/sources.npy                     (size, mtime_ns) of each image when it was embedded
    G/gallery.json                    model fingerprint, store dtype, length + CRC-32 of ids.txt
                                      and sources.npy; written last (the gallery's commit point)

Every read is verified: ``ids.txt`` and ``sources.npy`` against ``gallery.json``, the index
against its sidecar, every store row against its CRC (see ``retrieval.store``). Both halves carry
the model fingerprint plus the id map's checksum, so a store out of step with its index or model
is refused rather than searched.

Writes go through :mod:`deepemd.retrieval.transaction` (a lock, a staging folder, an atomic
swap): a failed, killed or concurrent ``index`` leaves the previous gallery exactly as it was.
Re-running ``index`` after the data changed is an **incremental** update: the rows of images
whose path, size and modification time are unchanged are copied from the previous gallery's
store (each one CRC-checked), only new or changed images go through the network, and the result
is the gallery a fresh build over the new image list gives (row order = the new list). With
``repair`` a damaged previous gallery is not an error: rows that fail their checksum are
re-embedded instead of copied; without it, damage is reported and nothing is written.

A user's own FAISS index (built outside deepemd) is reranked the same way: its id map names the
image behind every id, the store is built for those images (``G/local``), and the user's index
file is searched in place.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from deepemd.data import ImageList
from deepemd.errors import DeepEMDError
from deepemd.eval.shortlist import Shortlist
from deepemd.io import atomic_path
from deepemd.manifest import REPAIR_FIX, crc32, fingerprint_diffs, read_checked
from deepemd.retrieval import index as faiss_index
from deepemd.retrieval.candidates import stored_pyramid
from deepemd.retrieval.model import Embedder
from deepemd.retrieval.rerank import Reranker, RerankSettings
from deepemd.retrieval.store import MANIFEST as STORE_MANIFEST
from deepemd.retrieval.store import LocalFeatureStore, build_store
from deepemd.retrieval.transaction import GalleryLock, staging_path, swap_in
from deepemd.seeding import derive_seed

INDEX_FILE = "index.faiss"
STORE_DIR = "local"
ID_MAP = "ids.txt"
SOURCES = "sources.npy"
GALLERY_MANIFEST = "gallery.json"
GALLERY_FORMAT = "deepemd-gallery"
GALLERY_VERSION = 1
CHUNK_SIZE = 4096  # store rows per chunk file
SOURCE_DTYPE = np.dtype([("size", "<i8"), ("mtime_ns", "<i8")])


@dataclass
class Gallery:
    index: faiss.Index
    store: LocalFeatureStore
    ids: np.ndarray  # FAISS id of each store row
    paths: list[Path]  # image of each store row (absolute)
    stats: dict[str, int] = field(default_factory=dict)  # reused / embedded rows of the last write

    model: Embedder | None = None  # the network that embeds queries (set by Gallery.open)
    kind: str = "fcn"

    @classmethod
    def open(cls, path: str | Path, device: str | None = None) -> "Gallery":
        """Open gallery ``path`` with the network that built it, rebuilt from the options its
        ``gallery.json`` records (and checked against its fingerprint: same weights hash)."""
        from deepemd.config import build_config
        from deepemd.retrieval.build import local_specs, make_embedder
        from deepemd.retrieval.config import SearchConfig

        manifest = read_manifest(Path(path))
        if not manifest.get("options"):
            raise DeepEMDError(
                "this gallery does not record the options of its network",
                Path(path),
                "rebuild it with `deepemd retrieval index` (it reuses unchanged rows), or open it with "
                "open_gallery(path, model, kind)",
            )
        cfg = build_config(
            SearchConfig,
            {**manifest["options"], "gallery": str(path), "device": device},
            str(Path(path) / GALLERY_MANIFEST),
        )
        model = make_embedder(cfg, local_specs(cfg, [cfg.local]))
        gallery = open_gallery(Path(path), model, cfg.local)
        gallery.model, gallery.kind = model, cfg.local
        return gallery

    def search(
        self,
        queries: str | Path | list[str | Path] | np.ndarray,
        k: int = 10,
        rerank: bool = True,
        settings: RerankSettings | None = None,
        batch_size: int = 32,
    ) -> Shortlist:
        """Top ``k`` gallery entries per query, best first (FAISS ids; :attr:`paths` via
        :meth:`rows`). ``queries``: image paths, or one image, folder or list file as
        ``deepemd retrieval search --queries`` takes it, embedded by the gallery's network (the
        FAISS shortlist is then reranked by DeepEMD unless ``rerank=False``), or global vectors
        ``(Q, D)`` (no local sets: no rerank)."""
        from deepemd.retrieval.search import list_queries

        if isinstance(queries, np.ndarray):
            if rerank:
                raise DeepEMDError(
                    "query vectors carry no local sets to rerank with",
                    fix="give query images, or search(vectors, rerank=False)",
                )
            scores, ids = faiss_index.search(self.index, queries.astype(np.float32), k)
            return Shortlist(ids, scores)
        if self.model is None:
            raise DeepEMDError("this gallery was opened without its network", fix="open it with Gallery.open(path)")
        paths = list_queries(queries) if isinstance(queries, (str, Path)) else [Path(q) for q in queries]
        if not paths:
            raise DeepEMDError("no queries given", fix="give query image paths, a folder of images or a list file")
        glob, sets = make_producer(
            self.model, self.kind, paths, batch_size, 0, next(self.model.parameters()).device, with_vectors=True
        )(np.arange(len(paths)))
        if rerank:
            scores, ids, _ = search_gallery(self, glob, sets, k, settings or RerankSettings())
        else:
            scores, ids = faiss_index.search(self.index, glob, k)
        return Shortlist(ids, scores)

    def rows(self, faiss_ids: np.ndarray) -> np.ndarray:
        """Store rows of FAISS ids (identity for deepemd-built indexes)."""
        order = np.argsort(self.ids, kind="stable")
        pos = np.searchsorted(self.ids, faiss_ids, sorter=order)
        pos = np.clip(pos, 0, len(order) - 1)
        rows = order[pos]
        if not np.array_equal(self.ids[rows], faiss_ids):
            missing = faiss_ids[self.ids[rows] != faiss_ids][0]
            raise DeepEMDError(
                f"the index returned id {int(missing)}, which the id map does not list",
                fix="give the id map that belongs to this index (one line per indexed image)",
            )
        return rows


# ---------------------------------------------------------------------------- id maps
def check_names(paths: list[Path]) -> None:
    """Refuse paths an id map line cannot hold: control characters (newline, tab, ...)."""
    for path in paths:
        text = str(path)
        if any(unicodedata.category(ch) == "Cc" for ch in text):
            raise DeepEMDError(
                f"the image path contains a control character ({_controls(text)}), which a "
                "one-line-per-image id map cannot hold",
                repr(text),
                "rename the file (or move it out of the data root)",
            )


def _controls(text: str) -> str:
    return ", ".join(sorted({repr(ch) for ch in text if unicodedata.category(ch) == "Cc"}))


def parse_id_map(text: str, folder: Path, path: Path) -> tuple[np.ndarray, list[Path]]:
    """Lines ``<id>\\t<path>`` (path taken verbatim), ``<id> <path>``, or just ``<path>`` (id =
    line number). Relative paths are taken from ``folder`` (the id map's own folder); returned
    paths are absolute and normalised."""
    ids, paths = [], []
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    for number, line in enumerate(line for line in lines if line.strip()):
        if "\t" in line:
            head, _, rest = line.partition("\t")
            head = head.strip()
        else:
            head, _, rest = line.strip().partition(" ")
            rest = rest.strip()
        if rest and head.lstrip("-").isdigit():
            ids.append(int(head))
            paths.append(rest)
        else:
            ids.append(number)
            paths.append(line.strip())
    if not ids:
        raise DeepEMDError("id map is empty", path, "list the indexed images, one per line")
    arr = np.asarray(ids, dtype=np.int64)
    if len(np.unique(arr)) != len(arr):
        raise DeepEMDError("id map lists an id twice", path, "every FAISS id must name exactly one image")
    base = os.path.abspath(folder)
    return arr, [Path(os.path.normpath(os.path.join(base, p))) for p in paths]


def read_id_map(path: str | Path) -> tuple[np.ndarray, list[Path]]:
    """A user's id map (see :func:`parse_id_map`); relative paths from the id map's folder."""
    path = Path(path)
    if not path.is_file():
        raise DeepEMDError(
            "id map not found", path, "give a text file with one '<id> <image path>' line per indexed image"
        )
    return parse_id_map(path.read_text(), path.parent, path)


def id_map_text(folder: Path, ids: np.ndarray, paths: list[Path]) -> str:
    """The id map for ``folder``: ``<id>\\t<path relative to folder>`` (paths as seen from the
    current directory are made absolute first, so reading from any directory finds them)."""
    check_names(paths)
    base = os.path.abspath(folder)
    return "".join(f"{int(i)}\t{os.path.relpath(os.path.abspath(p), base)}\n" for i, p in zip(ids, paths))


def write_id_map(path: Path, ids: np.ndarray, paths: list[Path]) -> None:
    text = id_map_text(path.parent, ids, paths)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def store_fingerprint(model: Embedder, kind: str, id_map_bytes: bytes) -> dict:
    return {**model.fingerprint(kind), "id_map_crc32": crc32(id_map_bytes)}


def sources_of(paths: list[Path]) -> np.ndarray:
    """(size, mtime_ns) of each image: what tells an unchanged image from a replaced one."""
    out = np.full(len(paths), -1, SOURCE_DTYPE).view(np.recarray)
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
        except OSError:
            continue  # the embedding step reports the missing image
        out[i] = (st.st_size, st.st_mtime_ns)
    return np.asarray(out).view(SOURCE_DTYPE)


# ---------------------------------------------------------------------------- the network side
def make_producer(
    model: Embedder,
    kind: str,
    paths: list[Path],
    batch_size: int,
    workers: int,
    device: torch.device,
    with_vectors: bool,
):
    """``produce(rows)`` for the images at positions ``rows``: (vectors, local sets), reseeding
    random patches from the first row so a resumed build writes the same bytes."""
    from deepemd.retrieval.build import make_loader

    images = ImageList(list(paths), np.zeros(len(paths), dtype=np.int64), ["gallery"], Path("."))
    extractor = model.extractors[kind]

    @torch.no_grad()
    def produce(rows: np.ndarray):
        if hasattr(extractor, "reseed"):
            extractor.reseed(derive_seed(model.specs[kind].seed, "crops", int(rows[0])))
        loader = make_loader(images.subset(rows), model, batch_size, workers)
        model.eval().to(device)
        vecs, sets = [], []
        for batch, _ in loader:
            g, s = model(batch.to(device))
            vecs.append(g.float().cpu().numpy())
            sets.append(s[kind].float().cpu().numpy())
        return np.concatenate(vecs), np.concatenate(sets)

    return produce


@torch.no_grad()
def set_shape(model: Embedder, kind: str, device: torch.device) -> tuple[int, int]:
    """(nodes, channels) of one local set at the model's image size (one dummy forward)."""
    model.eval().to(device)
    size = model.info.image_size
    _, sets = model(torch.zeros(1, 3, size, size, device=device))
    return int(sets[kind].shape[1]), int(sets[kind].shape[2])


# ---------------------------------------------------------------------------- reading a gallery
def read_manifest(out: Path) -> dict[str, Any]:
    path = out / GALLERY_MANIFEST
    if not out.is_dir():
        raise DeepEMDError(
            "gallery not found", out, "build it with `deepemd retrieval index --out ...`, or check --gallery"
        )
    if not path.is_file():
        raise DeepEMDError(
            "not a complete deepemd gallery (gallery.json missing: never finished, or written by an older deepemd)",
            out,
            "build it again with `deepemd retrieval index`",
        )
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != GALLERY_FORMAT or manifest.get("version") != GALLERY_VERSION:
            raise ValueError(f"format {manifest.get('format')!r} version {manifest.get('version')!r}")
        for key in ("fingerprint", "files", "count", "index", "store_dtype"):
            manifest[key]  # noqa: B018 - presence check
        for name in (ID_MAP, SOURCES):
            manifest["files"][name]["crc32"]  # noqa: B018
    except (ValueError, KeyError, TypeError) as exc:
        raise DeepEMDError(f"unreadable gallery manifest ({exc})", path, REPAIR_FIX) from None
    return manifest


def _read_pieces(out: Path, manifest: dict[str, Any]) -> tuple[bytes, np.ndarray, list[Path], np.ndarray]:
    """(id map bytes, ids, paths, sources), each checked against ``gallery.json``."""
    raw = read_checked(out / ID_MAP, manifest["files"][ID_MAP], "id map (id_map)")
    ids, paths = parse_id_map(raw.decode(), out, out / ID_MAP)
    try:
        sources = np.load(
            io.BytesIO(read_checked(out / SOURCES, manifest["files"][SOURCES], "image sources")), allow_pickle=False
        )
    except Exception as exc:  # noqa: BLE001 - numpy's header parser fails in many ways
        raise DeepEMDError(f"unreadable image sources ({exc})", out / SOURCES, REPAIR_FIX) from None
    if len(ids) != manifest["count"] or len(sources) != manifest["count"] or sources.dtype != SOURCE_DTYPE:
        raise DeepEMDError(
            f"id map lists {len(ids)} images, sources {len(sources)}, the manifest says {manifest['count']}",
            out,
            REPAIR_FIX,
        )
    return raw, ids, paths, sources


def _index_fix(out: Path) -> str:
    """A gallery's index is rebuilt from its store's vectors: no image goes through the network."""
    return (
        f"rebuild the index: run `deepemd retrieval index --out {out}` again with the --data-root and "
        "options it was built with (the index is rebuilt from the stored vectors; no image is embedded again)"
    )


def _check_inference_dtype(out: Path, manifest: dict[str, Any], model: Embedder) -> None:
    """A float32 fingerprint omits the dtype (older galleries keep theirs), so a bfloat16 gallery
    would pass a float32 model's fingerprint check: compare the dtypes themselves."""
    built = manifest["fingerprint"].get("inference_dtype", "float32")
    if built != model.inference_dtype:
        raise DeepEMDError(
            f"the gallery's features were extracted in {built}, this model runs in {model.inference_dtype}",
            out,
            f"search with --inference-dtype {built} (or leave it out: search takes the gallery's options)",
        )


def open_gallery(out: Path, model: Embedder, kind: str, index_path: Path | None = None) -> Gallery:
    """Open a built gallery; every piece is checked against its checksum, and the index and store
    must match the model (fingerprint) and each other."""
    out = Path(out)
    manifest = read_manifest(out)
    raw, ids, paths, _ = _read_pieces(out, manifest)
    _check_inference_dtype(out, manifest, model)
    fp = store_fingerprint(model, kind, raw)
    if index_path is None:
        if not manifest["index"]:
            raise DeepEMDError(
                "this gallery holds only a feature store for your own FAISS index",
                out,
                "give --index (your FAISS file) and --id-map with it",
            )
        index = faiss_index.load_index(out / INDEX_FILE, expected_fingerprint=fp, fix=_index_fix(out))
    else:
        index = faiss_index.load_foreign_index(index_path)
    store = LocalFeatureStore.open(out / STORE_DIR, expected_fingerprint=fp)
    if len(store) != index.ntotal or len(ids) != index.ntotal:
        raise DeepEMDError(
            f"feature store holds {len(store)} sets and the id map {len(ids)} lines, but the "
            f"index holds {index.ntotal} vectors: they are out of step",
            out / STORE_DIR,
            "rebuild the gallery (deepemd retrieval index) so index and store match",
        )
    if index.d != model.dim and index_path is None:
        raise DeepEMDError(
            f"index dimension {index.d} differs from the model's {model.dim}",
            out / INDEX_FILE,
            "use the backbone / checkpoint the gallery was built with",
        )
    return Gallery(index, store, ids, paths)


# ---------------------------------------------------------------------------- writing a gallery
@dataclass
class _Previous:
    """What a previous gallery offers for reuse: store rows keyed by (path, size, mtime)."""

    store: LocalFeatureStore
    rows: dict[tuple[str, int, int], int]


def _previous(
    out: Path, model: Embedder, kind: str, store_dtype: str, with_index: bool, repair: bool
) -> _Previous | None:
    """The previous gallery's reusable rows, None when there is none (or, with ``repair``, when
    it is too damaged to tell which rows are whose). Damage without ``repair`` is an error. Its
    FAISS index is not read: the new index is always built from the store's vectors, so a
    missing or damaged ``index.faiss`` is simply rebuilt by running ``index`` again."""
    if not (out / GALLERY_MANIFEST).exists():
        if (out / STORE_DIR / STORE_MANIFEST).exists() and not repair:
            raise DeepEMDError(
                "the folder holds a gallery deepemd cannot verify (no gallery.json: unfinished, or "
                "written by an older deepemd)",
                out,
                REPAIR_FIX,
            )
        return None
    try:
        manifest = read_manifest(out)
        if (
            fingerprint_diffs(manifest["fingerprint"], model.fingerprint(kind), "gallery")
            or manifest["store_dtype"] != store_dtype
        ):
            return None  # another model or store type: nothing is reusable, the new gallery replaces it
        raw, ids, paths, sources = _read_pieces(out, manifest)
        fp = store_fingerprint(model, kind, raw)
        store = LocalFeatureStore.open(out / STORE_DIR, expected_fingerprint=fp)
        if len(store) != len(ids):
            raise DeepEMDError(
                f"feature store holds {len(store)} sets, the id map {len(ids)}", out / STORE_DIR, REPAIR_FIX
            )
    except DeepEMDError:
        if repair:
            return None
        raise
    keys = {
        (str(p), int(s["size"]), int(s["mtime_ns"])): row
        for row, (p, s) in enumerate(zip(paths, sources))
        if s["size"] >= 0
    }
    if with_index and store.vector_dim != model.dim:
        return None  # a store for a user's own index keeps no global vectors to build ours from
    return _Previous(store, keys)


def _reuse_rows(
    store: LocalFeatureStore, rows: np.ndarray, with_vectors: bool, repair: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(sets, vectors or None, intact mask) of the previous store's ``rows``. Every row carries
    its own CRC, so with ``repair`` a batch that fails is read again row by row and only the rows
    that fail their own check are left to be embedded again; without it the damage is raised."""
    try:
        return (
            store.get(rows),
            store.get_vectors(rows) if with_vectors else None,
            np.ones(len(rows), bool),
        )
    except DeepEMDError:
        if not repair:
            raise
    sets = np.zeros((len(rows), store.m, store.d), np.float32)
    vecs = np.zeros((len(rows), store.vector_dim or 0), np.float32) if with_vectors else None
    intact = np.zeros(len(rows), bool)
    for i, row in enumerate(rows):
        try:
            sets[i] = store.get(row[None])[0]
            if vecs is not None:
                vecs[i] = store.get_vectors(row[None])[0]
        except DeepEMDError:
            continue
        intact[i] = True
    return sets, vecs, intact


def _staging_matches(staging: Path, id_map: bytes, fp: dict, store_dtype: str) -> bool:
    """True when ``staging`` holds (part of) a build of exactly this gallery: resume it."""
    try:
        if (staging / ID_MAP).read_bytes() != id_map:
            return False
        manifest = json.loads((staging / STORE_DIR / STORE_MANIFEST).read_text())
        return (
            not fingerprint_diffs(manifest["fingerprint"], fp, "store")
            and np.dtype(manifest["dtype"]).name == store_dtype
            and manifest["chunk_size"] == CHUNK_SIZE
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_gallery(
    model: Embedder,
    kind: str,
    paths: list[Path],
    out: Path,
    spec: str | None,
    batch_size: int,
    workers: int,
    device: torch.device,
    ids: np.ndarray | None = None,
    repair: bool = False,
    store_dtype: str = "float16",
    progress: bool = True,
) -> Gallery:
    """Build (or update) gallery ``out`` for ``paths`` as one transaction.

    ``spec`` is the FAISS index to build over the global vectors; None builds only the store (for
    a user's own index, whose ids are ``ids``). Rows of unchanged images are reused from the
    previous gallery in ``out``; the new gallery is built in a staging folder, verified and
    swapped in whole (see the module doc)."""
    out = Path(out)
    paths = [Path(os.path.abspath(p)) for p in paths]
    ids = np.arange(len(paths), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    with GalleryLock(out):
        staging = staging_path(out)
        id_map = id_map_text(staging, ids, paths).encode()
        fp = store_fingerprint(model, kind, id_map)
        sources = sources_of(paths)
        previous = _previous(out, model, kind, store_dtype, spec is not None, repair)
        if staging.exists() and not _staging_matches(staging, id_map, fp, store_dtype):
            shutil.rmtree(staging)
        staging.mkdir(parents=True, exist_ok=True)
        with atomic_path(staging / ID_MAP) as tmp:
            tmp.write_bytes(id_map)
        with atomic_path(staging / SOURCES) as tmp, open(tmp, "wb") as fh:
            np.save(fh, sources, allow_pickle=False)
        stats = {"reused": 0, "embedded": 0}
        embed = make_producer(model, kind, paths, batch_size, workers, device, with_vectors=True)
        reuse = [
            previous.rows.get((str(p), int(s["size"]), int(s["mtime_ns"])), -1) if previous else -1
            for p, s in zip(paths, sources)
        ]
        reuse = np.asarray(reuse, dtype=np.int64)

        def produce(start: int, stop: int):
            vectors = np.zeros((stop - start, model.dim), np.float32)
            local = None
            rows = np.arange(start, stop)
            old = reuse[start:stop]
            take = old >= 0
            if take.any():
                sets, vecs, intact = _reuse_rows(previous.store, old[take], spec is not None, repair)
                take[take] = intact  # rows that fail their checksum (repair only): embed them again
                if take.any():
                    local = np.empty((stop - start, *sets.shape[1:]), np.float32)
                    local[take] = sets[intact]
                    if vecs is not None:
                        vectors[take] = vecs[intact]
            if (~take).any():
                vecs, sets = embed(rows[~take])
                local = np.empty((stop - start, *sets.shape[1:]), np.float32) if local is None else local
                local[~take], vectors[~take] = sets, vecs
            stats["reused"] += int(take.sum())
            stats["embedded"] += int((~take).sum())
            return (vectors, local) if spec is not None else local

        m, d = set_shape(model, kind, device)
        store = build_store(
            staging / STORE_DIR,
            len(paths),
            produce,
            m,
            d,
            fp,
            chunk_size=CHUNK_SIZE,
            vector_dim=model.dim if spec is not None else None,
            progress=progress,
            dtype=store_dtype,
        )
        if spec is not None:
            index = faiss_index.build_index_from_store(store, spec=spec, metric="ip", progress=progress)
            faiss_index.save_index(index, staging / INDEX_FILE, fp)
        manifest = {
            "format": GALLERY_FORMAT,
            "version": GALLERY_VERSION,
            "fingerprint": model.fingerprint(kind),
            "options": getattr(model, "recipe", None),
            "count": len(paths),
            "index": spec is not None,
            "store_dtype": store_dtype,
            "files": {
                name: {"bytes": (staging / name).stat().st_size, "crc32": crc32((staging / name).read_bytes())}
                for name in (ID_MAP, SOURCES)
            },
        }
        with atomic_path(staging / GALLERY_MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        _verify_staging(staging, model, kind, spec is None)
        swap_in(staging, out)
    gallery = open_gallery(out, model, kind, index_path=None) if spec is not None else None
    if gallery is None:
        gallery = Gallery(None, LocalFeatureStore.open(out / STORE_DIR, fp), ids, read_id_map(out / ID_MAP)[1])
    gallery.stats = stats
    return gallery


def build_foreign_store(
    model: Embedder,
    kind: str,
    index_path: Path,
    id_map: Path,
    out: Path,
    batch_size: int,
    workers: int,
    device: torch.device,
    progress: bool = True,
    repair: bool = False,
    store_dtype: str = "float16",
) -> Gallery:
    """Local sets for the images behind a user's FAISS index (``out`` then holds the store, the id
    map rewritten relative to ``out``, and the manifest); an update reuses unchanged images' rows."""
    index = faiss_index.load_foreign_index(index_path)
    ids, paths = read_id_map(id_map)
    if len(ids) != index.ntotal:
        raise DeepEMDError(
            f"id map lists {len(ids)} images but the index holds {index.ntotal} vectors",
            id_map,
            "give the id map written together with this index",
        )
    gallery = write_gallery(
        model,
        kind,
        paths,
        out,
        None,
        batch_size,
        workers,
        device,
        ids=ids,
        repair=repair,
        store_dtype=store_dtype,
        progress=progress,
    )
    gallery.index = index
    return gallery


def _verify_staging(staging: Path, model: Embedder, kind: str, store_only: bool) -> None:
    """Read the new gallery back in full (every CRC) before it may replace the old one."""
    try:
        manifest = read_manifest(staging)
        raw, *_ = _read_pieces(staging, manifest)
        store = LocalFeatureStore.open(staging / STORE_DIR, expected_fingerprint=store_fingerprint(model, kind, raw))
        store.verify()
        if not store_only:
            faiss_index.load_index(staging / INDEX_FILE, store_fingerprint(model, kind, raw), gpu=False)
    except DeepEMDError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise DeepEMDError(
            f"the new gallery failed verification before it was swapped in ({exc}); the previous gallery is unchanged",
            staging,
            "check the disk, then run the command again",
        ) from None


@dataclass
class _StoreByFaissId:
    """The gallery's store read by FAISS id (the ids a shortlist holds) rather than by row."""

    gallery: Gallery

    def get_stored(self, faiss_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows as stored and their scales (a store with only ``get``: float32 sets, scale 1)."""
        store, rows = self.gallery.store, self.gallery.rows(faiss_ids)
        if hasattr(store, "get_stored"):
            return store.get_stored(rows)
        return np.asarray(store.get(rows), np.float32), np.ones(len(rows), np.float32)


def search_gallery(
    gallery: Gallery,
    query_vectors: np.ndarray,
    query_sets: np.ndarray,
    k: int,
    settings: RerankSettings,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, Shortlist]:
    """FAISS top-``max(k, depth)`` then the DeepEMD rerank; returns (scores, FAISS ids) of the top
    ``k`` and the FAISS shortlist itself (global scores, width ``max(k, depth)``): entries past
    the rerank depth keep their global order, and their scores are global, not DeepEMD, ones.
    The rerank takes the FCN pyramid from the store's fingerprint (its pooled nodes' dots then
    come from the cells', see :mod:`~deepemd.retrieval.candidates`), whatever ``settings`` say."""
    if len(query_vectors) == 0:
        raise DeepEMDError("no queries to search", fix="give at least one query image")
    if query_vectors.shape[1] != gallery.index.d:
        raise DeepEMDError(
            f"query vectors have {query_vectors.shape[1]} dimensions, the index {gallery.index.d}",
            fix="give --query-vectors made by the model that built the index, or use that backbone",
        )
    scores, ids = faiss_index.search(gallery.index, query_vectors, max(k, settings.depth))
    shortlist = Shortlist(ids, scores)

    settings = replace(settings, pyramid=stored_pyramid(gallery.store.fingerprint))
    reranker = Reranker.from_settings(_StoreByFaissId(gallery), settings, k=k, progress=progress)
    top = reranker.rerank(lambda i: query_sets[i], shortlist)
    return np.array(top.scores), np.array(top.ids), shortlist
