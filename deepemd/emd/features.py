"""From two local feature sets to an EMD problem: the cost matrix and the node weights.

Everything here is plain, batched torch (any device), so gradients reach the features through
both the cost (Eq. 2) and the cross-reference weights (Eq. 11-12).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from deepemd.emd.checks import check_features

#: Added to every cross-reference weight so that no node is dead (the authors' 1e-3).
WEIGHT_EPS = 1e-3
#: Norms below this count as zero: such a vector has cosine 0 (cost 1) to everything.
NORM_EPS = 1e-8


def _working_dtype(t: torch.Tensor) -> torch.dtype:
    """float16/bfloat16 are computed in float32: EMD needs more mantissa than half gives."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def cost_matrix(u: torch.Tensor, v: torch.Tensor, center: bool = False) -> torch.Tensor:
    """``1 - cos(u_i, v_j)`` for every node pair (paper Eq. 2): ``(B,m,d),(B,n,d) -> (B,m,n)``.

    ``center=True`` subtracts each node's mean over channels first, as the authors' code does
    before the cosine. A zero-norm node has cosine 0 to everything, i.e. cost 1.
    """
    u, v = check_features(u, v)
    u = u.to(_working_dtype(u))
    v = v.to(u.dtype)
    if center:
        u = u - u.mean(dim=-1, keepdim=True)
        v = v - v.mean(dim=-1, keepdim=True)
    un = F.normalize(u, dim=-1, eps=NORM_EPS)
    vn = F.normalize(v, dim=-1, eps=NORM_EPS)
    return 1.0 - un @ vn.transpose(-1, -2)


def equal_mass(m: int, n: int) -> float:
    """Total mass each side carries: ``(m + n) / 2``, i.e. N when ``m == n`` (paper Eq. 12)."""
    return 0.5 * (m + n)


def _normalise(raw: torch.Tensor, total: float) -> torch.Tensor:
    return raw * (total / raw.sum(dim=-1, keepdim=True))


def cross_reference_weights(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-reference node weights (paper Eq. 11-12), ``(B,m,d),(B,n,d) -> (B,m),(B,n)``.

    ``w_i = relu(u_i . mean_j v_j) + 1e-3`` on the raw features (as the authors' code), then
    each side is rescaled to the same total ``(m + n) / 2`` so the transport is balanced.
    """
    u, v = check_features(u, v)
    u = u.to(_working_dtype(u))
    v = v.to(u.dtype)
    total = equal_mass(u.shape[1], v.shape[1])
    su = torch.relu(torch.einsum("bmd,bd->bm", u, v.mean(dim=1))) + WEIGHT_EPS
    sv = torch.relu(torch.einsum("bnd,bd->bn", v, u.mean(dim=1))) + WEIGHT_EPS
    return _normalise(su, total), _normalise(sv, total)


def uniform_weights(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's "Equal" baseline: every node of a side the same weight, both sides total
    ``(m + n) / 2`` (weight 1 per node when ``m == n``)."""
    u, v = check_features(u, v)
    dtype = _working_dtype(u)
    b, m, n = u.shape[0], u.shape[1], v.shape[1]
    total = equal_mass(m, n)
    wu = torch.full((b, m), total / m, dtype=dtype, device=u.device)
    wv = torch.full((b, n), total / n, dtype=dtype, device=u.device)
    return wu, wv
