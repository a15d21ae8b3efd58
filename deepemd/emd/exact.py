"""Exact batched transport solver: a transportation simplex compiled with numba.

One call solves a whole batch with no Python per problem: a ``nogil`` kernel solves a range of
problems with one workspace, and a thread pool hands ranges of the batch to its threads
(dynamically). Per problem:

1. integer costs: ``c`` is scaled so that ``max |c|`` is ``2**bits`` (52 for DeepEMD's sizes)
   and truncated to int64. The simplex then runs on exact integers: duals, reduced costs and
   the optimality test (every reduced cost ``>= 0``) have no rounding and need no tolerance,
   and LLVM vectorises integer minimum reductions, which it does not do for floats under numba
   (the pricing scan is ~3x faster). The answer is optimal for costs within ``max|c| * 2**-52``
   of the real ones; the distance is then computed from the real costs;
2. reduction: each row's minimum and then each column's are subtracted (same optimal flow;
   the start then sees each column's competition: 22.8 pivots instead of 30.2 at 25x25);
3. start: a row-minimum greedy basic solution, rows by decreasing regret (second-cheapest minus
   cheapest cost). Each allocation closes exactly one row or column and the closed node hangs
   under the other end of its cell, so the start builds the basis tree (``m + n - 1`` cells,
   zero-flow cells kept where the problem is degenerate) with parents, edge flows, descendant
   masks and duals in the same pass;
4. price: the cell with the most negative reduced cost enters (a vectorised integer minimum
   per row), over every cell up to 32x32 (Dantzig) and over the first block of an eighth of
   the rows (taken cyclically) that holds a negative one above that: pricing a 63x63 problem's
   3,969 cells was most of each pivot;
5. pivot: the cycle is the tree path between the entering row and column, found by walking up
   from the row until a node whose descendant bitmask holds the column (the apex); the leaving
   cell is the smallest flow against the cycle, ties broken by Cunningham's rule (last blocking
   cell in cycle order from the apex) so degenerate pivots are deterministic. The cut subtree
   is re-hung by reversing the parents on one path, its bitmask is moved between the two
   ancestor paths, and its duals shift by the entering reduced cost in one vectorised,
   branch-free pass over the bitmask (no traversal of the subtree);
6. repeat until no reduced cost is negative. Duals are returned as floats: the integer duals
   plus the reduction's offsets, times the cost of one integer step, centred.

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
from numba import njit, types
from numba.extending import overload

from deepemd.emd.threads import run_each_on_threads
from deepemd.errors import DeepEMDError

#: Pivot cap per problem: ``MAX_PIVOTS_PER_CELL * m * n + MIN_PIVOT_CAP`` (a guard against
#: cycling on degenerate problems; the tests never reach it).
MAX_PIVOTS_PER_CELL = 50
MIN_PIVOT_CAP = 100
#: Larger than any reduced cost or packed start value (see cost_bits).
INT_INF = 1 << 62
#: Added to the packed value of the one column a second-minimum search skips.
EXCLUDED = 1 << 61
#: ``ExactSolution.pivots`` of a problem that hit the pivot cap (POT finished it).
CAPPED = -1
#: ``pivots`` of a problem whose costs hold NaN or inf (solve_batch raises).
NON_FINITE = -2
#: The kernel's mark for a problem whose integer grid was too coarse for its costs (a few costs
#: ~1e15+ times the ones the flow uses: the usual way to forbid a match); solve_batch re-solves
#: it with capped costs (:func:`_refine`), so no returned ``pivots`` holds it.
IMPRECISE = -3
#: A solution is accepted when its certified distance error (see :func:`_solve_one`) is at
#: most this fraction of ``sum |c_ij| x_ij``: an eighth of float32's epsilon.
PRECISION_RTOL = 2.0**-26
#: A refinement caps the costs at this factor times the largest cost the flow uses.
CAP_FACTOR = 2.0**20
#: Refinements tried before POT's network simplex finishes a problem.
MAX_REFINES = 8
#: Bits of a float64 with the exponent all ones, i.e. inf or NaN.
EXPONENT_ALL_ONES = 0x7FF0000000000000
#: The same for float32.
EXPONENT_ALL_ONES_32 = 0x7F800000
#: Problems of at most this many cells price every cell per pivot (Dantzig's rule); larger
#: ones price blocks of rows (:func:`_price_block`). At 25x25 the full scan is the faster.
FULL_PRICING_CELLS = 32 * 32
#: Larger problems price an eighth of their rows per block (63 rows: blocks of 8).
PRICING_BLOCKS = 8
#: Batches of fewer cells (16 problems at 25x25, 3 at 63x63) run on the calling thread.
PARALLEL_MIN_CELLS = 16 * 25 * 25
#: Fewest cells (``m * n`` summed over its problems) in a range handed to a thread: about
#: 0.3 ms of work, i.e. 32 problems at 25x25 but 5 at 63x63 (a 100-problem rerank row of
#: 63x63 problems in ranges of 32 left one thread idle for a third of the solve).
MIN_RANGE_CELLS = 32 * 25 * 25


@njit(cache=True)
def index_bits(n: int) -> int:
    """Bits that hold a column index ``0..n-1`` in a packed start value."""
    return max(1, math.ceil(math.log2(n)))


@njit(cache=True)
def cost_bits(m: int, n: int) -> int:
    """Bits of the integer costs: 52 (a double's precision), fewer for huge problems so that
    duals (sums of up to ``m + n`` reduced costs below ``2**(bits+1)``) and reduced costs stay
    inside int64 with room to spare, and so that a start value (a cost plus the closed-column
    offset ``4 << bits``, below ``2**(bits+3)``) shifted left by :func:`index_bits` stays
    below :data:`EXCLUDED`."""
    return min(52, 60 - math.ceil(math.log2(2 * (m + n) + 1)), 58 - index_bits(n))


@njit(cache=True)
def _row_min(row, shift) -> int:
    """``min_j row_j - shift_j`` (a vectorised integer reduction)."""
    best = INT_INF
    for j in range(row.shape[0]):
        best = min(best, row[j] - shift[j])
    return best


@njit(cache=True)
def pricing_block(m: int, n: int) -> int:
    """Rows priced per pivot (see :func:`_price_block`): all of them up to
    :data:`FULL_PRICING_CELLS` cells, else an eighth of them."""
    return m if m * n <= FULL_PRICING_CELLS else -(-m // PRICING_BLOCKS)


@njit(cache=True)
def _price_all(ci, alpha, beta) -> tuple:
    """Dantzig: ``(most negative reduced cost, its row)`` over every cell; row -1 when none
    is negative (the basis is optimal). :func:`_price_block` with ``block = m`` gives the
    same, but its cyclic loop cost 15% more at 25x25, where every problem prices this way."""
    best = 0
    ei = -1
    for i in range(ci.shape[0]):
        r = _row_min(ci[i], beta) - alpha[i]
        if r < best:
            best = r
            ei = i
    return best, ei


@njit(cache=True)
def _price_block(ci, alpha, beta, start: int, block: int) -> tuple:
    """Block pricing: rows ``block`` at a time, cyclically from ``start``, stopping after the
    first block that holds a negative reduced cost; returns ``(its most negative, its row,
    where the next pivot starts)``, row -1 after a whole cycle finds none (optimal). More
    pivots than Dantzig's rule but each prices a fraction of the cells: on 63x63 rerank
    problems 195 pivots instead of 150 in 0.6x the time (``benchmarks/rerank_speed.py
    --pricing``)."""
    m = ci.shape[0]
    best = 0
    ei = -1
    i = start
    in_block = 0
    for _ in range(m):
        r = _row_min(ci[i], beta) - alpha[i]
        if r < best:
            best = r
            ei = i
        i = i + 1 if i + 1 < m else 0
        in_block += 1
        if in_block == block:
            if ei >= 0:
                break
            in_block = 0
    return best, ei, i


@njit(cache=True)
def _first_equal(row, shift, value) -> int:
    """First ``j`` with ``row_j - shift_j == value``: an integer minimum over a select, which
    vectorises (an early-exit search mispredicts its exit on every call)."""
    n = row.shape[0]
    k = n
    for j in range(n):
        k = min(k, j if row[j] - shift[j] == value else n)
    return k


@njit(cache=True)
def _packed_min(row, shift, ib: int, skip: int) -> int:
    """``min_j ((row_j - shift_j) << ib) + j`` over ``j != skip``: the minimum and (in the low
    ``ib`` bits) its first index from one vectorised pass. The start's values are small enough
    for the packing (:func:`cost_bits`); pricing's reduced costs are not and use two passes."""
    best = INT_INF
    for j in range(row.shape[0]):
        best = min(best, ((row[j] - shift[j]) << ib) + j + (EXCLUDED if j == skip else 0))
    return best


def _abs_max(c, word):
    """``max |c|`` of a float32 or float64 matrix as a float64, or -1.0 when a value is NaN
    or inf (numba-only: the implementation is chosen by the dtype, below)."""
    raise NotImplementedError


@overload(_abs_max)
def _abs_max_typed(c, word):
    """With the sign bit cleared, floats order like their bits read as integers: the maximum
    is a vectorised integer reduction over the bit patterns, and NaN and inf (exponent all
    ones) show up in it."""
    if c.dtype == types.float32:

        def abs_max_32(c, word):
            raw = c.view(np.int32)
            top = 0
            for i in range(c.shape[0]):
                for j in range(c.shape[1]):
                    top = max(top, raw[i, j] & 0x7FFFFFFF)
            if top >= EXPONENT_ALL_ONES_32:
                return -1.0
            exponent, mantissa = top >> 23, top & 0x7FFFFF  # decoded exactly
            if exponent == 0:
                return math.ldexp(float(mantissa), -149)
            return math.ldexp(float(mantissa | 0x800000), exponent - 150)

        return abs_max_32

    def abs_max_64(c, word):
        raw = c.view(np.int64)
        top = 0
        for i in range(c.shape[0]):
            for j in range(c.shape[1]):
                top = max(top, raw[i, j] & 0x7FFFFFFFFFFFFFFF)
        if top >= EXPONENT_ALL_ONES:
            return -1.0
        word[0] = top
        return word.view(np.float64)[0]

    return abs_max_64


@njit(cache=True)
def _integer_costs(c, ci, bits: int, word) -> float:
    """``ci = floor(c * 2**bits / max|c|)``; returns ``max |c|`` (an integer step costs
    ``max|c| * 2**-bits``), or -1.0 when a cost is NaN or inf.

    ``c`` is float32 or float64 (read as it is: a float32 batch is never copied to float64).
    ``max |c|`` comes from the bit patterns (:func:`_abs_max`: a vectorised integer reduction,
    where a float one is not vectorised under numba) and reveals NaN and inf for free, which
    spares callers a separate pass over the costs. ``word``: one int64 of workspace.

    Rounding down (not toward zero) makes every grid cost at most the real one whatever its
    sign, which is what the precision certificate of :func:`_solve_one` rests on."""
    m, n = c.shape
    cmax = _abs_max(c, word)
    if cmax < 0.0:
        return -1.0
    if cmax == 0.0:
        ci[:, :] = 0
        return 0.0
    scale = 2.0**bits / cmax
    if scale < np.inf:
        for i in range(m):
            for j in range(n):
                ci[i, j] = np.int64(np.floor(c[i, j] * scale))
    else:  # max |c| below ~1e-292: 2**bits / max|c| overflows, divide instead
        for i in range(m):
            for j in range(n):
                ci[i, j] = np.int64(np.floor(c[i, j] / cmax * 2.0**bits))
    return cmax


@njit(cache=True)
def _reduce(ci, offset, zero) -> None:
    """Subtract each row's minimum, then each column's (``offset`` keeps them: rows, then
    columns). The optimal flow does not change (the subtracted amounts are fixed by the
    marginals), but the greedy start on the reduced costs sees each column's competition: 22
    pivots instead of 30 from it on DeepEMD's 25x25 problems."""
    m, n = ci.shape
    for i in range(m):
        low = _row_min(ci[i], zero)
        offset[i] = low
        for j in range(n):
            ci[i, j] -= low
    col = offset[m:]
    for j in range(n):
        col[j] = ci[0, j]
    for i in range(1, m):
        for j in range(n):
            col[j] = min(col[j], ci[i, j])
    for i in range(m):
        for j in range(n):
            ci[i, j] -= col[j]


@njit(cache=True)
def _order_by_decreasing(key, order, m: int) -> None:
    """``order[:m]`` = indices sorted by decreasing ``key`` (stable insertion sort: m is small,
    and unlike np.argsort it allocates nothing)."""
    for i in range(m):
        k = key[i]
        p = i
        while p > 0 and key[order[p - 1]] < k:
            order[p] = order[p - 1]
            p -= 1
        order[p] = i


@njit(cache=True)
def _greedy_start(ci, a, b, bits, shift, row_order, regret, rb, parent, tflow, closed, desc, pot) -> int:
    """Row-minimum start, rows by decreasing regret (the Vogel idea at a fraction of Vogel's
    cost): each row ships to its cheapest open columns until it is empty. ``shift`` is all
    zero on entry (every column open); a closed column gets ``-(4 << bits)``.

    Every allocation closes exactly one row or column; the closed node becomes the child of the
    cell's other end, which closes later or is the root (the last row, which takes every
    remaining column). So ``closed`` is a bottom-up order of the tree: descendant masks are
    accumulated along it and duals assigned against it. Node ids: rows ``0..m-1``, columns
    ``m..m+n-1``; ``tflow[v]`` is the flow on the cell joining ``v`` to its parent. Returns
    the root."""
    m, n = ci.shape
    nodes = m + n
    ib = index_bits(n)
    low = (1 << ib) - 1
    for i in range(m):
        first = _packed_min(ci[i], shift, ib, -1)
        second = _packed_min(ci[i], shift, ib, first & low)
        regret[i] = (second >> ib) - (first >> ib) if n > 1 else 0
    _order_by_decreasing(regret, row_order, m)
    for j in range(n):
        rb[j] = b[j]
    count = 0
    open_cols = n
    for k in range(m - 1):
        i = row_order[k]
        ra = a[i]
        while True:
            j = _packed_min(ci[i], shift, ib, -1) & low
            # Close the row (keeping the column) when it is exhausted; the last open column is
            # never closed before the last row, so rounding cannot disconnect the tree.
            if rb[j] >= ra or open_cols == 1:
                parent[i] = m + j
                tflow[i] = ra
                rb[j] -= ra
                closed[count] = i
                count += 1
                break
            parent[m + j] = i
            tflow[m + j] = rb[j]
            ra -= rb[j]
            closed[count] = m + j
            count += 1
            shift[j] = -(4 << bits)
            open_cols -= 1
    root = row_order[m - 1]
    parent[root] = -1
    for j in range(n):  # the last row takes every remaining column's demand
        if shift[j] == 0:
            parent[m + j] = root
            tflow[m + j] = max(rb[j], 0.0)
            closed[count] = m + j
            count += 1
    words = desc.shape[1]
    for v in range(nodes):
        for w in range(words):
            desc[v, w] = 0
        desc[v, v >> 6] = 1 << (v & 63)
    for t in range(nodes - 1):
        v = closed[t]
        for w in range(words):
            desc[parent[v], w] |= desc[v, w]
    pot[root] = 0
    for t in range(nodes - 2, -1, -1):
        v = closed[t]
        p = parent[v]
        pot[v] = ci[v, p - m] - pot[p] if v < m else ci[p, v - m] - pot[p]
    return root


@njit(cache=True, inline="always")
def _holds(desc, node: int, q: int) -> bool:
    """Whether ``q`` is in the subtree of ``node``."""
    return (desc[node, q >> 6] >> (q & 63)) & 1 == 1


@njit(cache=True)
def _rehang(parent, tflow, desc, path, cut: int, new_parent: int, theta: float, moved, old_up, new_up) -> None:
    """Remove the cell joining ``path[cut]`` to its parent and hang the cut-off subtree from
    ``path[0]`` under ``new_parent`` (the entering cell, flow ``theta``).

    Parents and edge flows reverse along ``path[0..cut]``; the subtree's mask (``moved``)
    leaves the old ancestors below the apex (``old_up``) and joins the new ones (``new_up``);
    on the reversed path each node keeps its old descendants except the branch it now hangs
    from, plus its new child's."""
    words = desc.shape[1]
    for w in range(words):
        moved[w] = desc[path[cut], w]
    for v in old_up:
        for w in range(words):
            desc[v, w] &= ~moved[w]
    for v in new_up:
        for w in range(words):
            desc[v, w] |= moved[w]
    for t in range(cut, 0, -1):
        for w in range(words):
            desc[path[t], w] &= ~desc[path[t - 1], w]
            if t < cut:
                desc[path[t], w] |= desc[path[t + 1], w]
    for w in range(words):
        desc[path[0], w] = moved[w]
    for t in range(cut - 1, -1, -1):
        parent[path[t + 1]] = path[t]
        tflow[path[t + 1]] = tflow[path[t]]
    parent[path[0]] = new_parent
    tflow[path[0]] = theta


@njit(cache=True)
def _shift_subtree(pot, moved, m: int, d: int) -> None:
    """Rows in the ``moved`` mask ``+= d``, its columns ``-= d`` (branch-free, vectorised)."""
    nodes = pot.shape[0]
    for w in range(moved.shape[0]):
        word = moved[w]
        lo = 64 * w
        for v in range(lo, min(lo + 64, nodes)):
            pot[v] += (d if v < m else -d) * ((word >> (v - lo)) & 1)


@njit(cache=True)
def _solve_one(
    c,
    ci,
    a,
    b,
    x,
    alpha_out,
    beta_out,
    shift,
    row_order,
    regret,
    rb,
    parent,
    tflow,
    closed,
    desc,
    pot,
    up_row,
    up_col,
    moved,
    word,
    offset,
    bits,
    max_pivots,
    block,
) -> tuple:
    """Solve one problem in place: flow (into ``x``), centred duals; returns
    ``(distance, pivot count, certified error)``, the count :data:`CAPPED` on the pivot cap,
    :data:`NON_FINITE` (distance NaN) for NaN or inf costs and :data:`IMPRECISE` when the
    certified error exceeds :data:`PRECISION_RTOL` of ``sum |c_ij| x_ij``.

    The certificate: the flow ``x`` is optimal for the grid costs ``g <= c`` (rounded down),
    so for the optimal ``x*`` of the real costs ``c.x* >= g.x* >= g.x``, and the distance
    ``c.x`` is at most ``(c - g).x`` above the optimum: a sum over the ``m + n - 1`` basic
    cells, no pass over the costs. It is small whenever the costs the flow uses are large
    against the grid step ``max|c| * 2**-52``, and it fails exactly when a few huge costs
    (forbidden cells at 1e15..1e300) coarsen the grid under the costs that matter."""
    m, n = c.shape
    cmax = _integer_costs(c, ci, bits, word)
    if cmax < 0.0:
        return np.nan, NON_FINITE, np.nan
    for j in range(n):
        shift[j] = 0
    _reduce(ci, offset, shift)
    root = _greedy_start(ci, a, b, bits, shift, row_order, regret, rb, parent, tflow, closed, desc, pot)
    alpha = pot[:m]
    beta = pot[m:]
    pivots = CAPPED
    start = 0
    for pivot in range(max_pivots):
        if block >= m:
            best, ei = _price_all(ci, alpha, beta)
        else:
            best, ei, start = _price_block(ci, alpha, beta, start, block)
        if ei < 0:
            pivots = pivot
            break
        col = m + _first_equal(ci[ei], beta, best + alpha[ei])
        # Paths up to the apex: from the row until a node holds the column, then the column's.
        lr = 0
        up_row[0] = ei
        while not _holds(desc, up_row[lr], col):
            up_row[lr + 1] = parent[up_row[lr]]
            lr += 1
        apex = up_row[lr]
        lc = 0
        up_col[0] = col
        while up_col[lc] != apex:
            up_col[lc + 1] = parent[up_col[lc]]
            lc += 1
        # Edge t of a path joins path[t] to path[t+1] (flow tflow[path[t]]); even edges carry
        # flow against the cycle. Cunningham's tie rule: on the row path the blocking edge
        # nearest the entering row, any on the column path before it, there nearest the apex.
        theta = np.inf
        cut = -1
        on_col = False
        for t in range(0, lr, 2):
            if tflow[up_row[t]] < theta:
                theta = tflow[up_row[t]]
                cut = t
        for t in range(0, lc, 2):
            if tflow[up_col[t]] <= theta:
                theta = tflow[up_col[t]]
                cut = t
                on_col = True
        for t in range(lr):
            tflow[up_row[t]] += -theta if t % 2 == 0 else theta
        for t in range(lc):
            tflow[up_col[t]] += -theta if t % 2 == 0 else theta
        # The entering cell's reduced cost becomes 0: the re-hung subtree's duals shift by it.
        if on_col:
            _rehang(parent, tflow, desc, up_col, cut, ei, theta, moved, up_col[cut + 1 : lc], up_row[:lr])
            _shift_subtree(pot, moved, m, -best)
        else:
            _rehang(parent, tflow, desc, up_row, cut, col, theta, moved, up_row[cut + 1 : lr], up_col[:lc])
            _shift_subtree(pot, moved, m, best)
    for i in range(m):  # here rather than np.zeros: a 5 MB memset is a pass of its own
        for j in range(n):
            x[i, j] = 0.0
    distance = 0.0
    error = 0.0  # (c - g).x, the certificate
    size = 0.0  # |c|.x
    for v in range(m + n):
        if v != root:
            i, j = (v, parent[v] - m) if v < m else (parent[v], v - m)
            f = tflow[v]
            x[i, j] = f
            distance += f * c[i, j]
            grid = np.float64(ci[i, j] + offset[i] + offset[m + j]) * 2.0**-bits * cmax
            error += f * (c[i, j] - grid)
            size += f * abs(c[i, j])
    if pivots != CAPPED and error > PRECISION_RTOL * size:
        pivots = IMPRECISE
    for v in range(m + n):  # duals of the real costs
        pot[v] += offset[v]
    _centred_duals(alpha, beta, 2.0**-bits, cmax, a, b, alpha_out, beta_out)
    return distance, pivots, error


@njit(cache=True)
def _centred_duals(alpha, beta, step: float, cmax: float, a, b, alpha_out, beta_out) -> None:
    """Float duals ``alpha * step * cmax`` (in that order, so that tiny costs do not underflow
    to zero duals) shifted by ``(+t, -t)`` so that ``a . alpha == b . beta`` (see
    :mod:`deepemd.emd.layer`: the gauge in which they are the gradient of the distance)."""
    a_alpha, mass_a = _float_duals(alpha, step, cmax, a, alpha_out)
    b_beta, mass_b = _float_duals(beta, step, cmax, b, beta_out)
    t = (b_beta - a_alpha) / (mass_a + mass_b)
    for i in range(alpha_out.shape[0]):
        alpha_out[i] += t
    for j in range(beta_out.shape[0]):
        beta_out[j] -= t


@njit(cache=True)
def _float_duals(duals, step: float, cmax: float, mass, out) -> tuple:
    """``out = duals * step * cmax``; returns ``(mass . out, sum(mass))``."""
    dot = 0.0
    total = 0.0
    for i in range(duals.shape[0]):
        out[i] = duals[i] * step * cmax
        dot += mass[i] * out[i]
        total += mass[i]
    return dot, total


@njit(cache=True, nogil=True)
def _solve_range(c, a, b, x, alpha, beta, distance, pivots, error, max_pivots, block, start, stop):
    """Problems ``start..stop-1`` with one workspace (allocated once, reused per problem),
    pricing ``block`` rows per pivot. ``nogil``: threads of :func:`solve_batch` run it
    concurrently on disjoint ranges."""
    m, n = c.shape[1], c.shape[2]
    nodes = m + n
    words = (nodes + 63) // 64
    bits = cost_bits(m, n)
    ci = np.empty((m, n), np.int64)
    shift = np.empty(n, np.int64)
    row_order = np.empty(m, np.int64)
    regret = np.empty(m, np.int64)
    rb = np.empty(n, np.float64)
    parent = np.empty(nodes, np.int64)
    tflow = np.empty(nodes, np.float64)
    closed = np.empty(nodes, np.int64)
    desc = np.empty((nodes, words), np.int64)
    pot = np.empty(nodes, np.int64)
    up_row = np.empty(nodes + 1, np.int64)
    up_col = np.empty(nodes + 1, np.int64)
    moved = np.empty(words, np.int64)
    word = np.empty(1, np.int64)
    offset = np.empty(nodes, np.int64)
    for k in range(start, stop):
        distance[k], pivots[k], error[k] = _solve_one(
            c[k],
            ci,
            a[k],
            b[k],
            x[k],
            alpha[k],
            beta[k],
            shift,
            row_order,
            regret,
            rb,
            parent,
            tflow,
            closed,
            desc,
            pot,
            up_row,
            up_col,
            moved,
            word,
            offset,
            bits,
            max_pivots,
            block,
        )


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
        _solve_range(*args, *bound)  # type: ignore[call-arg]  # a numba dispatcher

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
        _solve_range(*args, 0, bsz)
    bad = np.flatnonzero(pivots == NON_FINITE)
    if len(bad):
        raise DeepEMDError(
            f"cost contains NaN or inf values (problem {bad[0]} of {bsz})",
            fix="check the network output (diverged training, bad input image)",
        )
    for k in np.flatnonzero(pivots == IMPRECISE):
        pivots[k] = _refine(cost[k], a[k], b[k], flow[k], max_pivots, block, (distance, flow, alpha, beta), int(k))
    for k in np.flatnonzero(pivots == CAPPED):
        distance[k], flow[k], alpha[k], beta[k] = _fallback(cost[k], a[k], b[k])
    return ExactSolution(distance, flow, alpha, beta, pivots)


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
        _solve_range(capped, a[None], b[None], x1, alpha, beta, dist, pivots, error, max_pivots, block, 0, 1)
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
    _centred_duals(log["u"], log["v"], 1.0, 1.0, a, b, alpha, beta)
    return (cost * flow).sum(), flow, alpha, beta
