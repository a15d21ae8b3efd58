"""Local feature sets: an image becomes a set of m d-dimensional nodes for the EMD head.

``create(kind, backbone, **kw)`` with kind ``fcn`` (map cells, optional feature pyramid),
``grid`` (image cells, optional image pyramid) or ``sampling`` (random resized crops). Each
returns ``(B, m, d)`` and has ``num_nodes`` (m at the backbone's input size; for fcn the raw
part scales with the map size of the images actually given). ``global_features`` is the
average-pooled vector used for the FAISS shortlist.
"""

from __future__ import annotations

from torch import Tensor, nn

from deepemd.local.fcn import FCN
from deepemd.local.grid import Grid
from deepemd.local.sampling import Sampling
from deepemd.registry import Registry

#: The local-set kinds of paper 4.4, by name (options list them; ``create`` builds from them).
KINDS: Registry[type[nn.Module]] = Registry("local feature kind")
KINDS.add("fcn", FCN, label="FCN")
KINDS.add("grid", Grid, label="Grid")
KINDS.add("sampling", Sampling, label="Sampling")


def create(kind: str, backbone: nn.Module, **kw) -> nn.Module:
    return KINDS.get(kind)(backbone, **kw)


def global_features(feature_map: Tensor) -> Tensor:
    """``(B, C, h, w) -> (B, C)`` average pool."""
    return feature_map.mean(dim=(2, 3))


__all__ = ["FCN", "KINDS", "Grid", "Sampling", "create", "global_features"]
