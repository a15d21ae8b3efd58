"""`deepemd retrieval eval`: leave-one-out retrieval on the eval classes, raw vs +DeepEMD.

Every eval image is a query against all the others (powerful-benchmarker protocol). The raw row
is pml's AccuracyCalculator with its default FAISS k-NN on the global vectors; each +DeepEMD row
is the same calculator with a ``knn_func`` that takes a FAISS shortlist (``retrieval.index``) and
reranks its first ``rerank_k`` with DeepEMD between local sets.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepemd.build import resolve_data
from deepemd.data import ImageList
from deepemd.device import default_device
from deepemd.errors import DeepEMDError
from deepemd.eval import write_results
from deepemd.eval.retrieval import ShortlistKNN, depth_note, retrieval_metrics
from deepemd.eval.shortlist import Shortlist
from deepemd.io import atomic_path
from deepemd.local import KINDS
from deepemd.local.fcn import pyramid_pooling
from deepemd.retrieval import index as faiss_index
from deepemd.retrieval.build import (
    dataset_images,
    local_specs,
    make_embedder,
    make_loader,
)
from deepemd.retrieval.config import EvalConfig
from deepemd.retrieval.model import Embedder, embed_loader
from deepemd.retrieval.rerank import Reranker, RerankSettings
from deepemd.timing import JobClock, format_seconds, stage

#: A run its own estimate puts over this many seconds gets a warning naming cheaper options.
LONG_RUN_SECONDS = 600.0


def parse_method(method: str, default_weights: str) -> tuple[str, str, str]:
    """``"fcn"`` or ``"fcn:uniform"`` -> (kind, node weights, row label)."""
    kind, _, weights = method.partition(":")
    weights = weights or default_weights
    if kind not in KINDS:
        raise DeepEMDError(
            f"unknown method '{method}'", fix=f"methods are {', '.join(KINDS)} (optionally ':uniform' or ':cross')"
        )
    label = f"+DeepEMD-{KINDS.info(kind)['label']}" + ("" if weights == default_weights else f" ({weights})")
    return kind, weights, label


def flat_shortlist(query: np.ndarray, reference: np.ndarray, n: int) -> Shortlist:
    """Exact inner-product top-n over the reference (L2-normalised vectors: cosine order)."""
    with stage("faiss"):
        index = faiss_index.build_index(reference, spec="Flat", metric="ip")
        scores, ids = faiss_index.search(index, query, n)
    return Shortlist(ids, scores)


def rerank_knn(
    sets: np.ndarray,
    settings: RerankSettings,
    progress: bool = True,
    clock: JobClock | None = None,
    stage_name: str = "rerank",
) -> ShortlistKNN:
    """A pml knn_func over in-memory local sets aligned with the evaluated embeddings: every
    image is a query against the others, so one array serves as queries and as the store.
    pml asks for the k (the largest class size) that its metrics read: the rerank returns the
    exact top k of each row's ``depth`` and skips the LPs that cannot reach it."""

    def reorder(shortlist: Shortlist, k: int, skip: np.ndarray | None) -> Shortlist:
        reranker = Reranker.from_settings(sets, settings, k=k, progress=progress, clock=clock, clock_stage=stage_name)
        return reranker.rerank(sets, shortlist, skip)

    return ShortlistKNN(flat_shortlist, reorder, settings.depth)


def evaluate_arrays(
    glob: np.ndarray,
    labels: np.ndarray,
    sets: dict[str, np.ndarray],
    methods: list[tuple[str, str, str]],
    settings: RerankSettings,
    clock: JobClock | None = None,
    progress: bool = True,
    distance: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Rows ``method, P@1, RP, MAP@R, queries/s``: raw first, then each +DeepEMD method; with a
    class ``distance`` (a label hierarchy's) also the severity of each query's first wrong result.
    ``settings.pyramid`` is the FCN sets' feature pyramid (the other kinds have none)."""
    rows = [{"method": "raw", **retrieval_metrics(glob, labels, distance=distance)}]
    for kind, weights, label in methods:
        knn = rerank_knn(
            sets[kind],
            replace(settings, weights=weights, pyramid=settings.pyramid if kind == "fcn" else ()),
            progress,
            clock,
            f"rerank: {label}",
        )
        rows.append({"method": label, **retrieval_metrics(glob, labels, knn, distance)})
    return rows


def plan_job(
    model: Embedder, cfg: EvalConfig, n_images: int, methods: list[tuple[str, str, str]], device: torch.device
) -> JobClock:
    """The whole job's ETA before it starts: one timed forward of two images and one timed full
    rerank of a synthetic query per method (each after one warm-up, which on a fresh install also
    compiles the EMD kernel), scaled to the run's size."""
    clock = JobClock()
    size = model.info.image_size
    x = torch.rand(2, 3, size, size, device=device)
    model.for_inference(device)
    generators = [e.generator for e in model.extractors.values() if hasattr(e, "generator")]
    states = [g.get_state() for g in generators]  # the run's random patches must not depend on the plan
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        model(x)
    clock.plan("features", n_images, (time.perf_counter() - start) / 2)
    for g, state in zip(generators, states):
        g.set_state(state)
    depth = max(1, min(cfg.rerank_k, n_images - 1))
    gen = torch.Generator().manual_seed(0)
    for kind, weights, label in methods:
        pyramid = tuple(cfg.pyramid) if kind == "fcn" else ()
        sets = plan_sets(depth + 1, model.num_nodes(kind), model.dim, kind, pyramid, gen)
        shortlist = Shortlist(np.arange(1, depth + 1)[None], np.linspace(1.0, 0.0, depth)[None])
        reranker = Reranker(
            sets,
            k=depth,
            weights=weights,
            solver=cfg.solver,
            center=cfg.center,
            pyramid=pyramid,
            prune=False,
        )
        # the CSR copy as the run decides it: leave-one-out scores depth entries for every image
        reranker.sets.index_for(n_images * depth, None)
        reranker.rerank(sets, shortlist)  # warm-up: the first solve of a fresh install compiles the kernel
        start = time.perf_counter()
        reranker.rerank(sets, shortlist)
        clock.plan(f"rerank: {label}", n_images, time.perf_counter() - start)
    return clock


def plan_sets(
    count: int, nodes: int, dim: int, kind: str, pyramid: tuple[int, ...], gen: torch.Generator
) -> torch.Tensor:
    """Random float16 sets about as sparse as EfficientNet's (FCN map cells ~8% nonzero, with
    their pyramid averaged from them; Grid and Sampling nodes ~31%), so the plan times the
    rerank's own path (sparse, cell-only dots) rather than a dense stand-in's."""
    pooling = pyramid_pooling(pyramid, nodes) if pyramid else None
    cells = nodes - (0 if pooling is None else pooling.shape[0])
    shift = 1.4 if kind == "fcn" else 0.5  # relu(N(0,1) - shift): P(x > 1.4) ~ 8%, P(x > 0.5) ~ 31%
    x = torch.relu(torch.randn(count, cells, dim, generator=gen) - shift)
    if pooling is not None:
        x = torch.cat([pooling @ x, x], dim=1)
    return x.half()


def long_run_warning(clock: JobClock, cfg: EvalConfig, n_images: int) -> str | None:
    """What to say before a run the estimate puts over :data:`LONG_RUN_SECONDS`."""
    total = clock.remaining()
    if total <= LONG_RUN_SECONDS:
        return None
    parts = ", ".join(f"{name} {format_seconds(p.remaining())}" for name, p in clock.plans.items())
    cheaper = []
    if len(cfg.methods) > 1:
        cheaper.append("--methods fcn (one local kind: no crops through the backbone)")
    cheaper.append(f"a smaller --image-size (now {clock_size(cfg)}; the backbone's cost grows with its square)")
    cheaper.append(f"--per-class N (now {n_images} images; the rerank grows with the image count)")
    if cfg.rerank_k > 20:
        cheaper.append(f"a smaller --rerank-k (now {cfg.rerank_k})")
    return f"this eval will take about {format_seconds(total)} on this machine ({parts}); cheaper: " + "; ".join(
        cheaper
    )


def clock_size(cfg: EvalConfig) -> str:
    return f"{cfg.image_size} px" if cfg.image_size else "the backbone's default"


def class_distances(cfg: EvalConfig, images: ImageList) -> np.ndarray | None:
    """``(K, K)`` path lengths between the eval classes in ``--hierarchy``'s tree (None without one)."""
    if not cfg.hierarchy:
        return None
    from deepemd.labels import load_hierarchy

    root = resolve_data(cfg)[1] if cfg.hierarchy == "folders" else None
    return load_hierarchy(cfg.hierarchy, images.classes, root).distance_matrix().numpy()


def run_eval(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """The whole job; returns rows, notes and paths (also written to ``cfg.out``)."""
    if not cfg.data_root:
        raise DeepEMDError("no --data-root given", fix="point --data-root at <root>/<class>/<image> (or a CUB folder)")
    torch.manual_seed(cfg.seed)
    images = dataset_images(cfg)
    if len(images) == 0:
        raise DeepEMDError(
            f"split '{cfg.split}' holds no images after subsampling",
            cfg.data_root,
            "check --split, --max-classes and --per-class",
        )
    methods = [parse_method(m, cfg.node_weights) for m in cfg.methods]
    kinds = [k for k, _, _ in methods] + (["fcn"] if cfg.flow_queries > 0 else [])
    model = make_embedder(cfg, local_specs(cfg, kinds))
    device = default_device(cfg.device)
    clock = plan_job(model, cfg, len(images), methods, device)
    warning = long_run_warning(clock, cfg, len(images))
    if warning and progress:
        print(f"deepemd: warning: {warning}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    loader = make_loader(images, model, cfg.batch_size, cfg.workers)
    glob, sets, labels = embed_loader(model, loader, device, progress=progress, clock=clock)
    embed_seconds = time.perf_counter() - start
    settings = RerankSettings(cfg.rerank_k, cfg.node_weights, cfg.solver, cfg.alpha, cfg.center, tuple(cfg.pyramid))
    rows = evaluate_arrays(glob, labels, sets, methods, settings, clock, progress, class_distances(cfg, images))
    notes = [
        f"{len(images)} images in {len(np.unique(labels))} classes ({cfg.layout} layout, split "
        f"'{cfg.split}'), leave-one-out; backbone {model.info.backbone} ({model.info.source}), "
        f"{model.info.image_size} px; features took {embed_seconds:.1f} s; queries/s counts the "
        f"FAISS search + rerank only; local sets: "
        + ", ".join(f"{k} {v.shape[1]} nodes x {v.shape[2]}-d" for k, v in sets.items())
    ]
    note = depth_note(labels, cfg.rerank_k)
    if note:
        notes.append(note)
    out = Path(cfg.out)
    frame = write_results(rows, out)
    write_notes(out / "results.md", notes)
    picture = None
    if cfg.flow_queries > 0:
        from deepemd.retrieval.figures import save_rerank_figure

        with stage("figure"):
            picture = save_rerank_figure(
                out / "flows.png", images, glob, sets["fcn"], model, settings, cfg.flow_queries, cfg.seed
            )
    return {"rows": rows, "frame": frame, "notes": notes, "out": out, "figure": picture, "config": asdict(cfg)}


def write_notes(md_path: Path, notes: list[str]) -> None:
    """Append notes under the table in ``results.md`` (rewritten atomically)."""
    text = md_path.read_text().rstrip("\n") + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    with atomic_path(md_path) as tmp:
        tmp.write_text(text)
