"""The matching-flow picture of one test episode: a query against each class's first support
(paper Fig. 6/7), so a user sees which regions the EMD matched and which it down-weighted."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepemd.data.transforms import seen_image  # noqa: E402
from deepemd.eval.flows import draw_flow, save_figure, set_flows  # noqa: E402


def episode_flow_figure(
    paths: list[Path],
    query_set: torch.Tensor,
    support_sets: torch.Tensor,
    boxes: np.ndarray,
    size: int,
    class_names: list[str],
    weights: str = "cross",
    solver: str = "exact",
    center: bool = True,
    out: Path | None = None,
) -> Path | None:
    """One row per class: ``paths[0]`` is the query, ``paths[1:]`` one support per class.

    ``query_set (m,d)`` and ``support_sets (way,m,d)`` are the nodes the flows are computed on.
    """
    way = support_sets.shape[0]
    queries = torch.as_tensor(query_set).unsqueeze(0).expand(way, -1, -1)
    flow, wq, ws, score = set_flows(queries, support_sets, weights, solver, center)
    query_img = seen_image(paths[0], size)
    fig, axes = plt.subplots(way, 1, figsize=(6, 3.0 * way), squeeze=False)
    for c in range(way):
        draw_flow(
            axes[c, 0],
            query_img,
            seen_image(paths[c + 1], size),
            boxes,
            boxes,
            flow[c],
            wq[c],
            ws[c],
            title=f"query vs '{class_names[c]}': EMD score {float(score[c]):.3f}",
        )
    fig.tight_layout()
    return save_figure(fig, out) if out is not None else None
