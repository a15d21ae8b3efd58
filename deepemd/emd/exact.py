"""Exact batched transport solver: a transportation simplex compiled with numba.

One call solves a whole batch with no Python per problem: the ``nogil`` kernel
(:func:`deepemd.emd.simplex.solve_range`, whose docstring says how a problem is solved) solves
a range of problems with one workspace, and torch's thread pool hands ranges of the batch to
its threads (dynamically).

Every answer carries a certificate: the flow is optimal for the grid costs (rounded down), so
its distance exceeds the optimum by at most ``sum (c - grid) x`` over the basic cells. Where
that is above :data:`PRECISION_RTOL` of ``|c|.x`` (a few costs 1e15+ times the ones the flow
uses coarsen the grid: forbidden cells), the problem is re-solved with its costs capped just
above the costs in play (:func:`_refine`), which the same certificate then proves right.

A problem that reaches the pivot cap (a guard against cycling on degenerate problems; not
reached in the tests), or that the refinement cannot certify, is re-solved by POT's network
simplex; ``ExactSolution.pivots`` says which (-1).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np
import torch

from deepemd.emd.simplex import (
    CAPPED,
    IMPRECISE,
    NON_FINITE,
    PRECISION_RTOL,
    centred_duals,
    pricing_block,
    solve_range,
)
from deepemd.emd.threads import run_each_on_threads
from deepemd.errors import DeepEMDError

__all__ = ["CAPPED", "ExactSolution", "pricing_block", "solve_batch"]

#: Pivot cap per problem: ``MAX_PIVOTS_PER_CELL * m * n + MIN_PIVOT_CAP`` (a guard against
#: cycling on degenerate problems; the tests never reach it).
MAX_PIVOTS_PER_CELL = 50
MIN_PIVOT_CAP = 100
#: A refinement caps the costs at this factor times the largest cost the flow uses.
CAP_FACTOR = 2.0**20
#: Refinements tried before POT's network simplex finishes a problem.
MAX_REFINES = 8
#: Batches of fewer cells (16 problems at 25x25, 3 at 63x63) run on the calling thread.
PARALLEL_MIN_CELLS = 16 * 25 * 25
#: Fewest cells (``m * n`` summed over its problems) in a range handed to a thread: about
#: 0.3 ms of work, i.e. 32 problems at 25x25 but 5 at 63x63 (a 100-problem rerank row of
#: 63x63 problems in ranges of 32 left one thread idle for a third of the solve).
MIN_RANGE_CELLS = 32 * 25 * 25


def _solve_threaded(args: tuple, bsz: int, threads: int, cells: int) -> None:
    """Ranges of the batch taken from one queue by ``threads - 1`` pool threads and the calling
    thread itself: a thread that the OS delays (the machine may be shared) does not hold the
    batch back, and the caller works instead of waiting for a hand-off. Ranges hold at least
    :data:`MIN_RANGE_CELLS` cells of work, so a small batch of small problems is two or three
    ranges, not a dozen hand-offs, while a batch of large ones is split finely enough that no
    thread waits long for the last range. The range count is a multiple of the thread count:
    15 problems of 63x63 (a pruned rerank's first solve) made 3 ranges of 5, and one thread
    solved 10 while the other idled after 5 (``benchmarks/rerank_speed.py --solve-batches``).

    The threads are torch's own OpenMP pool where there is one (:mod:`deepemd.emd.threads`),
    around a ``nogil`` kernel, rather than numba's ``parallel=True``: numba's OpenMP layer loads
    a second libgomp whose spinning workers fought torch's pool for the cores (the matmuls next
    to a solve ran ~10x slower on 2 cores), and numba's disk cache handles its dynamically
    generated kernels poorly."""
    per_range = max(1, MIN_RANGE_CELLS // cells)
    n_ranges = max(threads, min(bsz // per_range, 8 * threads))
    n_ranges = min(bsz, threads * math.ceil(n_ranges / threads))
    bounds = [k * bsz // n_ranges for k in range(n_ranges + 1)]

    def solve(bound: tuple[int, int]) -> None:
        solve_range(*args, *bound)  # type: ignore[call-arg]  # a numba dispatcher

    run_each_on_threads(solve, itertools.pairwise(bounds), threads)


#: Cost dtypes the kernel reads directly; others are converted to float64.
KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class ExactSolution(NamedTuple):
    distance: np.ndarray  # (B,) optimal cost sum_ij cost_ij flow_ij
    flow: np.ndarray  # (B, m, n) optimal flow, in the costs' dtype (float32 or float64)
    alpha: np.ndarray  # (B, m) optimal row duals, centred: a . alpha == b . beta
    beta: np.ndarray  # (B, n) optimal column duals
    pivots: np.ndarray  # (B,) simplex pivots per problem (all solves of a refined one); -1
    #                       where POT finished the problem


def solve_batch(
    cost: np.ndarray, a: np.ndarray, b: np.ndarray, threads: int | None = None, block: int | None = None
) -> ExactSolution:
    """Optimal distance, flow and centred duals of every problem, float64, on ``threads``
    threads (default ``torch.get_num_threads()``, the count the rest of the EMD head runs on).
    ``block``: rows priced per pivot (default :func:`pricing_block`; ``m``: Dantzig's rule).

    ``b`` is rescaled to ``a``'s total first (callers pass balanced masses; this removes the
    last rounding difference so the start solution is feasible to machine precision).
    float32 costs are read as they are (the kernel is compiled for both), and the flow comes
    back in the costs' dtype: no float64 copy of a (B, m, n) block on the way in or out.
    """
    cost = np.ascontiguousarray(cost, dtype=cost.dtype if cost.dtype in KERNEL_DTYPES else np.float64)
    a = np.ascontiguousarray(a, dtype=np.float64)
    b = np.ascontiguousarray(b, dtype=np.float64)
    b = b * (a.sum(-1) / b.sum(-1))[:, None]
    bsz, m, n = cost.shape
    flow = np.empty((bsz, m, n), cost.dtype)
    alpha = np.empty((bsz, m))
    beta = np.empty((bsz, n))
    distance = np.empty(bsz)
    pivots = np.empty(bsz, np.int64)
    error = np.empty(bsz)
    max_pivots = MAX_PIVOTS_PER_CELL * m * n + MIN_PIVOT_CAP
    threads = torch.get_num_threads() if threads is None else threads
    block = pricing_block(m, n) if block is None else max(1, min(int(block), m))
    args = (cost, a, b, flow, alpha, beta, distance, pivots, error, max_pivots, block)
    if bsz > 1 and bsz * m * n >= PARALLEL_MIN_CELLS and threads > 1:
        _solve_threaded(args, bsz, threads, m * n)
    else:  # handing work to threads costs more than a few small problems
        solve_range(*args, 0, bsz)
    if bsz and pivots.min() < 0:  # the rare marked problem (one test instead of three scans)
        _finish_marked(cost, a, b, max_pivots, block, (distance, flow, alpha, beta, pivots))
    return ExactSolution(distance, flow, alpha, beta, pivots)


def _finish_marked(cost: np.ndarray, a: np.ndarray, b: np.ndarray, max_pivots: int, block: int, out: tuple) -> None:
    """The problems the kernel marked: one error for NaN or inf costs, a refinement for an
    imprecise grid, POT for a capped one (and for a refinement that could not certify)."""
    distance, flow, alpha, beta, pivots = out
    bad = np.flatnonzero(pivots == NON_FINITE)
    if len(bad):
        raise DeepEMDError(
            f"cost contains NaN or inf values (problem {bad[0]} of {len(pivots)})",
            fix="check the network output (diverged training, bad input image)",
        )
    for k in np.flatnonzero(pivots == IMPRECISE):
        pivots[k] = _refine(cost[k], a[k], b[k], flow[k], max_pivots, block, (distance, flow, alpha, beta), int(k))
    for k in np.flatnonzero(pivots == CAPPED):
        distance[k], flow[k], alpha[k], beta[k] = _fallback(cost[k], a[k], b[k])


def _refine(
    cost: np.ndarray, a: np.ndarray, b: np.ndarray, flow: np.ndarray, max_pivots: int, block: int, out: tuple, k: int
) -> int:
    """Re-solve a problem whose grid was too coarse (:data:`IMPRECISE`) with its costs capped at
    ``K`` = :data:`CAP_FACTOR` x the largest cost its flow uses, which puts the grid step under
    those costs. Capping only lowers costs, so a flow ``x`` optimal for the capped costs
    ``c_K`` is within ``error_K + (c - c_K).x`` of the real optimum: accepted when that is
    below :data:`PRECISION_RTOL` of ``|c|.x`` (the capped cells then carry no flow to speak of),
    else ``K`` grows. Writes ``out[...][k]``; returns the pivots of all solves, or
    :data:`CAPPED` for POT's network simplex to finish it. (POT alone is no answer here: with
    costs at 1e300 beside ones in [0, 1] its float potentials lose the small costs.)"""
    top = float(np.abs(cost).max())
    total = 0
    cap = CAP_FACTOR * float(np.abs(cost[flow > 0]).max(initial=0.0))
    for _ in range(MAX_REFINES):
        if not 0.0 < cap < top:
            break
        capped = np.minimum(cost, cap)[None]
        result = [np.empty((1,) + x.shape[1:], x.dtype) for x in out]
        pivots, error = np.empty(1, np.int64), np.empty(1)
        dist, x1, alpha, beta = result
        solve_range(capped, a[None], b[None], x1, alpha, beta, dist, pivots, error, max_pivots, block, 0, 1)
        if pivots[0] == CAPPED:
            break
        total += max(int(pivots[0]), 0)
        x = result[1][0]
        spill = float((x * (cost - capped[0])).sum())
        if error[0] + spill <= PRECISION_RTOL * float((x * np.abs(cost)).sum()):
            for dst, src in zip(out, result):
                dst[k] = src[0]
            out[0][k] = float((x * cost).sum())
            return total
        cap = cap * CAP_FACTOR if spill > error[0] else CAP_FACTOR * float(np.abs(cost[x > 0]).max(initial=0.0))
    return CAPPED


def _fallback(cost: np.ndarray, a: np.ndarray, b: np.ndarray):
    """POT's network simplex for a problem that hit the pivot cap, duals centred likewise."""
    import ot

    cost = cost.astype(np.float64)
    flow, log = ot.emd(a, b, cost, log=True, numItermax=10**8)
    alpha, beta = np.empty_like(a), np.empty_like(b)
    centred_duals(log["u"], log["v"], 1.0, 1.0, a, b, alpha, beta)
    return (cost * flow).sum(), flow, alpha, beta
