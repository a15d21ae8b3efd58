"""`deepemd retrieval index` and `deepemd retrieval search`: build a gallery, query it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from deepemd.config import build_config
from deepemd.data import ImageList, drop_unreadable
from deepemd.data.layouts import IMAGE_SUFFIXES, is_image_file
from deepemd.device import default_device
from deepemd.errors import DeepEMDError
from deepemd.eval import write_results
from deepemd.eval.shortlist import Shortlist
from deepemd.retrieval.build import NETWORK_OPTIONS, dataset_images, local_specs, make_embedder, recipe
from deepemd.retrieval.config import IndexConfig, SearchConfig
from deepemd.retrieval.gallery import (
    GALLERY_MANIFEST,
    ID_MAP,
    Gallery,
    build_foreign_store,
    make_producer,
    open_gallery,
    read_id_map,
    read_manifest,
    search_gallery,
    write_gallery,
)
from deepemd.retrieval.rerank import RerankSettings
from deepemd.retrieval.transaction import GalleryLock


def _foreign(cfg) -> bool:
    if bool(cfg.index) != bool(cfg.id_map):
        raise DeepEMDError(
            "--index and --id-map go together",
            fix="give your FAISS index file and the text file naming the image of each id",
        )
    return bool(cfg.index)


def run_index(cfg: IndexConfig, progress: bool = True) -> dict[str, Any]:
    """Build or update ``cfg.out`` (one transaction: the previous gallery stays intact until the new
    one is complete and verified): index + store for a dataset, or only the store for a user's
    index. Images already in the gallery (same path, size and mtime) are not embedded again."""
    out = Path(cfg.out)
    with GalleryLock(out):  # before loading the network: a second writer is told at once
        return _index_locked(cfg, out, progress)


def _index_locked(cfg: IndexConfig, out: Path, progress: bool) -> dict[str, Any]:
    model = make_embedder(cfg, local_specs(cfg, [cfg.local]))
    device = default_device(cfg.device)
    repair, dtype = bool(cfg.repair), cfg.store_dtype
    if _foreign(cfg):
        gallery = build_foreign_store(
            model,
            cfg.local,
            Path(cfg.index),
            Path(cfg.id_map),
            out,
            cfg.batch_size,
            cfg.workers,
            device,
            progress,
            repair=repair,
            store_dtype=dtype,
        )
    else:
        if not cfg.data_root:
            raise DeepEMDError("no --data-root given", fix="point --data-root at the gallery images")
        images = dataset_images(cfg)
        if len(images) == 0:
            raise DeepEMDError(f"split '{cfg.split}' holds no images", cfg.data_root, "check --split / --layout")
        gallery = write_gallery(
            model,
            cfg.local,
            images.paths,
            out,
            cfg.index_spec,
            cfg.batch_size,
            cfg.workers,
            device,
            repair=repair,
            store_dtype=dtype,
            progress=progress,
        )
    return {"gallery": gallery, "out": out, **gallery.stats}


def _check_id_map_agrees(gallery_dir: Path, id_map: Path) -> None:
    """``--id-map`` must name the images the gallery's store was built for (or the store is rebuilt)."""
    given_ids, given_paths = read_id_map(id_map)
    read_manifest(gallery_dir)
    ids, paths = read_id_map(gallery_dir / ID_MAP)
    if not (np.array_equal(given_ids, ids) and given_paths == paths):
        differ = next(
            (i for i in range(min(len(ids), len(given_ids))) if ids[i] != given_ids[i] or paths[i] != given_paths[i]),
            min(len(ids), len(given_ids)),
        )
        raise DeepEMDError(
            f"--id-map disagrees with the feature store in {gallery_dir} (first difference at line "
            f"{differ + 1}; {len(given_ids)} lines against the store's {len(ids)})",
            id_map,
            f"update the store for this id map: deepemd retrieval index --index ... --id-map {id_map} "
            f"--out {gallery_dir} (reuses the rows of unchanged images), or give another --gallery",
        )


def list_queries(path: str | Path) -> list[Path]:
    """A query image, a folder of them (searched recursively) or a text file of paths."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if is_image_file(p))
    elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        found = [path]
    elif path.is_file():
        found = [Path(line.strip()) for line in path.read_text().splitlines() if line.strip()]
    else:
        raise DeepEMDError("queries not found", path, "give an image, a folder of images or a text file of paths")
    if not found:
        raise DeepEMDError("no query images found", path, "give an image, a folder of images or a text file of paths")
    return found


def query_images(cfg: SearchConfig) -> list[Path]:
    """The query images (:func:`list_queries`); with ``skip_bad`` the unreadable ones are dropped
    with one counted warning, as the data options do for a dataset."""
    paths = list_queries(cfg.queries)
    if cfg.skip_bad:
        kept, _ = drop_unreadable(ImageList(paths, np.zeros(len(paths), np.int64), ["query"], Path(".")))
        if not kept.paths:
            raise DeepEMDError("none of the query images can be read", cfg.queries, "give readable images")
        paths = list(kept.paths)
    return paths


def _flag(key: str, value: Any) -> str:
    shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return f"--{key.replace('_', '-')} {shown}"


def with_gallery_network(cfg: SearchConfig, gallery_dir: Path) -> SearchConfig:
    """``cfg`` with the network options the gallery records (``gallery.json``) wherever the user
    left them at their defaults, so ``search --gallery G`` needs no repeat of ``index``'s flags.
    An option given with another value than the gallery's is refused here, before any network
    is loaded, naming the flag the gallery needs."""
    options = read_manifest(gallery_dir).get("options") or {}
    defaults = SearchConfig()
    given, wanted = recipe(cfg), recipe(defaults)
    taken, clashes = {}, []
    for key in NETWORK_OPTIONS:
        if key not in options or options[key] == given.get(key):
            continue
        if given.get(key) == wanted.get(key):
            taken[key] = options[key]
        elif options[key] is not None:
            clashes.append(f"{_flag(key, options[key])} (this search: {_flag(key, given.get(key))})")
    if clashes:
        raise DeepEMDError(
            "the gallery was built with " + "; ".join(clashes),
            gallery_dir / GALLERY_MANIFEST,
            "leave those flags out (search takes the gallery's network options), or index the images "
            "again with the new settings into another folder: deepemd retrieval index ... --out NEW",
        )
    recorded = build_config(SearchConfig, taken, str(gallery_dir / GALLERY_MANIFEST))
    return replace(cfg, **{key: getattr(recorded, key) for key in taken})


def _result_rows(
    gallery: Gallery, query: Path, ids: np.ndarray, scores: np.ndarray, raw: Shortlist, q: int, settings: RerankSettings
) -> list[dict[str, Any]]:
    """One CSV row per result. ``score`` is the DeepEMD (fused) score, empty for results past
    the rerank depth (``--top`` > ``--rerank-k``): those keep their FAISS order, and only their
    ``global_score`` is known, which is not comparable with a DeepEMD score."""
    raw_rank = {int(i): r + 1 for r, i in enumerate(raw.ids[q])}
    global_score = {int(i): float(s) for i, s in zip(raw.ids[q], raw.scores[q])}
    rows = []
    for rank, (fid, score) in enumerate(zip(ids, scores)):
        if fid < 0:
            continue
        row, faiss_rank = int(gallery.rows(np.array([fid]))[0]), raw_rank[int(fid)]
        rows.append(
            {
                "query": str(query),
                "rank": rank + 1,
                "id": int(fid),
                "path": str(gallery.paths[row]),
                "score": float(score) if faiss_rank <= settings.depth else None,
                "global_score": global_score[int(fid)],
                "raw_rank": faiss_rank,
            }
        )
    return rows


def run_search(cfg: SearchConfig, progress: bool = True) -> dict[str, Any]:
    """Top ``cfg.top`` gallery images per query after the DeepEMD rerank -> ``out/search.csv``."""
    if not cfg.queries:
        raise DeepEMDError("no --queries given", fix="give a query image, a folder of images or a list file")
    gallery_dir = Path(cfg.gallery)
    if not cfg.index or (gallery_dir / GALLERY_MANIFEST).exists():
        cfg = with_gallery_network(cfg, gallery_dir)
    paths = query_images(cfg)
    model = make_embedder(cfg, local_specs(cfg, [cfg.local]))
    device = default_device(cfg.device)
    index_path = None
    if _foreign(cfg):
        index_path = Path(cfg.index)
        if (gallery_dir / GALLERY_MANIFEST).exists():
            _check_id_map_agrees(gallery_dir, Path(cfg.id_map))
        else:
            build_foreign_store(
                model,
                cfg.local,
                index_path,
                Path(cfg.id_map),
                gallery_dir,
                cfg.batch_size,
                cfg.workers,
                device,
                progress,
            )
    gallery = open_gallery(gallery_dir, model, cfg.local, index_path)
    # float32 query sets: a network with tiny features (~1e-9) would lose them all in float16
    glob, sets = make_producer(model, cfg.local, paths, cfg.batch_size, cfg.workers, device, with_vectors=True)(
        np.arange(len(paths))
    )
    if cfg.query_vectors:
        glob = np.load(cfg.query_vectors).astype(np.float32)
        if glob.ndim != 2 or len(glob) != len(paths):
            raise DeepEMDError(
                f"query vectors have shape {glob.shape}, expected ({len(paths)}, dim)",
                cfg.query_vectors,
                "save one row per query image, in the order the queries are listed",
            )
    settings = RerankSettings(cfg.rerank_k, cfg.node_weights, cfg.solver, cfg.alpha, cfg.center)
    scores, ids, raw = search_gallery(gallery, glob, sets, cfg.top, settings, progress)
    rows = [
        row for q, path in enumerate(paths) for row in _result_rows(gallery, path, ids[q], scores[q], raw, q, settings)
    ]
    frame = write_results(rows, cfg.out, name="search", float_format="%.4f")
    return {"rows": rows, "frame": frame, "scores": scores, "ids": ids, "shortlist": raw}
