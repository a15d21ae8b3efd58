"""The EMD head's public functions: solve a batch of transport problems, score feature sets."""

from __future__ import annotations

from typing import Callable, Iterator, Union

import torch

from deepemd.emd.checks import check_features, check_problem, check_set_pair, require_finite
from deepemd.emd.features import (
    centred,
    cost_matrix,
    cross_reference_weights,
    pair_costs,
    pair_cross_weights,
    pair_dots,
    pair_uniform_weights,
    safe_norms,
    uniform_weights,
    working_dtype,
)
from deepemd.emd.layer import ExactEMD
from deepemd.emd.reference import solve_opencv, solve_qpth
from deepemd.emd.sinkhorn import solve_sinkhorn
from deepemd.errors import DeepEMDError
from deepemd.registry import Registry

Weights = Union[str, tuple]


def _solve_exact(cost, wu, wv):
    return ExactEMD.apply(cost, wu, wv)


#: Every EMD solver by name: ``solver(cost, wu, wv, **opts) -> (distance, flow)``.
SOLVERS: Registry[Callable] = Registry("EMD solver")
SOLVERS.add("exact", _solve_exact, summary="ours: batched transportation simplex, dual gradients")
SOLVERS.add("opencv", solve_opencv, summary="cv2.EMD loop, forward only (reference)")
SOLVERS.add("qpth", solve_qpth, summary="the paper's interior-point QP (reference)")
SOLVERS.add("sinkhorn", solve_sinkhorn, summary="entropic, batched, any device")
WEIGHTS = {"cross": cross_reference_weights, "uniform": uniform_weights}
PAIR_WEIGHTS = {"cross": pair_cross_weights, "uniform": pair_uniform_weights}


def balance(wu: torch.Tensor, wv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale both sides to their mean total ``(sum wu + sum wv) / 2`` (differentiably).

    A no-op for balanced weights (cross_reference_weights / uniform_weights are); it defines
    the EMD of unequal masses as that of the normalised histograms, and it is what makes the
    centred duals the true gradient in every direction (see deepemd.emd.layer).
    """
    su, sv = wu.sum(dim=-1, keepdim=True), wv.sum(dim=-1, keepdim=True)
    total = 0.5 * (su + sv)
    return wu * (total / su), wv * (total / sv)


def solve(
    cost: torch.Tensor, wu: torch.Tensor, wv: torch.Tensor, solver: str = "exact", **opts
) -> tuple[torch.Tensor, torch.Tensor]:
    """Earth Mover's Distance of a batch: ``cost (B,m,n), wu (B,m), wv (B,n)`` ->
    ``(distance (B,), flow (B,m,n))`` with ``distance = sum_ij cost_ij flow_ij``.

    Solvers: ``"exact"`` (ours: compiled batched transportation simplex, float64 on CPU,
    gradients from the optimal flow and duals), ``"sinkhorn"`` (entropic, any device; ``eps``,
    ``n_iter``, ``tol``), ``"opencv"`` (cv2.EMD loop, forward only), ``"qpth"`` (the paper's
    interior-point QP, one problem at a time; ``l2``, ``max_iter``). Half-precision inputs are
    computed and returned in float32.

    Two sources and two sinks of one unit each: the diagonal (cost 0 + 1) beats the swap (2 + 3):

    >>> cost = torch.tensor([[[0.0, 2.0], [3.0, 1.0]]], dtype=torch.float64)
    >>> dist, flow = solve(cost, torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))
    >>> float(dist[0]), flow[0].tolist()
    (1.0, [[1.0, 0.0], [0.0, 1.0]])
    """
    run = SOLVERS.get(solver)
    check_problem(cost, wu, wv, cost_values=solver != "exact")
    if cost.dtype not in (torch.float32, torch.float64):
        cost = cost.float()
    wu, wv = wu.to(cost.dtype), wv.to(cost.dtype)
    bsz, m, n = cost.shape
    if bsz == 0:
        return cost.new_zeros(0) + cost.sum(), cost.new_zeros(0, m, n) + cost.sum()
    wu, wv = balance(wu, wv)
    return run(cost, wu, wv, **opts)


def node_weights(weights: Weights, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The node weights ``(wu, wv)`` of ``u``, ``v`` named by ``weights`` (see :data:`WEIGHTS`),
    or ``weights`` itself when it is already a pair; an unknown name is one DeepEMDError."""
    if isinstance(weights, tuple):
        return weights
    if weights not in WEIGHTS:
        raise DeepEMDError(f"unknown weights {weights!r}", fix=f"use one of {sorted(WEIGHTS)} or a tuple (wu, wv)")
    return WEIGHTS[weights](u, v)


def similarity(
    u: torch.Tensor,
    v: torch.Tensor,
    weights: Weights = "cross",
    solver: str = "exact",
    temperature: float = 1.0,
    center: bool = False,
    **opts,
) -> torch.Tensor:
    """DeepEMD score of each pair of sets, ``(B,m,d),(B,n,d) -> (B,)``.

    ``temperature * sum_ij (1 - c_ij) x_ij / T`` where ``T`` is the transported mass
    (``(m+n)/2``, i.e. N for ``m == n``): the paper's Eq. 3 scaled as the authors' logits
    (``temperature / N``; they train with temperature 12.5). With ``temperature=1`` the score is
    the flow-weighted mean cosine, in [-1, 1]. ``weights``: ``"cross"`` (cross-reference,
    Eq. 11-12), ``"uniform"``, or a tuple ``(wu, wv)``. ``center=True`` centres every node over
    channels before the cosine (the authors' code); weights always use the raw features.

    A set scores 1 against itself and against its nodes in any order:

    >>> u = torch.rand(1, 5, 8, dtype=torch.float64)
    >>> round(float(similarity(u, u[:, torch.randperm(5)])[0]), 6)
    1.0
    """
    u, v = check_features(u, v)
    cost = cost_matrix(u, v, center=center)
    wu, wv = node_weights(weights, u, v)
    dist, _ = solve(cost, wu, wv, solver=solver, **opts)
    return _score(dist, wu, wv, temperature)


def _score(dist: torch.Tensor, wu: torch.Tensor, wv: torch.Tensor, temperature: float):
    """``temperature * (T - EMD) / T`` = temperature x flow-weighted mean cosine."""
    total = 0.5 * (wu.sum(dim=-1) + wv.sum(dim=-1)).to(dist.dtype)
    return temperature * (total - dist) / total


def pairwise_similarity(
    a: torch.Tensor,
    b: torch.Tensor,
    weights: str = "cross",
    solver: str = "exact",
    temperature: float = 1.0,
    center: bool = False,
    chunk: int = 1024,
    **opts,
) -> torch.Tensor:
    """Score every set of ``a (P,m,d)`` against every set of ``b (Q,n,d)`` -> ``(P,Q)``:
    the numbers of :func:`similarity` on each pair (``weights`` "cross" or "uniform").

    Built for reranking (1 x K) and episodes (queries x supports), where the same sets recur
    in many pairs: ``a`` and ``b`` are validated once, a block of pairs gets its node dot
    products from one matmul, its costs from those over the node norms and (uncentred cross
    weights) its weights from their row and column means, so the features are read about
    twice in all and never copied per pair; each block of at most ``chunk`` pairs is one
    batched solve, so memory stays ``O(chunk * m * n)`` however large P x Q is.
    Differentiable w.r.t. ``a`` and ``b``.

    >>> a, b = torch.rand(3, 5, 8, dtype=torch.float64), torch.rand(4, 6, 8, dtype=torch.float64)
    >>> scores = pairwise_similarity(a, b)
    >>> scores.shape, torch.allclose(scores[2, 1], similarity(a[2:3], b[1:2])[0])
    (torch.Size([3, 4]), True)
    """
    if not isinstance(weights, str) or weights not in PAIR_WEIGHTS:
        raise DeepEMDError(
            f"unknown weights {weights!r} for pairwise scoring", fix=f"use one of {sorted(PAIR_WEIGHTS)}"
        )
    if chunk < 1:
        raise DeepEMDError(f"chunk must be >= 1, got {chunk}")
    check_set_pair(a, b)
    dtype = working_dtype(a)
    a, b = a.to(dtype), b.to(dtype)
    ac, bc = (centred(a), centred(b)) if center else (a, b)
    norms_a = torch.linalg.vector_norm(ac, dim=-1)
    norms_b = torch.linalg.vector_norm(bc, dim=-1)
    require_finite("a", a, norms_a)
    require_finite("b", b, norms_b)
    # Nodes too small or too large for their dtype's squares come back scaled per node (their
    # dot products then no longer give the raw cross-reference weights).
    (ac, norms_a), (bc, norms_b) = safe_norms(ac, norms_a), safe_norms(bc, norms_b)
    raw_dots = ac is a and bc is b
    scores = []
    for rows, cols in _pair_blocks(a.shape[0], b.shape[0], chunk):
        dots = pair_dots(ac[rows], bc[cols])
        if weights == "cross" and raw_dots:
            wu, wv = pair_cross_weights(a[rows], b[cols], dots=dots)
        else:
            wu, wv = PAIR_WEIGHTS[weights](a[rows], b[cols])
        dist, _ = solve(pair_costs(dots, norms_a[rows], norms_b[cols]), wu, wv, solver=solver, **opts)
        scores.append(_score(dist, wu, wv, temperature))
    if not scores:
        return torch.zeros(a.shape[0], b.shape[0], dtype=dtype, device=a.device)
    return torch.cat(scores).reshape(a.shape[0], b.shape[0])


def _pair_blocks(p: int, q: int, chunk: int) -> Iterator[tuple[slice, slice]]:
    """Blocks ``(rows of a, columns of b)`` of at most ``chunk`` pairs, in row-major pair
    order: whole rows while a row fits, else pieces of one row; none when P or Q is 0."""
    if p == 0 or q == 0:
        return
    if q <= chunk:
        step = chunk // q
        for start in range(0, p, step):
            yield slice(start, start + step), slice(0, q)
    else:
        for row in range(p):
            for start in range(0, q, chunk):
                yield slice(row, row + 1), slice(start, start + chunk)
