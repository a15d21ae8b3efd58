"""Exact batched transport solver: a transportation simplex compiled with numba.

One call solves a whole batch with no Python per problem: a ``nogil`` kernel solves a range of
problems with one workspace, and a thread pool hands ranges of the batch to its threads
(dynamically). Per problem:

1. start: a row-minimum greedy basic solution, rows by decreasing regret (each allocation
   closes exactly one row or column, so the basis is a spanning tree of ``m + n - 1`` cells,
   zero-flow cells kept where the problem is degenerate, e.g. uniform weights with m == n);
2. MODI duals ``alpha_i + beta_j = c_ij`` on the basis tree (rooted at row 0, parents kept);
3. price (Dantzig): the cell with the most negative reduced cost enters, found with a
   vectorised row minimum; the tree path closes the cycle; the leaving cell is the smallest
   flow against the cycle, ties broken by Cunningham's rule (last blocking cell in cycle order
   from the apex) so degenerate pivots are deterministic; only the re-hung subtree gets new
   parents and duals;
4. repeat until no reduced cost is below ``-tol`` (``1e-12`` times the largest |cost|).

Everything is float64. A problem that reaches the pivot cap (a guard against cycling on
degenerate problems; not reached in the tests) is re-solved by POT's network simplex, so the
result is always exact; ``ExactSolution.pivots`` says which (-1).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from numba import njit

MAX_PIVOTS_PER_CELL = 50
#: Added to closed columns' costs in the start (finite: the minimum runs with fastmath).
CLOSED = 1e300
#: Smaller batches run on the calling thread.
PARALLEL_MIN_BATCH = 16


@njit(cache=True)
def _argmin_shifted(row, shift) -> tuple:
    """``(j, min_j row_j - shift_j)``, first index on ties: a vectorised minimum, then a
    vectorised search for the first index holding it (an integer minimum over a select; an
    early-exit search mispredicts its exit branch on every call)."""
    best = _row_min(row, shift)
    n = row.shape[0]
    k = n
    for j in range(n):
        k = min(k, j if row[j] - shift[j] == best else n)
    if k < n:
        return k, best
    # Only if the fast minimum rounded differently: a plain argmin is always right.
    k = 0
    for j in range(1, n):
        if row[j] - shift[j] < row[k] - shift[k]:
            k = j
    return k, row[k] - shift[k]


@njit(cache=True)
def _two_smallest(row, shift) -> tuple:
    """The smallest and second-smallest ``row_j - shift_j`` in one branch-free pass."""
    first = 2.0 * CLOSED
    second = 2.0 * CLOSED
    for j in range(row.shape[0]):
        v = row[j] - shift[j]
        second = min(second, max(first, v))
        first = min(first, v)
    return first, second


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
def _greedy_start(c, a, b, x, radj, rdeg, cadj, cdeg, rb, shift, row_order, regret):
    """Row-minimum start, rows taken by decreasing regret (second-cheapest minus cheapest
    cost, the Vogel idea at a fraction of Vogel's cost): each row ships to its cheapest open
    columns until it is empty. Every allocation closes exactly one row or column, so the basis
    is a spanning tree of m + n - 1 cells (zero-flow cells kept on ties). A closed column gets
    ``shift = -CLOSED`` so that the vectorised row minimum skips it."""
    m, n = c.shape
    for j in range(n):
        shift[j] = 0.0
    for i in range(m):
        first, second = _two_smallest(c[i], shift)
        regret[i] = second - first if n > 1 else 0.0
    _order_by_decreasing(regret, row_order, m)
    for j in range(n):
        rb[j] = b[j]
        cdeg[j] = 0
    for i in range(m):
        rdeg[i] = 0
    remaining_cols = n
    for ii in range(m):
        i = row_order[ii]
        last = ii == m - 1
        ra = a[i]
        while remaining_cols > 0:
            bj, _ = _argmin_shifted(c[i], shift)
            radj[i, rdeg[i]] = bj
            rdeg[i] += 1
            cadj[bj, cdeg[bj]] = i
            cdeg[bj] += 1
            # Close the row (keeping the column) when it is exhausted; the last open column is
            # never closed before the last row, so rounding cannot disconnect the tree.
            if not last and (rb[bj] >= ra or remaining_cols == 1):
                x[i, bj] = ra
                rb[bj] -= ra
                break
            if not last:
                x[i, bj] = rb[bj]
                ra -= rb[bj]
            else:  # last row takes every remaining column's demand
                x[i, bj] = max(rb[bj], 0.0)
            shift[bj] = -CLOSED
            remaining_cols -= 1


@njit(cache=True)
def _duals(c, alpha, beta, radj, rdeg, cadj, cdeg, parent, depth, order):
    """MODI duals on the basis tree rooted at row 0 (alpha_0 = 0), with parents and depths."""
    m, n = c.shape
    alpha[0] = 0.0
    parent[0] = -1
    depth[0] = 0
    order[0] = 0
    head = 0
    tail = 1
    while head < tail:
        node = order[head]
        head += 1
        if node < m:
            for k in range(rdeg[node]):
                child = m + radj[node, k]
                if child != parent[node]:
                    parent[child] = node
                    depth[child] = depth[node] + 1
                    beta[child - m] = c[node, child - m] - alpha[node]
                    order[tail] = child
                    tail += 1
        else:
            j = node - m
            for k in range(cdeg[j]):
                child = cadj[j, k]
                if child != parent[node]:
                    parent[child] = node
                    depth[child] = depth[node] + 1
                    alpha[child] = c[child, j] - beta[j]
                    order[tail] = child
                    tail += 1


@njit(cache=True, fastmath=True)
def _row_min(row, beta) -> float:
    """``min_j row_j - beta_j``; fastmath lets LLVM vectorise the reduction (pricing is most of
    the work per pivot)."""
    best = np.inf
    for j in range(row.shape[0]):
        best = min(best, row[j] - beta[j])
    return best


@njit(cache=True)
def _price(c, alpha, beta, threshold: float) -> tuple:
    """Dantzig pricing: the cell with the most negative reduced cost below ``threshold``,
    found row by row with a vectorised minimum, then located in the winning row."""
    m, n = c.shape
    best = threshold
    ei = -1
    for i in range(m):
        r = _row_min(c[i], beta) - alpha[i]
        if r < best:
            best = r
            ei = i
    if ei < 0:
        return -1, -1
    ej, _ = _argmin_shifted(c[ei], beta)
    return ei, ej


@njit(cache=True, inline="always")
def _remove(adj, deg, owner: int, value: int) -> None:
    for k in range(deg[owner]):
        if adj[owner, k] == value:
            deg[owner] -= 1
            adj[owner, k] = adj[owner, deg[owner]]
            return


@njit(cache=True)
def _solve_one(c, a, b, x, alpha, beta, radj, rdeg, cadj, cdeg, parent, depth, order,
               ra, rb, shift, jpath, ipath, max_pivots):
    """Solve one problem in place (x zeroed on entry); returns the pivot count, -1 on cap."""
    m, n = c.shape
    _greedy_start(c, a, b, x, radj, rdeg, cadj, cdeg, rb, shift, order, ra)
    scale = 0.0
    for i in range(m):
        for j in range(n):
            scale = max(scale, abs(c[i, j]))
    tol = 1e-12 * scale
    _duals(c, alpha, beta, radj, rdeg, cadj, cdeg, parent, depth, order)
    for pivot in range(max_pivots):
        ei, ej = _price(c, alpha, beta, -tol)
        if ei < 0:
            return pivot
        # Tree paths from column ej and from row ei up to their common ancestor (the apex):
        # first lift the deeper end, then both together (no data-dependent branch per step).
        nj = m + ej
        ni = ei
        lj = 0
        li = 0
        jpath[0] = nj
        ipath[0] = ni
        while depth[nj] > depth[ni]:
            nj = parent[nj]
            lj += 1
            jpath[lj] = nj
        while depth[ni] > depth[nj]:
            ni = parent[ni]
            li += 1
            ipath[li] = ni
        while nj != ni:
            nj = parent[nj]
            lj += 1
            jpath[lj] = nj
            ni = parent[ni]
            li += 1
            ipath[li] = ni
        # Cycle: +(ei, ej), then alternately - / + along both paths, starting with - next to
        # each end. Edge k of the j path joins jpath[k] and jpath[k+1]; even k are the minus
        # cells (column jpath[k], row jpath[k+1]); on the i path even k are minus cells too
        # (row ipath[k], column ipath[k+1]). The leaving cell is the smallest minus flow; ties
        # go to the last blocking cell in cycle order from the apex (Cunningham): on the j
        # path the one nearest the apex, else on the i path the one nearest row ei.
        theta = np.inf
        leave_r = -1
        leave_c = -1
        leave_on_j = True
        for k in range(lj - 1 - ((lj - 1) % 2), -1, -2):
            v = x[jpath[k + 1], jpath[k] - m]
            if v < theta:
                theta = v
                leave_r = jpath[k + 1]
                leave_c = jpath[k] - m
        for k in range(0, li, 2):
            v = x[ipath[k], ipath[k + 1] - m]
            if v < theta:
                theta = v
                leave_r = ipath[k]
                leave_c = ipath[k + 1] - m
                leave_on_j = False
        for k in range(0, lj, 2):
            x[jpath[k + 1], jpath[k] - m] -= theta
        for k in range(1, lj, 2):
            x[jpath[k], jpath[k + 1] - m] += theta
        for k in range(0, li, 2):
            x[ipath[k], ipath[k + 1] - m] -= theta
        for k in range(1, li, 2):
            x[ipath[k + 1], ipath[k] - m] += theta
        lr = leave_r
        lc = leave_c
        x[lr, lc] = 0.0
        x[ei, ej] = theta
        _remove(radj, rdeg, lr, lc)
        _remove(cadj, cdeg, lc, lr)
        radj[ei, rdeg[ei]] = ej
        rdeg[ei] += 1
        cadj[ej, cdeg[ej]] = ei
        cdeg[ej] += 1
        # The leaving cell cut off the subtree below it; the entering cell re-hangs it. Only
        # that subtree's parents, depths and duals change: redo them from the entering end.
        if leave_on_j:
            _rehang(c, alpha, beta, radj, rdeg, cadj, cdeg, parent, depth, order, m + ej, ei)
        else:
            _rehang(c, alpha, beta, radj, rdeg, cadj, cdeg, parent, depth, order, ei, m + ej)
    return -1


@njit(cache=True)
def _rehang(c, alpha, beta, radj, rdeg, cadj, cdeg, parent, depth, order, top, new_parent):
    """Hang the subtree containing ``top`` under ``new_parent`` and recompute its parents,
    depths and MODI duals by a traversal that never leaves the subtree."""
    m = c.shape[0]
    parent[top] = new_parent
    order[0] = top
    head = 0
    tail = 1
    while head < tail:
        node = order[head]
        head += 1
        p = parent[node]
        depth[node] = depth[p] + 1
        if node < m:
            alpha[node] = c[node, p - m] - beta[p - m]
            for k in range(rdeg[node]):
                child = m + radj[node, k]
                if child != p:
                    parent[child] = node
                    order[tail] = child
                    tail += 1
        else:
            j = node - m
            beta[j] = c[p, j] - alpha[p]
            for k in range(cdeg[j]):
                child = cadj[j, k]
                if child != p:
                    parent[child] = node
                    order[tail] = child
                    tail += 1


@njit(cache=True, nogil=True)
def _solve_range(c, a, b, x, alpha, beta, pivots, max_pivots, start, stop):
    """Problems ``start..stop-1`` with one workspace (allocated once, reused per problem).
    ``nogil``: threads of :func:`solve_batch` run it concurrently on disjoint ranges."""
    m, n = c.shape[1], c.shape[2]
    radj = np.empty((m, n), np.int64)
    cadj = np.empty((n, m), np.int64)
    rdeg = np.empty(m, np.int64)
    cdeg = np.empty(n, np.int64)
    parent = np.empty(m + n, np.int64)
    depth = np.empty(m + n, np.int64)
    order = np.empty(m + n, np.int64)
    ra = np.empty(m, np.float64)
    rb = np.empty(n, np.float64)
    jpath = np.empty(m + n, np.int64)
    ipath = np.empty(m + n, np.int64)
    shift = np.empty(n, np.float64)
    for k in range(start, stop):
        pivots[k] = _solve_one(c[k], a[k], b[k], x[k], alpha[k], beta[k], radj, rdeg, cadj,
                               cdeg, parent, depth, order, ra, rb, shift, jpath, ipath,
                               max_pivots)


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None


def _thread_pool(threads: int) -> ThreadPoolExecutor:
    """One pool per process, grown on demand. Keyed by pid: a forked child (a DataLoader
    worker) inherits the parent's pool object but not its threads, so it gets its own."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] < threads:
        _POOL = (os.getpid(), threads,
                 ThreadPoolExecutor(max_workers=threads, thread_name_prefix="deepemd-exact"))
    return _POOL[2]


def _solve_threaded(args: tuple, bsz: int, threads: int) -> None:
    """Many small ranges handed out dynamically to ``threads`` workers, so a thread that the
    OS delays (the machine may be shared) does not hold the whole batch back.

    Plain threads around a ``nogil`` kernel rather than numba's ``parallel=True``: no OpenMP
    pool whose spinning workers fight torch's own OpenMP pool for the cores between calls (it
    made the matmuls next to a solve ~10x slower on 2 cores), and nothing that numba's disk
    cache has to rebuild from dynamically generated kernels."""
    n_chunks = max(threads, min(bsz // 8, 8 * threads))
    bounds = [k * bsz // n_chunks for k in range(n_chunks + 1)]
    jobs = [_thread_pool(threads).submit(_solve_range, *args, lo, hi)
            for lo, hi in zip(bounds[:-1], bounds[1:])]
    for job in jobs:
        job.result()


class ExactSolution(NamedTuple):
    flow: np.ndarray    # (B, m, n) optimal flow
    alpha: np.ndarray   # (B, m) optimal row duals (MODI gauge: alpha_0 = 0 on the final basis)
    beta: np.ndarray    # (B, n) optimal column duals
    pivots: np.ndarray  # (B,) simplex pivots per problem; -1 where POT finished the problem


def solve_batch(cost: np.ndarray, a: np.ndarray, b: np.ndarray, threads: int | None = None
                ) -> ExactSolution:
    """Optimal flow and duals of every problem, float64, on ``threads`` threads (default
    ``torch.get_num_threads()``, the count the rest of the EMD head runs on).

    ``b`` is rescaled to ``a``'s total first (callers pass balanced masses; this removes the
    last rounding difference so the start solution is feasible to machine precision).
    """
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    a = np.ascontiguousarray(a, dtype=np.float64)
    b = np.ascontiguousarray(b * (a.sum(-1) / b.sum(-1))[:, None], dtype=np.float64)
    bsz, m, n = cost.shape
    flow = np.zeros((bsz, m, n))
    alpha = np.empty((bsz, m))
    beta = np.empty((bsz, n))
    pivots = np.empty(bsz, np.int64)
    max_pivots = MAX_PIVOTS_PER_CELL * m * n + 100
    threads = torch.get_num_threads() if threads is None else threads
    args = (cost, a, b, flow, alpha, beta, pivots, max_pivots)
    if bsz >= PARALLEL_MIN_BATCH and threads > 1:
        _solve_threaded(args, bsz, threads)
    else:  # handing work to threads costs more than a few small problems
        _solve_range(*args, 0, bsz)
    for k in np.flatnonzero(pivots < 0):
        flow[k], alpha[k], beta[k] = _fallback(cost[k], a[k], b[k])
    return ExactSolution(flow, alpha, beta, pivots)


def _fallback(cost: np.ndarray, a: np.ndarray, b: np.ndarray):
    import ot

    flow, log = ot.emd(a, b, cost, log=True, numItermax=10**8)
    return flow, log["u"], log["v"]
