"""DeepEMD-FCN: every cell of the feature map is a node; optionally a feature pyramid on top.

With ``pyramid=(3, 2, 1)`` the map is also average-pooled (``adaptive_avg_pool2d``) to 3x3, 2x2
and 1x1 and those cells join the raw ones: N = 9 + 4 + 1 + h*w (paper 4.4; the authors put the
pooled levels first, then the raw cells, and so do we).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepemd.backbones import feature_map_size
from deepemd.errors import DeepEMDError


class FCN(nn.Module):
    def __init__(self, backbone: nn.Module, pyramid: tuple[int, ...] = ()):
        super().__init__()
        self.backbone = backbone
        self.pyramid = tuple(int(s) for s in pyramid)
        h, w = feature_map_size(backbone)
        self.num_nodes = sum(s * s for s in self.pyramid) + h * w  # at the backbone's input size

    def from_feature_map(self, fmap: Tensor) -> Tensor:
        """``(B, C, h, w) -> (B, sum s^2 + h*w, C)``: no second backbone pass for callers that
        already computed the map (e.g. for the global FAISS vector)."""
        levels = [F.adaptive_avg_pool2d(fmap, s).flatten(2) for s in self.pyramid]
        return torch.cat(levels + [fmap.flatten(2)], dim=2).transpose(1, 2)

    def forward(self, images: Tensor) -> Tensor:
        return self.from_feature_map(self.backbone(images))


def pyramid_pooling(pyramid: tuple[int, ...], num_nodes: int) -> Tensor:
    """``(sum s^2, h*w)`` weights with which each pyramid node of an FCN set of ``num_nodes``
    nodes (square map ``h = w``) averages the map cells: ``set[:p] == P @ set[p:]``. The rerank
    uses it to compute the pyramid nodes' dot products from the cells' (fewer and sparser).

    >>> fmap = torch.rand(2, 8, 4, 4)  # (B, C, h, w)
    >>> pooled = torch.cat([F.adaptive_avg_pool2d(fmap, s).flatten(2) for s in (2, 1)], 2).transpose(1, 2)
    >>> cells = fmap.flatten(2).transpose(1, 2)
    >>> bool(torch.allclose(pyramid_pooling((2, 1), 5 + 16) @ cells, pooled))
    True
    """
    pooled = sum(s * s for s in pyramid)
    side = round(math.sqrt(max(0, num_nodes - pooled)))
    if side < 1 or side * side != num_nodes - pooled:
        raise DeepEMDError(
            f"{num_nodes} nodes are not an FCN set with the feature pyramid {tuple(pyramid)} over a square map",
            fix="give the pyramid the sets were extracted with (none for Grid or Sampling sets)",
        )
    cells = torch.eye(side * side).reshape(side * side, 1, side, side)
    return torch.cat([F.adaptive_avg_pool2d(cells, s).flatten(1) for s in pyramid], dim=1).T.contiguous()
