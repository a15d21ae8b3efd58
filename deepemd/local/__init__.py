"""Local feature sets: an image becomes a set of m d-dimensional nodes for the EMD head.

``create(kind, backbone, **kw)`` with kind ``fcn`` (map cells, optional feature pyramid),
``grid`` (image cells, optional image pyramid) or ``sampling`` (random resized crops). Each
returns ``(B, m, d)`` and has ``num_nodes`` (m at the backbone's input size; for fcn the raw
part scales with the map size of the images actually given). ``global_features`` is the
average-pooled vector used for the FAISS shortlist.
"""
from __future__ import annotations

from torch import Tensor, nn

from deepemd.errors import DeepEMDError
from deepemd.local.fcn import FCN
from deepemd.local.grid import Grid
from deepemd.local.sampling import Sampling

_KINDS = {"fcn": FCN, "grid": Grid, "sampling": Sampling}


def create(kind: str, backbone: nn.Module, **kw) -> nn.Module:
    if kind not in _KINDS:
        raise DeepEMDError(f"unknown local feature kind '{kind}'", fix=f"choose one of: {', '.join(_KINDS)}")
    return _KINDS[kind](backbone, **kw)


def global_features(feature_map: Tensor) -> Tensor:
    """``(B, C, h, w) -> (B, C)`` average pool."""
    return feature_map.mean(dim=(2, 3))


__all__ = ["create", "global_features", "FCN", "Grid", "Sampling"]
