"""A searchable gallery: FAISS index of global vectors + local-feature store + id map.

Layout of a gallery folder (``deepemd retrieval index --out G``)::

    G/index.faiss (+ .json sidecar)   global vectors; id i = row i            (retrieval.index)
    G/local/                          local sets, row i = image i             (retrieval.store)
    G/ids.txt                         "<faiss id>\\t<image path>" per row

A user's own FAISS index (built outside deepemd) is reranked the same way: its id map names the
image behind every id, the store is built for those images once (``G/local``), and the user's
index file is searched in place. Both halves carry the model fingerprint, and the store's also
records the id map's checksum, so a store out of step with its index or model is refused.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from deepemd.data import ImageList
from deepemd.errors import DeepEMDError
from deepemd.io import atomic_path
from deepemd.retrieval import index as faiss_index
from deepemd.retrieval.model import Embedder
from deepemd.retrieval.rerank import RerankSettings, rerank
from deepemd.retrieval.store import LocalFeatureStore, build_store

INDEX_FILE = "index.faiss"
STORE_DIR = "local"
ID_MAP = "ids.txt"


@dataclass
class Gallery:
    index: faiss.Index
    store: LocalFeatureStore
    ids: np.ndarray          # FAISS id of each store row
    paths: list[Path]        # image of each store row

    def rows(self, faiss_ids: np.ndarray) -> np.ndarray:
        """Store rows of FAISS ids (identity for deepemd-built indexes)."""
        order = np.argsort(self.ids, kind="stable")
        pos = np.searchsorted(self.ids, faiss_ids, sorter=order)
        pos = np.clip(pos, 0, len(order) - 1)
        rows = order[pos]
        if not np.array_equal(self.ids[rows], faiss_ids):
            missing = faiss_ids[self.ids[rows] != faiss_ids][0]
            raise DeepEMDError(f"the index returned id {int(missing)}, which the id map does not list",
                               fix="give the id map that belongs to this index (one line per indexed image)")
        return rows


def read_id_map(path: str | Path) -> tuple[np.ndarray, list[Path]]:
    """Lines ``<id>\\t<path>`` (or ``<id> <path>``), or just ``<path>`` (id = line number).
    Relative paths are taken from the id map's folder."""
    path = Path(path)
    if not path.is_file():
        raise DeepEMDError("id map not found", path, "give a text file with one '<id> <image path>' line per indexed image")
    ids, paths = [], []
    for number, line in enumerate(l for l in path.read_text().splitlines() if l.strip()):
        head, _, rest = line.strip().partition("\t") if "\t" in line else line.strip().partition(" ")
        if rest and head.lstrip("-").isdigit():
            ids.append(int(head))
            paths.append(Path(rest.strip()))
        else:
            ids.append(number)
            paths.append(Path(line.strip()))
    if not ids:
        raise DeepEMDError("id map is empty", path, "list the indexed images, one per line")
    paths = [p if p.is_absolute() else path.parent / p for p in paths]
    arr = np.asarray(ids, dtype=np.int64)
    if len(np.unique(arr)) != len(arr):
        raise DeepEMDError("id map lists an id twice", path, "every FAISS id must name exactly one image")
    return arr, paths


def write_id_map(path: Path, ids: np.ndarray, paths: list[Path]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{int(i)}\t{p}\n" for i, p in zip(ids, paths)))


def _crc(path: Path) -> int:
    return zlib.crc32(Path(path).read_bytes())


def store_fingerprint(model: Embedder, kind: str, id_map: Path) -> dict:
    return {**model.fingerprint(kind), "id_map_crc32": _crc(id_map)}


def make_producer(model: Embedder, kind: str, paths: list[Path], batch_size: int, workers: int,
                  device: torch.device, with_vectors: bool):
    """``produce(start, stop)`` for ``build_store``: embeds images [start, stop) only, reseeding
    random patches from ``start`` so a resumed build writes the same bytes."""
    from deepemd.retrieval.evaluate import make_loader

    images = ImageList(list(paths), np.zeros(len(paths), dtype=np.int64), ["gallery"], Path("."))
    extractor = model.extractors[kind]

    @torch.no_grad()
    def produce(start: int, stop: int):
        if hasattr(extractor, "reseed"):
            extractor.reseed(model.specs[kind].seed * 1_000_003 + start)
        loader = make_loader(images.subset(np.arange(start, stop)), model, batch_size, workers)
        model.eval().to(device)
        vecs, sets = [], []
        for batch, _ in loader:
            g, s = model(batch.to(device))
            vecs.append(g.float().cpu().numpy())
            sets.append(s[kind].cpu().numpy())
        local = np.concatenate(sets)
        return (np.concatenate(vecs), local) if with_vectors else local
    return produce


@torch.no_grad()
def set_shape(model: Embedder, kind: str, device: torch.device) -> tuple[int, int]:
    """(nodes, channels) of one local set at the model's image size (one dummy forward)."""
    model.eval().to(device)
    size = model.info.image_size
    _, sets = model(torch.zeros(1, 3, size, size, device=device))
    return int(sets[kind].shape[1]), int(sets[kind].shape[2])


def build_gallery(model: Embedder, kind: str, paths: list[Path], out: Path, spec: str, batch_size: int,
                  workers: int, device: torch.device, progress: bool = True) -> Gallery:
    """Index + store for ``paths`` in ``out`` (resumes a killed store build)."""
    out.mkdir(parents=True, exist_ok=True)
    ids = np.arange(len(paths), dtype=np.int64)
    write_id_map(out / ID_MAP, ids, paths)
    fp = store_fingerprint(model, kind, out / ID_MAP)
    m, d = set_shape(model, kind, device)
    produce = make_producer(model, kind, paths, batch_size, workers, device, with_vectors=True)
    store = build_store(out / STORE_DIR, len(paths), produce, m, d, fp, vector_dim=model.dim, progress=progress)
    index = faiss_index.build_index_from_store(store, spec=spec, metric="ip", progress=progress)
    faiss_index.save_index(index, out / INDEX_FILE, fp)
    return Gallery(index, LocalFeatureStore.open(out / STORE_DIR, fp), ids, list(paths))


def build_foreign_store(model: Embedder, kind: str, index_path: Path, id_map: Path, out: Path, batch_size: int,
                        workers: int, device: torch.device, progress: bool = True) -> Gallery:
    """Local sets for the images behind a user's FAISS index (built once, then reused)."""
    index = faiss_index.load_foreign_index(index_path)
    ids, paths = read_id_map(id_map)
    if len(ids) != index.ntotal:
        raise DeepEMDError(f"id map lists {len(ids)} images but the index holds {index.ntotal} vectors", id_map,
                           "give the id map written together with this index")
    out.mkdir(parents=True, exist_ok=True)
    write_id_map(out / ID_MAP, ids, paths)
    fp = store_fingerprint(model, kind, out / ID_MAP)
    m, d = set_shape(model, kind, device)
    produce = make_producer(model, kind, paths, batch_size, workers, device, with_vectors=False)
    store = build_store(out / STORE_DIR, len(paths), produce, m, d, fp, progress=progress)
    return Gallery(index, store, ids, paths)


def open_gallery(out: Path, model: Embedder, kind: str, index_path: Path | None = None) -> Gallery:
    """Open a built gallery; the index and store must match the model (fingerprint) and each other."""
    out = Path(out)
    ids, paths = read_id_map(out / ID_MAP)
    fp = store_fingerprint(model, kind, out / ID_MAP)
    if index_path is None:
        index = faiss_index.load_index(out / INDEX_FILE, expected_fingerprint=fp)
    else:
        index = faiss_index.load_foreign_index(index_path)
    store = LocalFeatureStore.open(out / STORE_DIR, expected_fingerprint=fp)
    if len(store) != index.ntotal or len(ids) != index.ntotal:
        raise DeepEMDError(f"feature store holds {len(store)} sets and the id map {len(ids)} lines, but the "
                           f"index holds {index.ntotal} vectors: they are out of step", out / STORE_DIR,
                           "rebuild the gallery (deepemd retrieval index) so index and store match")
    if index.d != model.dim and index_path is None:
        raise DeepEMDError(f"index dimension {index.d} differs from the model's {model.dim}", out / INDEX_FILE,
                           "use the backbone / checkpoint the gallery was built with")
    return Gallery(index, store, ids, paths)


def search_gallery(gallery: Gallery, query_vectors: np.ndarray, query_sets: np.ndarray, k: int,
                   settings: RerankSettings, progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FAISS top-``max(k, depth)`` then the DeepEMD rerank; returns (scores, FAISS ids, raw ids)."""
    if len(query_vectors) == 0:
        raise DeepEMDError("no queries to search", fix="give at least one query image")
    if query_vectors.shape[1] != gallery.index.d:
        raise DeepEMDError(f"query vectors have {query_vectors.shape[1]} dimensions, the index {gallery.index.d}",
                           fix="give --query-vectors made by the model that built the index, or use that backbone")
    scores, ids = faiss_index.search(gallery.index, query_vectors, max(k, settings.depth))
    raw = ids.copy()

    def fetch(faiss_ids: np.ndarray) -> np.ndarray:
        return gallery.store.get(gallery.rows(faiss_ids))

    scores, ids = rerank(scores, ids, lambda i: query_sets[i], fetch, settings, progress=progress)
    return scores[:, :k], ids[:, :k], raw[:, :k]
