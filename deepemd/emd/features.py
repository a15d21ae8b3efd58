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


def working_dtype(t: torch.Tensor) -> torch.dtype:
    """float16/bfloat16 are computed in float32: EMD needs more mantissa than half gives."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def cost_matrix(u: torch.Tensor, v: torch.Tensor, center: bool = False) -> torch.Tensor:
    """``1 - cos(u_i, v_j)`` for every node pair (paper Eq. 2): ``(B,m,d),(B,n,d) -> (B,m,n)``.

    ``center=True`` subtracts each node's mean over channels first, as the authors' code does
    before the cosine. A zero-norm node has cosine 0 to everything, i.e. cost 1.
    """
    u, v = check_features(u, v)
    dtype = working_dtype(u)
    return 1.0 - unit_nodes(u, dtype, center) @ unit_nodes(v, dtype, center).transpose(-1, -2)


def unit_nodes(x: torch.Tensor, dtype: torch.dtype, center: bool = False) -> torch.Tensor:
    """Every node (last axis) scaled to unit norm, centred first if asked, so that the cosine
    of Eq. 2 is a plain dot product; zero-norm nodes stay zero (cosine 0)."""
    x = x.to(dtype)
    return F.normalize(centred(x) if center else x, dim=-1, eps=NORM_EPS)


def centred(x: torch.Tensor) -> torch.Tensor:
    """Every node minus its mean over channels (the authors' centring before the cosine)."""
    return x - x.mean(dim=-1, keepdim=True)


def node_norms(x: torch.Tensor) -> torch.Tensor:
    """``(sets, nodes, d) -> (sets, nodes)``: each node's norm, at least ``NORM_EPS`` (the
    floor F.normalize uses, so zero-norm nodes get cosine 0 either way)."""
    return torch.linalg.vector_norm(x, dim=-1).clamp_min(NORM_EPS)


def pair_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot products of every node pair of every set pair ``(s, t)`` of ``a (p,m,d)``,
    ``b (q,n,d)`` -> ``(p*q, m, n)``, pairs in row-major order: one ``(p*m, d) @ (d, q*n)``
    matmul, no per-pair copies of the features."""
    p, m, d = a.shape
    q, n = b.shape[:2]
    dots = (a.reshape(p * m, d) @ b.reshape(q * n, d).T).reshape(p, m, q, n).transpose(1, 2)
    return dots.reshape(p * q, m, n)


def pair_costs(dots: torch.Tensor, norms_a: torch.Tensor, norms_b: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` of every pair from :func:`pair_dots` and the node norms ``(p,m)``, ``(q,n)``:
    dividing the small dot-product block costs far less than normalising every feature."""
    p, m = norms_a.shape
    q, n = norms_b.shape
    cos = dots.reshape(p, q, m, n) / (norms_a[:, None, :, None] * norms_b[None, :, None, :])
    return 1.0 - cos.reshape(p * q, m, n)


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
    u = u.to(working_dtype(u))
    v = v.to(u.dtype)
    total = equal_mass(u.shape[1], v.shape[1])
    su = torch.relu(torch.einsum("bmd,bd->bm", u, v.mean(dim=1))) + WEIGHT_EPS
    sv = torch.relu(torch.einsum("bnd,bd->bn", v, u.mean(dim=1))) + WEIGHT_EPS
    return _normalise(su, total), _normalise(sv, total)


def pair_cross_weights(a: torch.Tensor, b: torch.Tensor, dots: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cross_reference_weights` of every pair of ``a (p,m,d)``, ``b (q,n,d)`` ->
    ``(p*q, m), (p*q, n)`` in row-major pair order, from two matmuls against the set means.

    ``dots``: the pairs' raw (uncentred) :func:`pair_dots`, when the caller has them: since
    ``u_i . mean_j v_j = mean_j (u_i . v_j)``, the weights are then row and column means of
    that block, with no further pass over the features."""
    p, m, d = a.shape
    q, n = b.shape[:2]
    total = equal_mass(m, n)
    if dots is not None:
        su, sv = torch.relu(dots.mean(dim=2)), torch.relu(dots.mean(dim=1))
    else:
        su = torch.relu((a.reshape(p * m, d) @ b.mean(dim=1).T).reshape(p, m, q).transpose(1, 2))
        sv = torch.relu((b.reshape(q * n, d) @ a.mean(dim=1).T).reshape(q, n, p).permute(2, 0, 1))
    return (_normalise(su + WEIGHT_EPS, total).reshape(p * q, m),
            _normalise(sv + WEIGHT_EPS, total).reshape(p * q, n))


def pair_uniform_weights(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`uniform_weights` of every pair of ``a (p,m,d)``, ``b (q,n,d)``."""
    return _uniform(a.shape[0] * b.shape[0], a.shape[1], b.shape[1], a.dtype, a.device)


def _uniform(pairs: int, m: int, n: int, dtype: torch.dtype, device: torch.device):
    total = equal_mass(m, n)
    return (torch.full((pairs, m), total / m, dtype=dtype, device=device),
            torch.full((pairs, n), total / n, dtype=dtype, device=device))


def uniform_weights(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's "Equal" baseline: every node of a side the same weight, both sides total
    ``(m + n) / 2`` (weight 1 per node when ``m == n``)."""
    u, v = check_features(u, v)
    return _uniform(u.shape[0], u.shape[1], v.shape[1], working_dtype(u), u.device)
