"""The matching-flow picture of one test episode: a query against each class's first support
(paper Fig. 6/7), so a user sees which regions the EMD matched and which it down-weighted."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from deepemd.data import load_image  # noqa: E402
from deepemd.data.transforms import RESIZE_RATIO  # noqa: E402
from deepemd.emd import cost_matrix, cross_reference_weights, solve, uniform_weights  # noqa: E402
from deepemd.eval.flows import cell_boxes, draw_flow, save_figure  # noqa: E402
from deepemd.local.grid import grid_boxes  # noqa: E402


def shown_image(path: Path, size: int) -> np.ndarray:
    """The image as the network saw it at test time (resize + centre crop), as uint8 RGB."""
    geometry = v2.Compose([v2.Resize(round(size * RESIZE_RATIO), antialias=True), v2.CenterCrop(size)])
    return np.asarray(geometry(load_image(path).convert("RGB")))


def node_boxes(kind: str, size: int, map_side: int, pyramid: tuple[int, ...], grid_levels: tuple[int, ...],
               grid_ratio: float) -> np.ndarray | None:
    """Pixel boxes of the nodes, in the extractor's node order; None where crops are random."""
    if kind == "fcn":
        return cell_boxes(size, size, tuple(pyramid) + (map_side,))
    if kind == "grid":
        return grid_boxes(size, size, tuple(grid_levels), grid_ratio).numpy()
    return None


def episode_flow_figure(paths: list[Path], query_set: torch.Tensor, support_sets: torch.Tensor,
                        boxes: np.ndarray, size: int, class_names: list[str], weights: str = "cross",
                        solver: str = "exact", center: bool = True, out: Path | None = None) -> Path | None:
    """One row per class: ``paths[0]`` is the query, ``paths[1:]`` one support per class.

    ``query_set (m,d)`` and ``support_sets (way,m,d)`` are the nodes the flows are computed on.
    """
    way = support_sets.shape[0]
    q = query_set.unsqueeze(0).expand(way, -1, -1)
    cost = cost_matrix(q, support_sets, center=center)
    wu, wv = (cross_reference_weights if weights == "cross" else uniform_weights)(q, support_sets)
    dist, flow = solve(cost, wu, wv, solver=solver)
    total = 0.5 * (wu.sum(1) + wv.sum(1))
    score = (total - dist) / total
    query_img = shown_image(paths[0], size)
    fig, axes = plt.subplots(way, 1, figsize=(6, 3.0 * way), squeeze=False)
    for c in range(way):
        draw_flow(axes[c, 0], query_img, shown_image(paths[c + 1], size), boxes, boxes,
                  flow[c].detach().numpy(), wu[c].detach().numpy(), wv[c].detach().numpy(),
                  title=f"query vs '{class_names[c]}': EMD score {float(score[c]):.3f}")
    fig.tight_layout()
    return save_figure(fig, out) if out is not None else None
