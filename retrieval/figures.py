"""The retrieval picture: a few queries, their top results before and after the DeepEMD rerank,
and the matching flow between the query and its new first result (FCN regions)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deepemd.data import ImageList
from deepemd.emd import cost_matrix, cross_reference_weights, solve, uniform_weights
from deepemd.eval.flows import cell_boxes, draw_flow, save_figure
from deepemd.retrieval.rerank import RerankSettings, rerank

SHOWN = 4  # results per row, before and after


def fcn_boxes(size: int, pyramid: tuple[int, ...], num_nodes: int) -> np.ndarray:
    """Boxes of FCN nodes: pooled pyramid levels first, then the raw (square) map cells."""
    raw = num_nodes - sum(s * s for s in pyramid)
    side = int(round(math.sqrt(raw)))
    return cell_boxes(size, size, tuple(pyramid) + (side,))


def _thumb(path: Path, size: int) -> np.ndarray:
    """The image as the network saw it: resized, centre-cropped to ``size`` (no normalisation)."""
    from deepemd.data.transforms import RESIZE_RATIO

    with Image.open(path) as img:
        big = round(size * RESIZE_RATIO)
        img = img.convert("RGB").resize((big, big))
        off = (big - size) // 2
        return np.asarray(img.crop((off, off, off + size, off + size)))


def _flow(u: np.ndarray, v: np.ndarray, weights: str, solver: str):
    a, b = torch.from_numpy(u.astype(np.float32))[None], torch.from_numpy(v.astype(np.float32))[None]
    wu, wv = (cross_reference_weights if weights == "cross" else uniform_weights)(a, b)
    _, flow = solve(cost_matrix(a, b), wu, wv, solver=solver)
    return flow[0].numpy(), wu[0].numpy(), wv[0].numpy()


def save_rerank_figure(path: Path, images: ImageList, glob: np.ndarray, sets: np.ndarray, model,
                       settings: RerankSettings, count: int, seed: int, candidates: int = 150) -> Path:
    """Rerank up to ``candidates`` random queries (leave-one-out), draw ``count`` of them."""
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    queries = np.sort(rng.choice(len(glob), size=min(candidates, len(glob)), replace=False))
    sims = glob[queries] @ glob.T
    sims[np.arange(len(queries)), queries] = -np.inf
    depth = min(settings.depth, len(glob) - 1)
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :depth]
    scores = np.take_along_axis(sims, ids, axis=1)
    _, after = rerank(scores, ids, lambda i: sets[queries[i]], lambda rows: sets[rows], settings)
    labels = images.labels
    chosen = pick_queries(labels, queries, ids, after, count, seed)
    size = model.info.image_size
    pyramid = model.specs["fcn"].pyramid
    boxes = fcn_boxes(size, tuple(pyramid), sets.shape[1])
    cols = 1 + 2 * SHOWN + 4
    fig = plt.figure(figsize=(1.3 * cols, 1.5 * len(chosen) + 0.4))
    grid = fig.add_gridspec(len(chosen), cols)
    for row, qi in enumerate(chosen):
        q = int(queries[qi])
        panels = [("query", q, None)] + [(f"raw {r + 1}", int(ids[qi, r]), q) for r in range(min(SHOWN, depth))] \
            + [(f"+EMD {r + 1}", int(after[qi, r]), q) for r in range(min(SHOWN, depth))]
        for col, (title, idx, query) in enumerate(panels):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(_thumb(images.paths[idx], size))
            ok = query is None or labels[idx] == labels[query]
            color = "black" if query is None else ("green" if ok else "red")
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(title, fontsize=7)
        top = int(after[qi, 0])
        flow, wq, wt = _flow(sets[q], sets[top], settings.weights, settings.solver)
        draw_flow(fig.add_subplot(grid[row, 1 + 2 * SHOWN:]), _thumb(images.paths[q], size),
                  _thumb(images.paths[top], size), boxes, boxes, flow, wq, wt, title="flow: query vs +EMD 1")
    fig.suptitle("green = same class; lines: DeepEMD flow (width ~ flow), dots: node weight (bright = heavy)",
                 fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def pick_queries(labels: np.ndarray, queries: np.ndarray, before: np.ndarray, after: np.ndarray,
                 count: int, seed: int) -> list[int]:
    """Rows to draw: first those whose top result the rerank corrected, then any whose top
    results changed, then random ones."""
    qlab = labels[queries]
    fixed = np.flatnonzero((labels[before[:, 0]] != qlab) & (labels[after[:, 0]] == qlab))
    changed = np.flatnonzero((before[:, :SHOWN] != after[:, :SHOWN]).any(axis=1))
    rest = np.random.default_rng(seed).permutation(len(queries))
    return [int(i) for i in dict.fromkeys([*fixed.tolist(), *changed.tolist(), *rest.tolist()])][:count]
