"""DeepEMD-Grid: the image cut into s x s cells (one or more pyramid levels), each cell enlarged
by ``ratio`` around its centre (clipped to the image), resized to the backbone's input size and
embedded as one node. Levels (3, 2) give 9 + 4 = 13 nodes; the authors use ratio 2 at test.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deepemd.backbones import default_cfg
from deepemd.local.crops import embed_crops


def grid_boxes(height: int, width: int, levels: tuple[int, ...], ratio: float) -> Tensor:
    """``(sum s^2, 4)`` boxes, level by level, row-major within a level."""
    boxes = []
    for s in levels:
        ch, cw = height / s, width / s
        for r in range(s):
            for c in range(s):
                cy, cx = (r + 0.5) * ch, (c + 0.5) * cw
                hh, hw = ch * ratio / 2, cw * ratio / 2
                boxes.append([max(cx - hw, 0.0), max(cy - hh, 0.0), min(cx + hw, width), min(cy + hh, height)])
    return torch.tensor(boxes, dtype=torch.float32)


class Grid(nn.Module):
    def __init__(
        self, backbone: nn.Module, levels: tuple[int, ...] = (3,), ratio: float = 1.0, patch_size: int | None = None
    ):
        super().__init__()
        if not levels or any(int(s) < 1 for s in levels) or ratio < 1.0:
            raise ValueError(f"grid needs levels >= 1 and ratio >= 1, got levels={levels}, ratio={ratio}")
        self.backbone = backbone
        self.levels = tuple(int(s) for s in levels)
        self.ratio = float(ratio)
        self.patch_size = int(patch_size or default_cfg(backbone)["input_size"])
        self.num_nodes = sum(s * s for s in self.levels)

    def forward(self, images: Tensor) -> Tensor:
        b, _, h, w = images.shape
        boxes = grid_boxes(h, w, self.levels, self.ratio).to(images.device).expand(b, -1, -1)
        return embed_crops(self.backbone, images, boxes, self.patch_size, "grid")
