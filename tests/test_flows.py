"""Flow pictures: one line per drawn flow, wider for larger flow; files written atomically."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepemd.errors import DeepEMDError
from deepemd.eval.flows import cell_boxes, draw_flow, flow_figure, save_figure, set_flows


def test_cell_boxes_cover_each_level_row_major():
    boxes = cell_boxes(10, 20, (1, 2))
    assert boxes.tolist()[0] == [0, 0, 20, 10]
    assert boxes.tolist()[1:] == [[0, 0, 10, 5], [10, 0, 20, 5], [0, 5, 10, 10], [10, 5, 20, 10]]


def test_lines_follow_the_flow(tmp_path):
    import matplotlib.pyplot as plt

    img = np.zeros((10, 10, 3), dtype=np.uint8)
    boxes = cell_boxes(10, 10, (2,))
    flow = np.zeros((4, 4))
    flow[0, 3], flow[1, 2], flow[2, 2] = 2.0, 1.0, 0.001  # the last is below min_share: not drawn
    fig, ax = plt.subplots()
    draw_flow(ax, img, img, boxes, boxes, flow, np.arange(4.0), np.ones(4))
    lines = ax.get_lines()
    assert len(lines) == 2
    widths = sorted(line.get_linewidth() for line in lines)
    assert widths[1] > widths[0]
    (x0, x1), (y0, y1) = lines[0].get_xdata(), lines[0].get_ydata()
    assert (x0, y0) == (2.5, 2.5) and y1 == 7.5 and x1 > 10  # cell 0 of A to cell 3 of B (right image)
    with pytest.raises(ValueError, match="does not match"):
        draw_flow(ax, img, img, boxes, boxes[:2], flow)
    path = save_figure(flow_figure(img, img, boxes, boxes, flow), tmp_path / "f.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".*tmp"))


def test_set_flows_refuses_an_unknown_weights_name_with_one_error():
    u = torch.rand(1, 3, 4)
    with pytest.raises(DeepEMDError, match="unknown weights 'crosss'"):
        set_flows(u, u, weights="crosss")
