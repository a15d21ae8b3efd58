"""From two local feature sets to an EMD problem: the cost matrix and the node weights.

Everything here is plain, batched torch (any device), so gradients reach the features through
both the cost (Eq. 2) and the cross-reference weights (Eq. 11-12).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from deepemd.emd.checks import check_features

#: Added to every cross-reference weight so that no node is dead (the authors' 1e-3).
WEIGHT_EPS = 1e-3
#: The norm floor F.normalize-style code uses (kept for callers that clamp their own norms).
#: The EMD head itself treats only an exactly zero node as zero (cosine 0, cost 1) and gives
#: every other node its true cosine, however small or large its norm (see :func:`safe_norms`).
NORM_EPS = 1e-8
#: Margin (a power of two) inside a dtype's range for norms whose squares and products are
#: computed as they are: ``sqrt(tiny) * 2**20 <= norm <= sqrt(max) * 2**-10``.
RANGE_MARGIN_LOW, RANGE_MARGIN_HIGH = 2.0**20, 2.0**-10


def working_dtype(t: torch.Tensor) -> torch.dtype:
    """float16/bfloat16 are computed in float32: EMD needs more mantissa than half gives."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def norm_range(dtype: torch.dtype) -> tuple[float, float]:
    """Node norms whose sum of squares neither underflows (float32: below ~1e-19 per channel)
    nor overflows (float32: norms above ~1.8e19), and whose pairwise dot products stay finite:
    float32 about 1.1e-13 .. 1.8e16, float64 about 1.6e-148 .. 1.3e151."""
    info = torch.finfo(dtype)
    return math.sqrt(info.tiny) * RANGE_MARGIN_LOW, math.sqrt(info.max) * RANGE_MARGIN_HIGH


def node_scales(x: torch.Tensor, dims=(-1,)) -> torch.Tensor:
    """A power of two per node (``dims=(-1,)``) or per set (``dims=(-2, -1)``) that brings the
    largest ``|x|`` there into [0.5, 1): exact (no rounding), so cosines are unchanged, and
    constant (no gradient). All-zero nodes get 1."""
    top = x.detach().abs().amax(dim=dims, keepdim=True)
    _, exponent = torch.frexp(top)
    limit = int(math.log2(torch.finfo(x.dtype).max))  # 2**-exponent must stay finite
    return torch.ldexp(torch.ones_like(top), (-exponent).clamp(max=limit))


def safe_norms(x: torch.Tensor, norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x', norms)``: every node's norm (zero nodes 1, so that dot products over norms give
    cosine 0 for them) and the features those norms belong to: ``x`` itself when every nonzero
    norm is inside :func:`norm_range` (one reduction, the usual case), else ``x`` times
    :func:`node_scales` (a power of two per node), whose norms and dot products are then safe.
    Without this, float32 nodes below ~1e-19 per channel or with norms above ~1.8e19 get a
    zero or infinite norm and so cosine 0 to everything. ``norms``: ``x``'s plain norms,
    when the caller has them."""
    norms = torch.linalg.vector_norm(x, dim=-1) if norms is None else norms
    if _outside_range(norms, x):
        x = x * node_scales(x)
        norms = torch.linalg.vector_norm(x, dim=-1)
    return x, torch.where(norms > 0, norms, torch.ones_like(norms))


def _outside_range(norms: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a node's norm is outside :func:`norm_range` (zero norms count only where the
    node is not all zero: an underflow). Read with numpy on the CPU (no torch reduction whose
    OpenMP worker would spin into a solve, see deepemd.emd.checks)."""
    if norms.numel() == 0:
        return False
    low, high = norm_range(x.dtype)
    n = norms.detach()
    values = n.numpy() if n.device.type == "cpu" else n.cpu().numpy()
    nonzero = values[values != 0]
    if nonzero.size and (nonzero.min() < low or not nonzero.max() <= high):
        return True
    zero = n == 0
    return bool(zero.any()) and bool(x.detach()[zero].abs().amax() > 0)


def cost_matrix(u: torch.Tensor, v: torch.Tensor, center: bool = False) -> torch.Tensor:
    """``1 - cos(u_i, v_j)`` for every node pair (paper Eq. 2): ``(B,m,d),(B,n,d) -> (B,m,n)``.

    ``center=True`` subtracts each node's mean over channels first, as the authors' code does
    before the cosine. A zero-norm node has cosine 0 to everything, i.e. cost 1.

    >>> u = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    >>> cost_matrix(u, u).squeeze(0).tolist()
    [[0.0, 1.0], [1.0, 0.0]]
    """
    u, v = check_features(u, v)
    dtype = working_dtype(u)
    return 1.0 - unit_nodes(u, dtype, center) @ unit_nodes(v, dtype, center).transpose(-1, -2)


def unit_nodes(x: torch.Tensor, dtype: torch.dtype, center: bool = False) -> torch.Tensor:
    """Every node (last axis) scaled to unit norm, centred first if asked, so that the cosine
    of Eq. 2 is a plain dot product; zero nodes stay zero (cosine 0). Scale-safe: any nonzero
    finite node gets its true direction (:func:`safe_norms`)."""
    x = x.to(dtype)
    x, norms = safe_norms(centred(x) if center else x)
    return x / norms[..., None]


def centred(x: torch.Tensor) -> torch.Tensor:
    """Every node minus its mean over channels (the authors' centring before the cosine). A
    node that is constant up to the mean's rounding (its spread at most ``d * eps`` of its
    largest value) becomes exactly zero, i.e. cosine 0, rather than a direction of noise."""
    out = x - x.mean(dim=-1, keepdim=True)
    noise = x.shape[-1] * torch.finfo(x.dtype).eps * x.detach().abs().amax(dim=-1, keepdim=True)
    return torch.where(out.detach().abs().amax(dim=-1, keepdim=True) <= noise, torch.zeros_like(out), out)


def node_norms(x: torch.Tensor) -> torch.Tensor:
    """``(sets, nodes, d) -> (sets, nodes)``: each node's norm, zero-norm nodes 1 (their dot
    products are 0, so cosine 0 either way). For features whose norms may leave the dtype's
    safe range use :func:`safe_norms`, which also hands back the features to take dots of."""
    norms = torch.linalg.vector_norm(x, dim=-1)
    return torch.where(norms > 0, norms, torch.ones_like(norms))


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

    A node pointing away from the other set's mean gets (almost) no mass:

    >>> wu, wv = cross_reference_weights(torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]]), torch.tensor([[[1.0, 0.0]]]))
    >>> [round(w, 3) for w in wu[0].tolist()], round(float(wu.sum()), 6), round(float(wv.sum()), 6)
    ([1.499, 0.001], 1.5, 1.5)
    """
    u, v = check_features(u, v)
    u = u.to(working_dtype(u))
    v = v.to(u.dtype)
    total = equal_mass(u.shape[1], v.shape[1])
    su = torch.einsum("bmd,bd->bm", u, v.mean(dim=1))
    sv = torch.einsum("bnd,bd->bn", v, u.mean(dim=1))
    if _finite(su) and _finite(sv):
        return (_normalise(torch.relu(su) + WEIGHT_EPS, total), _normalise(torch.relu(sv) + WEIGHT_EPS, total))
    # Dot products overflowed (float32 norms ~1e19 and up): the same weights from features
    # scaled by a power of two per set.
    ku, kv = node_scales(u, (-2, -1)), node_scales(v, (-2, -1))
    su = torch.einsum("bmd,bd->bm", u * ku, (v * kv).mean(dim=1))
    sv = torch.einsum("bnd,bd->bn", v * kv, (u * ku).mean(dim=1))
    eps = _scaled_eps(ku.reshape(-1, 1), kv.reshape(-1, 1), u.dtype)
    return _normalise(_plus_eps(su, eps), total), _normalise(_plus_eps(sv, eps), total)


def _finite(t: torch.Tensor) -> bool:
    """A sum read with numpy on the CPU (see deepemd.emd.checks for why not torch)."""
    t = t.detach()
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(t.numpy().sum())) if t.device.type == "cpu" else bool(torch.isfinite(t.sum()))


def _scaled_eps(ku: torch.Tensor, kv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``WEIGHT_EPS * ku * kv`` (the weights' epsilon in the units of dot products of features
    scaled by ``ku``, ``kv``), clamped into the dtype's normal range (the clamp changes no
    normalised weight: see :func:`_plus_eps`)."""
    info = torch.finfo(dtype)
    return (WEIGHT_EPS * ku.double() * kv.double()).clamp(info.tiny, info.max).to(dtype)


def _plus_eps(dots: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``relu(dots) + eps`` up to a positive factor per problem (which normalising removes):
    divided by ``eps`` where that is above 1, so neither form overflows."""
    r = torch.relu(dots)
    return torch.where(eps <= 1, r + eps, r / eps + 1)


def cross_weights_from_dots(dots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-reference weights ``(B, m), (B, n)`` of set pairs whose raw (uncentred) node dot
    products ``dots (B, m, n)`` are known: ``u_i . mean_j v_j = mean_j (u_i . v_j)``, so the
    weights are the row and column means of that block, with no pass over the features."""
    m, n = dots.shape[-2:]
    total = equal_mass(m, n)
    su, sv = torch.relu(dots.mean(dim=2)), torch.relu(dots.mean(dim=1))
    return _normalise(su + WEIGHT_EPS, total), _normalise(sv + WEIGHT_EPS, total)


def pair_cross_weights(
    a: torch.Tensor, b: torch.Tensor, dots: torch.Tensor | None = None
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
        return cross_weights_from_dots(dots.reshape(p * q, m, n))
    # From the set means; scaled by a power of two per set so that huge or tiny features
    # neither overflow nor lose the epsilon's share.
    ka, kb = node_scales(a, (-2, -1)), node_scales(b, (-2, -1))
    a, b = a * ka, b * kb
    su = (a.reshape(p * m, d) @ b.mean(dim=1).T).reshape(p, m, q).transpose(1, 2)
    sv = (b.reshape(q * n, d) @ a.mean(dim=1).T).reshape(q, n, p).permute(2, 0, 1)
    eps = _scaled_eps(ka.reshape(p, 1, 1), kb.reshape(1, q, 1), a.dtype)
    return (
        _normalise(_plus_eps(su, eps), total).reshape(p * q, m),
        _normalise(_plus_eps(sv, eps), total).reshape(p * q, n),
    )


def uniform_weights_from_dots(dots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`uniform_weights` of the set pairs of a node dot block ``(B, m, n)`` (its shape is
    all they need; the twin of :func:`cross_weights_from_dots`)."""
    return _uniform(dots.shape[0], dots.shape[1], dots.shape[2], dots.dtype, dots.device)


def pair_uniform_weights(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`uniform_weights` of every pair of ``a (p,m,d)``, ``b (q,n,d)``."""
    return _uniform(a.shape[0] * b.shape[0], a.shape[1], b.shape[1], a.dtype, a.device)


def _uniform(pairs: int, m: int, n: int, dtype: torch.dtype, device: torch.device):
    total = equal_mass(m, n)
    return (
        torch.full((pairs, m), total / m, dtype=dtype, device=device),
        torch.full((pairs, n), total / n, dtype=dtype, device=device),
    )


def uniform_weights(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's "Equal" baseline: every node of a side the same weight, both sides total
    ``(m + n) / 2`` (weight 1 per node when ``m == n``)."""
    u, v = check_features(u, v)
    return _uniform(u.shape[0], u.shape[1], v.shape[1], working_dtype(u), u.device)
