"""Pictures of matching flows between the local regions of two images (paper Fig. 6/7).

Two images side by side; every region is a dot at its box centre whose brightness is its node
weight; every flow above a small share of the mass is a line between the two centres whose width
grows with the flow. Used by both jobs: retrieval (query vs reranked result) and few-shot
(query vs support). :func:`node_boxes` places a local set's nodes on the image as the network saw
it (``deepemd.data.transforms.seen_image``), :func:`set_flows` computes the flows as the jobs score
them, :func:`draw_flow` draws on any matplotlib axes and :func:`save_figure` writes a figure atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers / CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from deepemd.emd import cost_matrix, solve  # noqa: E402
from deepemd.emd.api import node_weights  # noqa: E402
from deepemd.io import atomic_path  # noqa: E402


def cell_boxes(height: int, width: int, levels: tuple[int, ...]) -> np.ndarray:
    """``(sum s*s, 4)`` pixel boxes ``(x0, y0, x1, y1)`` of s x s grids, level by level, row-major
    (the node order of FCN feature pyramids and of grid image pyramids)."""
    boxes = []
    for s in levels:
        for r in range(s):
            for c in range(s):
                boxes.append([c * width / s, r * height / s, (c + 1) * width / s, (r + 1) * height / s])
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def node_boxes(
    kind: str,
    size: int,
    map_side: int,
    pyramid: tuple[int, ...] = (),
    grid_levels: tuple[int, ...] = (),
    grid_ratio: float = 1.0,
) -> np.ndarray | None:
    """Pixel boxes of a local set's nodes on the ``size`` x ``size`` image the network saw, in the
    extractor's node order: FCN pooled pyramid levels then the raw ``map_side`` x ``map_side``
    cells; Grid cells level by level (enlarged by ``grid_ratio``); None for random Sampling crops."""
    if kind == "fcn":
        return cell_boxes(size, size, tuple(pyramid) + (map_side,))
    if kind == "grid":
        from deepemd.local.grid import grid_boxes

        return grid_boxes(size, size, tuple(grid_levels), grid_ratio).numpy().astype(np.float64)
    return None


def set_flows(
    u: torch.Tensor, v: torch.Tensor, weights: str = "cross", solver: str = "exact", center: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Optimal flows between pairs of local sets ``u (k,m,d)``, ``v (k,n,d)``, scored as the jobs
    score them: ``(flow (k,m,n), node weights of u (k,m) and of v (k,n), score (k,))`` with the
    score ``sum_ij (1 - c_ij) x_ij`` over the transported mass (paper Eq. 3)."""
    u, v = torch.as_tensor(u).float(), torch.as_tensor(v).float()
    cost = cost_matrix(u, v, center=center)
    wu, wv = node_weights(weights, u, v)
    dist, flow = solve(cost, wu, wv, solver=solver)
    total = 0.5 * (wu.sum(1) + wv.sum(1))
    score = (total - dist) / total
    return (flow.detach().numpy(), wu.detach().numpy(), wv.detach().numpy(), score.detach().numpy())


def _as_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.dtype != np.uint8:
        img = np.clip(img, 0.0, 1.0)
        img = (img * 255).astype(np.uint8)
    return img[..., :3]


def _centres(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)


def draw_flow(
    ax: Axes,
    image_a: np.ndarray,
    image_b: np.ndarray,
    boxes_a: np.ndarray,
    boxes_b: np.ndarray,
    flow: np.ndarray,
    weights_a: Optional[np.ndarray] = None,
    weights_b: Optional[np.ndarray] = None,
    min_share: float = 0.01,
    max_lines: int = 40,
    max_width: float = 4.0,
    title: Optional[str] = None,
) -> Axes:
    """Draw ``image_a | image_b`` on ``ax`` with the flow ``(m, n)`` between their regions.

    ``boxes_*`` are pixel boxes ``(x0, y0, x1, y1)`` in each image's own coordinates, one per
    node; only the ``max_lines`` largest flows, and none below ``min_share`` of the largest, are
    drawn so the picture stays legible.
    """
    a, b = _as_rgb(image_a), _as_rgb(image_b)
    flow = np.asarray(flow, dtype=np.float64)
    if flow.shape != (len(boxes_a), len(boxes_b)):
        raise ValueError(f"flow {flow.shape} does not match {len(boxes_a)} x {len(boxes_b)} boxes")
    gap = max(4, a.shape[1] // 20)
    height = max(a.shape[0], b.shape[0])
    canvas = np.full((height, a.shape[1] + gap + b.shape[1], 3), 255, dtype=np.uint8)
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: b.shape[0], a.shape[1] + gap :] = b
    ax.imshow(canvas)
    ca, cb = _centres(boxes_a), _centres(boxes_b) + np.array([a.shape[1] + gap, 0.0])
    top = flow.max() if flow.size and flow.max() > 0 else 1.0
    strongest = np.argsort(-flow, axis=None, kind="stable")[:max_lines]
    for i, j in zip(*np.unravel_index(strongest, flow.shape)):
        if flow[i, j] < min_share * top:
            continue
        share = flow[i, j] / top
        ax.plot(
            [ca[i, 0], cb[j, 0]],
            [ca[i, 1], cb[j, 1]],
            color=plt.cm.autumn(1.0 - share),
            linewidth=0.3 + max_width * share,
            alpha=0.35 + 0.6 * share,
        )
    for centres, weights in ((ca, weights_a), (cb, weights_b)):
        w = np.ones(len(centres)) if weights is None else np.asarray(weights, dtype=np.float64)
        bright = (w - w.min()) / (np.ptp(w) or 1.0)
        ax.scatter(
            centres[:, 0],
            centres[:, 1],
            c=bright,
            cmap="gray",
            vmin=0.0,
            vmax=1.0,
            s=28,
            edgecolors="cyan",
            linewidths=0.6,
            zorder=3,
        )
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def flow_figure(
    image_a: np.ndarray,
    image_b: np.ndarray,
    boxes_a: np.ndarray,
    boxes_b: np.ndarray,
    flow: np.ndarray,
    weights_a: Optional[np.ndarray] = None,
    weights_b: Optional[np.ndarray] = None,
    title: Optional[str] = None,
) -> Figure:
    """A one-panel figure of :func:`draw_flow` (e.g. one few-shot query vs one support)."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    draw_flow(ax, image_a, image_b, boxes_a, boxes_b, flow, weights_a, weights_b, title=title)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG through a temporary sibling and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path
