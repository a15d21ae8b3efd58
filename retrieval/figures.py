"""The retrieval picture: a few queries, their top results before and after the DeepEMD rerank,
and the matching flow between the query and its new first result (FCN regions).

Every thumbnail is the image as the network saw it (``deepemd.data.transforms.seen_image``: the
test transform's resize and centre crop), so the flow's boxes sit on the regions the nodes came
from, for non-square images too."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from deepemd.data import ImageList
from deepemd.data.transforms import seen_image
from deepemd.eval.flows import draw_flow, node_boxes, save_figure, set_flows
from deepemd.eval.shortlist import Shortlist
from deepemd.retrieval.rerank import Reranker, RerankSettings

SHOWN = 4  # results per row, before and after


def save_rerank_figure(
    path: Path,
    images: ImageList,
    glob: np.ndarray,
    sets: np.ndarray,
    model,
    settings: RerankSettings,
    count: int,
    seed: int,
    candidates: int = 150,
) -> Path:
    """Rerank up to ``candidates`` random queries (leave-one-out), draw ``count`` of them."""
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    queries = np.sort(rng.choice(len(glob), size=min(candidates, len(glob)), replace=False))
    sims = glob[queries] @ glob.T
    sims[np.arange(len(queries)), queries] = -np.inf
    depth = min(settings.depth, len(glob) - 1)
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :depth]
    before = Shortlist(ids, np.take_along_axis(sims, ids, axis=1))
    after = Reranker.from_settings(sets, settings, k=depth, prune=False).rerank(lambda i: sets[queries[i]], before).ids
    labels = images.labels
    chosen = pick_queries(labels, queries, ids, after, count, seed)
    size = model.info.image_size
    raw_side = int(round(math.sqrt(sets.shape[1] - sum(s * s for s in model.specs["fcn"].pyramid))))
    boxes = node_boxes("fcn", size, raw_side, tuple(model.specs["fcn"].pyramid))
    cols = 1 + 2 * SHOWN + 4
    fig = plt.figure(figsize=(1.3 * cols, 1.5 * len(chosen) + 0.4))
    grid = fig.add_gridspec(len(chosen), cols)
    for row, qi in enumerate(chosen):
        q = int(queries[qi])
        panels = (
            [("query", q, None)]
            + [(f"raw {r + 1}", int(ids[qi, r]), q) for r in range(min(SHOWN, depth))]
            + [(f"+EMD {r + 1}", int(after[qi, r]), q) for r in range(min(SHOWN, depth))]
        )
        for col, (title, idx, query) in enumerate(panels):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(seen_image(images.paths[idx], size))
            ok = query is None or labels[idx] == labels[query]
            color = "black" if query is None else ("green" if ok else "red")
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(title, fontsize=7)
        top = int(after[qi, 0])
        flow, wq, wt, _ = set_flows(sets[q][None], sets[top][None], settings.weights, settings.solver, settings.center)
        draw_flow(
            fig.add_subplot(grid[row, 1 + 2 * SHOWN :]),
            seen_image(images.paths[q], size),
            seen_image(images.paths[top], size),
            boxes,
            boxes,
            flow[0],
            wq[0],
            wt[0],
            title="flow: query vs +EMD 1",
        )
    fig.suptitle(
        "green = same class; lines: DeepEMD flow (width ~ flow), dots: node weight (bright = heavy)", fontsize=8
    )
    fig.tight_layout()
    return save_figure(fig, path)


def pick_queries(
    labels: np.ndarray, queries: np.ndarray, before: np.ndarray, after: np.ndarray, count: int, seed: int
) -> list[int]:
    """Rows to draw: first those whose top result the rerank corrected, then any whose top
    results changed, then random ones."""
    qlab = labels[queries]
    fixed = np.flatnonzero((labels[before[:, 0]] != qlab) & (labels[after[:, 0]] == qlab))
    changed = np.flatnonzero((before[:, :SHOWN] != after[:, :SHOWN]).any(axis=1))
    rest = np.random.default_rng(seed).permutation(len(queries))
    return [int(i) for i in dict.fromkeys([*fixed.tolist(), *changed.tolist(), *rest.tolist()])][:count]
