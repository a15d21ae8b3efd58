"""The compiled kernel of the exact solver: a transportation simplex on integer costs (numba).

:func:`solve_range` solves problems ``start..stop-1`` of a batch with one workspace and no
Python per problem; :mod:`deepemd.emd.exact` hands ranges of a batch to threads and handles the
rare problem the kernel marks. Per problem:

1. grid costs: ``c`` is scaled so that ``max |c|`` is ``2**bits`` (49 at 25x25, 47 at 63x63)
   and rounded down to integers, then each row's minimum and each column's are subtracted
   (same optimal flow; the start sees each column's competition). The simplex runs on exact
   int64: duals, reduced costs and the optimality test (every reduced cost ``>= 0``) need no
   tolerance, and LLVM vectorises integer minimum reductions, which it does not do for float
   ones under numba. The float -> int64 conversion adds 1.5 * 2**52 and reads the bits back
   (AVX2 has no vector conversion to int64; ``bits`` stays at most 50 for it). Each cost is
   stored packed with its column in the low bits (``g << ib | j``) and the column duals
   shifted alike, so one minimum over a row gives its cheapest cell and the column (no second
   pass for the entering column), which is what bounds ``bits``. Rows are padded to a multiple
   of 16 columns with a cost no dual reaches: the scans then have no remainder loop (25 -> 32
   columns priced 1.4x faster than 25). Beside them, coarse costs: the same packed grid costs
   shifted right to 16 bits (at 25x25; :func:`coarse_bits`) in int32, which AVX2 scans twice as
   wide as int64 with a native minimum: the start and (up to 255x255) most of the pricing
   read those.
2. start (Vogel's rule over the rows, coarse costs): the open row whose two cheapest open
   columns differ most ships to its cheapest; each allocation closes one row or column and the
   closed node hangs under the other end of the cell, which builds the basis tree (``m + n -
   1`` cells, zero-flow cells kept where the problem is degenerate). On DeepEMD's 25x25
   problems it leaves 25.0 pivots against 34.6 for a static row order (EfficientNet cells;
   18.6 against 23.3 on random ReLU features). Each row keeps its two cheapest open columns;
   a closed column re-prices only the rows that watch it (a bitmask per column).
3. price: the cell with the most negative reduced cost enters (a vectorised integer minimum per
   row of the packed ``c_ij - beta_j``, less ``alpha_i``), over every cell up to 32x32
   (Dantzig) and over the first block of an eighth of the rows (taken cyclically) that holds
   a negative one above that; on the coarse costs while they show a negative one (which is
   then provably negative in the exact costs too), on the exact ones after that, so the last
   scan, the one that finds none, is exact.
4. pivot: the cycle is the tree path between the entering row and column, found by walking up
   from the row until a node whose descendant bitmask holds the column (the apex), the leaving
   cell's candidates compared on the way; the leaving cell is the smallest flow against the
   cycle, ties broken by Cunningham's rule (last blocking cell in cycle order from the apex) so
   degenerate pivots are deterministic. The cut subtree is re-hung by reversing the parents on
   one path, its bitmask moves between the two ancestor paths, and the duals of its nodes (its
   mask's set bits, 14 of 50 nodes on average) shift by the entering reduced cost.
5. repeat until no reduced cost is negative; write the flow, the distance from the real costs,
   the precision certificate (below) and the centred float duals.

The certificate: the flow ``x`` is optimal for the grid costs ``g <= c``, so for the optimal
``x*`` of the real costs ``c.x* >= g.x* >= g.x`` and the distance ``c.x`` is at most
``(c - g).x`` above the optimum, a sum over the basic cells. A problem whose certificate is
above :data:`PRECISION_RTOL` of ``|c|.x`` is marked :data:`IMPRECISE` (a few costs 1e15+ times
the ones the flow uses coarsen the grid: forbidden cells); :mod:`deepemd.emd.exact` re-solves it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.cpython.unsafe.numbers import leading_zeros, trailing_zeros
from numba.extending import overload

#: Larger than any packed reduced cost (see cost_bits).
INT_INF = 1 << 62
#: Packed grid cost of a padding column: above any real packed ``c_ij - beta_j`` (see
#: cost_bits), so a padding column never enters.
PAD_COST = 1 << 61
#: 1.5 * 2**52: an integer-valued float64 ``y`` with ``|y| < 2**51`` plus this has the bits of
#: ``MAGIC_BITS + y`` (a float64 -> int64 conversion in two vectorised passes).
MAGIC = 6755399441055744.0
MAGIC_BITS = 0x4338000000000000
#: ``pivots`` of a problem that hit the pivot cap (POT finishes it).
CAPPED = -1
#: ``pivots`` of a problem whose costs hold NaN or inf (the caller raises).
NON_FINITE = -2
#: ``pivots`` of a problem whose grid was too coarse for its costs (see the module docstring).
IMPRECISE = -3
#: A solution is accepted when its certified distance error is at most this fraction of
#: ``sum |c_ij| x_ij``: an eighth of float32's epsilon.
PRECISION_RTOL = 2.0**-26
#: The coarse int32 costs (see coarse_bits): the largest int32; added to the packed value of
#: the one column a second-minimum search skips; a padding column's packed cost (above every
#: real packed value, below 2**31 with the start's offsets added).
INT32_MAX = 2**31 - 1
EXCLUDED_32 = 1 << 29
PAD_COST_32 = 1 << 29
#: Bits of a float64 with the exponent all ones, i.e. inf or NaN.
EXPONENT_ALL_ONES = 0x7FF0000000000000
#: The same for float32.
EXPONENT_ALL_ONES_32 = 0x7F800000
#: Problems of at most this many cells price every cell per pivot (Dantzig's rule); larger
#: ones price blocks of rows. At 25x25 the full scan is the faster.
FULL_PRICING_CELLS = 32 * 32
#: Larger problems price an eighth of their rows per block (63 rows: blocks of 8).
PRICING_BLOCKS = 8
#: Rows of at least 8 columns are padded to a multiple of this many.
ROW_PAD = 16


@njit(cache=True)
def index_bits(n: int) -> int:
    """Bits that hold an index ``0..n-1`` in a packed value."""
    return max(1, 64 - leading_zeros(np.uint64(n - 1))) if n > 1 else 1  # type: ignore[call-arg]  # numba intrinsic


@njit(cache=True, inline="always")
def _lowest_bit(z: int) -> int:
    """Index of the lowest set bit of ``z != 0`` (one tzcnt)."""
    return trailing_zeros(z)  # type: ignore[call-arg]  # numba intrinsic


@njit(cache=True)
def cost_bits(m: int, n: int) -> int:
    """Bits of the grid costs: at most 50 (the float -> int conversion's limit), and few
    enough that ``c_ij - beta_j`` packed with a column index stays below ``2**61`` (duals are
    tree potentials, sums of up to ``m + n - 1`` costs below ``2**(bits+1)``, so ``|c - beta|
    < (m + n + 1) * 2**(bits+1)``): 49 bits at 25x25, 47 at 63x63."""
    ib = index_bits(padded_width(n))
    return min(50, 60 - ib - math.ceil(math.log2(m + n + 1)))


@njit(cache=True)
def coarse_bits(m: int, n: int) -> tuple:
    """``(qbits, priced)``: bits of the coarse int32 costs ``q = g >> (bits - qbits)``, and
    whether the pricing may read them. The pricing needs the bound of :func:`cost_bits` at
    2**28 instead of 2**61, so that a packed coarse ``q_ij - bq_j`` stays under the padding's
    :data:`PAD_COST_32` with room for the start's offsets below 2**31: 16 bits at 25x25, 14 at
    63x63, 10 at 150x130. Where that leaves under 10 bits (wide problems: 6 at 1000x1000, none
    at 3x20000) only the start reads coarse costs, with as many bits as its own packed values
    and keys allow (16 at 1000x1000, 11 at 3x20000; a 1-bit start took 12,340 pivots there
    against 5,816), and the pricing is exact throughout."""
    ib = index_bits(padded_width(n))
    proven = 27 - ib - math.ceil(math.log2(m + n + 1))
    if proven >= 10:
        return proven, True
    return max(1, min(26 - ib, 29 - index_bits(m))), False


@njit(cache=True)
def padded_width(n: int) -> int:
    """Row length of the grid costs: ``n`` rounded up to a multiple of :data:`ROW_PAD` (short
    rows stay as they are)."""
    return n if n < 8 else -(-n // ROW_PAD) * ROW_PAD


@njit(cache=True)
def pricing_block(m: int, n: int) -> int:
    """Rows priced per pivot: all of them up to :data:`FULL_PRICING_CELLS` cells, else an
    eighth of them (blocks of rows, cyclically; on 63x63 rerank problems 1.5x faster than
    Dantzig's full scan, ``benchmarks/rerank_speed.py --pricing``)."""
    return m if m * n <= FULL_PRICING_CELLS else -(-m // PRICING_BLOCKS)


def _abs_max(c, word):
    """``max |c|`` of a float32 or float64 matrix as a float64, or -1.0 when a value is NaN
    or inf (numba-only: the implementation is chosen by the dtype, below)."""
    raise NotImplementedError


@njit(cache=True)
def _max_magnitude_bits(raw, magnitude) -> int:
    """``max_k raw[k] & magnitude``: with the sign bit cleared, floats order like their bits
    read as integers, so this is ``max |c|`` as bits, a vectorised integer reduction (one flat
    loop: over two nested loops of 25 it ran 5x slower), and NaN and inf (exponent all ones)
    show up in it."""
    top = 0
    for k in range(raw.shape[0]):
        top = max(top, raw[k] & magnitude)
    return top


@overload(_abs_max)
def _abs_max_typed(c, word):
    """float32: the bits decoded exactly; float64: the bits read back through ``word``."""
    if c.dtype == types.float32:

        def abs_max_32(c, word):
            top = _max_magnitude_bits(c.reshape(c.size).view(np.int32), 0x7FFFFFFF)
            if top >= EXPONENT_ALL_ONES_32:
                return -1.0
            exponent, mantissa = top >> 23, top & 0x7FFFFF
            if exponent == 0:
                return math.ldexp(float(mantissa), -149)
            return math.ldexp(float(mantissa | 0x800000), exponent - 150)

        return abs_max_32

    def abs_max_64(c, word):
        top = _max_magnitude_bits(c.reshape(c.size).view(np.int64), 0x7FFFFFFFFFFFFFFF)
        if top >= EXPONENT_ALL_ONES:
            return -1.0
        word[0] = top
        return word.view(np.float64)[0]

    return abs_max_64


@njit(cache=True)
def _grid_costs(c, cf, ci, cq, qshift: int, bits: int, ib: int, word, offset) -> float:
    """The packed grid costs ``ci[i, j] = g_ij << ib | j`` (``ib = index_bits(width)``), where
    ``g = floor(c * 2**bits / max|c|)`` less each row's minimum and then each column's (kept in
    ``offset``: rows, then columns), and ``ci[:, n:] = PAD_COST``; ``cf`` is ``ci``'s float64
    view; the coarse costs ``cq[i, j] = (g_ij >> qshift) << ib | j`` in int32 beside them. Returns
    ``max |c|`` (an integer step costs ``max|c| * 2**-bits``), or -1.0 when a cost is NaN or
    inf. Packed, one minimum over a row gives the cheapest cell and its column: the start's
    scans and the pricing need no second pass for the index.

    ``c`` is float32 or float64 (read as it is: a float32 batch is never copied). Rounding down
    (not toward zero) makes every grid cost at most the real one whatever its sign, which is
    what the precision certificate rests on."""
    m, n = c.shape
    cmax = _abs_max(c, word)
    if cmax < 0.0:
        return -1.0
    scale = 2.0**bits / cmax if cmax > 0.0 else 0.0
    if scale < np.inf:
        for i in range(m):
            for j in range(n):
                cf[i, j] = np.floor(c[i, j] * scale) + MAGIC
    else:  # max |c| below ~1e-292: 2**bits / max|c| overflows, divide instead
        for i in range(m):
            for j in range(n):
                cf[i, j] = np.floor(c[i, j] / cmax * 2.0**bits) + MAGIC
    for i in range(m):
        low = INT_INF
        for j in range(n):
            v = ci[i, j] - MAGIC_BITS
            ci[i, j] = v
            low = min(low, v)
        offset[i] = low
    col = offset[m:]
    for j in range(n):
        col[j] = INT_INF
    for i in range(m):
        low = offset[i]
        for j in range(n):
            v = ci[i, j] - low
            ci[i, j] = v
            col[j] = min(col[j], v)
    for i in range(m):
        for j in range(n):
            v = ci[i, j] - col[j]
            ci[i, j] = (v << ib) + j
            cq[i, j] = np.int32(((v >> qshift) << ib) + j)
        for j in range(n, ci.shape[1]):
            ci[i, j] = PAD_COST
            cq[i, j] = PAD_COST_32
    return cmax


@njit(cache=True)
def _packed_min(cq, i: int, shift, ib: int, skip: int) -> int:
    """``min_j cq[i, j] + shift[j]`` over ``j != skip`` on the coarse costs: the cheapest open
    cell of row ``i`` and (in the low ``ib`` bits) its first column from one vectorised pass
    of eight int32 lanes (an argmin loop is not vectorised). ``shift`` is 0 for open columns,
    ``(4 << qbits) << ib`` for closed ones; the padding columns' costs are above both. The
    padded row has no remainder loop (1.6x faster than 25 columns)."""
    best = np.int32(INT32_MAX)
    for j in range(cq.shape[1]):  # np.int32: sums kept in int32 lanes (numba widens to int64)
        best = min(best, np.int32(cq[i, j] + shift[j] + (EXCLUDED_32 if j == skip else 0)))
    return int(best)


@njit(cache=True)
def _regret_start(cq, n: int, a, b, qbits: int, ib: int, start_ws, parent, tflow, closed) -> int:
    """Vogel's rule over the rows, on the coarse costs (a start needs a good basis, not exact
    costs; the tree's duals come from the exact ones): repeatedly, the open row whose two
    cheapest open columns differ most (its regret) ships to its cheapest; the cell's row or
    column closes (exactly one: the last open row or column never closes early, so the tree
    stays connected) and the closed node hangs under the other end. Returns the root, the one
    line left open; ``closed`` lists the other nodes in closing order (children before their
    parents).

    ``key[r] = regret << index_bits(m) | (m - 1 - r)`` (-1 once closed; int32, as
    :func:`coarse_bits` keeps it below 2**31): one integer maximum over eight lanes picks the
    row, lowest index on ties (3-4% faster than int64 keys). ``first``/``second`` hold each
    open row's two cheapest open columns, packed as by :func:`_packed_min`; ``watch[j]`` is the
    bitmask of rows whose first or second is ``j``, so a closed column re-prices only those
    rows (3.3 of 25)."""
    shift, ra, rb, key, first, second, watch = start_ws
    m = cq.shape[0]
    low = (1 << ib) - 1
    ibm = index_bits(m)
    lone = (2 << qbits) << ibm  # a row with one open column left goes first
    for j in range(n):
        rb[j] = b[j]
    for j in range(cq.shape[1]):
        shift[j] = 0
    watch[:, :] = 0
    key[:] = -1  # the padding after row m - 1 too
    for i in range(m):
        ra[i] = a[i]
        f = _packed_min(cq, i, shift, ib, -1)
        first[i] = f
        watch[f & low, i >> 6] |= 1 << (i & 63)
        if n > 1:
            s = _packed_min(cq, i, shift, ib, f & low)
            second[i] = s
            watch[s & low, i >> 6] |= 1 << (i & 63)
            key[i] = (((s >> ib) - (f >> ib)) << ibm) | (m - 1 - i)
        else:
            key[i] = lone | (m - 1 - i)
    count = 0
    open_rows, open_cols = m, n
    while open_rows + open_cols > 1:
        top = np.int32(-1)
        for r in range(key.shape[0]):
            top = max(top, key[r])
        i = m - 1 - (top & ((1 << ibm) - 1))
        j = first[i] & low
        if (ra[i] <= rb[j] and open_rows > 1) or open_cols == 1:
            parent[i] = m + j
            tflow[i] = max(ra[i], 0.0)  # rounding leaves the last cells +-1e-16
            rb[j] -= ra[i]
            closed[count] = i
            key[i] = -1
            open_rows -= 1
            keep = ~(1 << (i & 63))
            watch[j, i >> 6] &= keep
            if open_cols > 1:
                watch[second[i] & low, i >> 6] &= keep
        else:
            parent[m + j] = i
            tflow[m + j] = max(rb[j], 0.0)
            ra[i] -= rb[j]
            closed[count] = m + j
            shift[j] = (4 << qbits) << ib
            open_cols -= 1
            for w in range(watch.shape[1]):
                z = watch[j, w]
                while z != 0:
                    r = 64 * w + _lowest_bit(z)
                    z &= z - 1
                    if first[r] & low == j:
                        first[r] = second[r]
                    if open_cols > 1:
                        s = _packed_min(cq, r, shift, ib, first[r] & low)
                        second[r] = s
                        watch[s & low, w] |= 1 << (r & 63)
                        key[r] = (((s >> ib) - (first[r] >> ib)) << ibm) | (m - 1 - r)
                    else:
                        key[r] = lone | (m - 1 - r)
        count += 1
    root = -1
    for r in range(m):
        if key[r] >= 0:
            root = r
    for j in range(n):
        if shift[j] == 0 and root < 0:
            root = m + j
    parent[root] = -1
    return root


@njit(cache=True)
def _tree_masks_and_duals(cs, root: int, parent, closed, desc, pot, ib: int) -> None:
    """Descendant bitmasks accumulated child to parent along the closing order, and duals
    (``alpha_i + beta_j = g_ij``, the grid cost ``cs[i, j] >> ib``, on every tree cell, the
    root's 0) parent to child."""
    m = cs.shape[0]
    nodes = desc.shape[0]
    flat = desc.reshape(desc.size)  # one memset: per-node zeroing was a call per node
    for k in range(flat.shape[0]):
        flat[k] = 0
    for v in range(nodes):
        desc[v, v >> 6] = 1 << (v & 63)
    for t in range(nodes - 1):
        v = closed[t]
        for w in range(desc.shape[1]):
            desc[parent[v], w] |= desc[v, w]
    pot[root] = 0
    for t in range(nodes - 2, -1, -1):
        v = closed[t]
        p = parent[v]
        pot[v] = (cs[min(v, p), max(v, p) - m] >> ib) - pot[p]  # rows are the lower ids: no branch


def _row_min(cs, i, bs):
    """``min_j cs[i, j] - bs_j`` over the padded row (a vectorised integer reduction): with
    packed costs and shifted column duals, the least ``c_ij - beta_j`` of row ``i`` and, in the
    low bits, its first column (numba-only: the implementation is chosen by the dtype, below)."""
    raise NotImplementedError


@overload(_row_min)
def _row_min_typed(cs, i, bs):
    """int32 (the coarse costs): eight lanes and a native vector minimum, the sums kept in
    int32 by ``np.int32`` (numba widens int32 arithmetic to int64); int64: four lanes and a
    compare-and-blend (AVX2 has no 64-bit minimum). 25 rows of 32: 103 against 181 ns."""
    if cs.dtype == types.int32:

        def row_min_32(cs, i, bs):
            best = np.int32(INT32_MAX)
            for j in range(cs.shape[1]):
                best = min(best, np.int32(cs[i, j] - bs[j]))
            return best

        return row_min_32

    def row_min_64(cs, i, bs):
        best = INT_INF
        for j in range(cs.shape[1]):
            best = min(best, cs[i, j] - bs[j])
        return best

    return row_min_64


@njit(cache=True)
def _price(cs, alpha, bs, ib: int, start: int, block: int) -> tuple:
    """``(most negative reduced cost, its row, where the next pivot's pricing starts, its
    column)``; row -1 when none is negative (the basis is optimal). ``block >= m``: every row
    (Dantzig's rule). Else rows ``block`` at a time, cyclically from ``start``, stopping after
    the first block that holds a negative reduced cost: more pivots than Dantzig's rule, each
    pricing a fraction of the cells (63x63 rerank problems: 146 pivots instead of 111 in 0.61x
    the time)."""
    m = cs.shape[0]
    best = 0
    ei = -1
    packed = 0
    if block >= m:
        for i in range(m):
            p = _row_min(cs, i, bs)
            r = (p >> ib) - alpha[i]
            better = r < best  # selects, not a branch that mispredicts
            ei = i if better else ei
            packed = p if better else packed
            best = min(best, r)
        return best, ei, 0, packed & ((1 << ib) - 1)
    i = start
    in_block = 0
    for _ in range(m):
        p = _row_min(cs, i, bs)
        r = (p >> ib) - alpha[i]
        if r < best:
            best = r
            ei = i
            packed = p
        i = i + 1 if i + 1 < m else 0
        in_block += 1
        if in_block == block:
            if ei >= 0:
                break
            in_block = 0
    return best, ei, i, packed & ((1 << ib) - 1)


@njit(cache=True)
def _shift_duals(pot, shifted, ib: int) -> None:
    """``shifted = pot << ib``: the duals aligned with the packed exact costs."""
    for v in range(shifted.shape[0]):
        shifted[v] = pot[v] << ib


@njit(cache=True, inline="always")
def _coarse_dual(pot, u: int, m: int, qshift: int, ib: int) -> int:
    """Node ``u``'s coarse dual ``pot[u] >> qshift``, a column's shifted left by ``ib`` (the
    packed coarse costs' alignment); the padding columns' ``pot`` is 0, so theirs is too."""
    return (pot[u] >> qshift) << (ib if u >= m else 0)


@njit(cache=True)
def _simplex(
    cs,
    cq,
    qpot,
    qshift: int,
    coarse: bool,
    pot,
    shifted,
    ib: int,
    parent,
    tflow,
    desc,
    path,
    moved,
    max_pivots: int,
    block: int,
) -> int:
    """Pivot from the start's basis to an optimal one; returns the pivot count, or
    :data:`CAPPED` at ``max_pivots``. Node ids: rows ``0..m-1``, columns ``m..m+n-1``;
    ``tflow[v]`` is the flow on the cell joining ``v`` to ``parent[v]``; ``pot`` holds the
    duals (``alpha = pot[:m]``, ``beta = pot[m:]``, 0 on the padding columns), always current.

    With ``coarse`` (see :func:`coarse_bits`), pricing runs on the coarse costs first (int32:
    twice the lanes of int64), against the coarse duals ``qpot`` (``pot >> qshift``, the
    columns' shifted left by ``ib``, kept current alongside ``pot`` in that phase). With ``q =
    floor(g / 2**qshift)`` and the duals floored alike, ``2**qshift`` times a coarse reduced
    cost lies in ``(r - 2**qshift, r + 2**(qshift+1))`` for the exact ``r``, so a coarse one
    ``<= -1`` is an exact negative one, and the entering cell's exact ``r`` (the duals shift
    by it) is negative. Once the coarse costs see none, pricing turns exact (int64, packed
    costs against ``shifted``, the duals shifted left by ``ib``) for the rest of the problem:
    that last scan is what proves the basis optimal. On EfficientNet 25x25 cells 24.9 of 25.0
    pivots run coarse."""
    m = cs.shape[0]
    alpha = pot[:m]
    bs = shifted[m:]
    words = desc.shape[1]
    top = path.shape[0] - 1
    qalpha = qpot[:m]
    qbs = qpot[m:]
    start = 0
    if coarse:
        for v in range(qpot.shape[0]):
            qpot[v] = _coarse_dual(pot, v, m, qshift, ib)
    else:
        _shift_duals(pot, shifted, ib)
    for pivot in range(max_pivots):
        if coarse:
            best, ei, start, pj = _price(cq, qalpha, qbs, ib, start, block)
            if ei >= 0:
                best = (cs[ei, pj] >> ib) - pot[ei] - pot[m + pj]
            else:
                coarse = False
                _shift_duals(pot, shifted, ib)
        if not coarse:
            best, ei, start, pj = _price(cs, alpha, bs, ib, start, block)
            if ei < 0:
                return pivot
        col = m + pj
        cw, cb = col >> 6, col & 63
        # Row side: from the entering row up to the apex (the first node holding col), two
        # edges a step; theta is the least flow on an even edge (those carry flow against the
        # cycle), the first one found on this side.
        lr = 0
        v = ei
        theta = np.inf
        row_cut = -1
        while not (desc[v, cw] >> cb) & 1:
            path[lr] = v
            f = tflow[v]
            row_cut = lr if f < theta else row_cut
            theta = min(theta, f)
            v = parent[v]
            lr += 1
            if (desc[v, cw] >> cb) & 1:
                break
            path[lr] = v
            v = parent[v]
            lr += 1
        apex = v
        # Column side, stored from the end of path backwards (path[top - t]); its even edges
        # win ties (Cunningham: the last blocking edge of the cycle counted from the apex).
        lc = 0
        v = col
        col_cut = -1
        while v != apex:
            path[top - lc] = v
            f = tflow[v]
            col_cut = lc if f <= theta else col_cut
            theta = min(theta, f)
            v = parent[v]
            lc += 1
            if v == apex:
                break
            path[top - lc] = v
            v = parent[v]
            lc += 1
        # The leaving side L (holding the leaving cell, whose lower node is L(cut)) and the
        # other side N as (base, step) into path; e is L's end of the entering cell.
        if col_cut >= 0:
            cut, lb, ld, ll, nb, nd, nl, e, npar, d = col_cut, top, -1, lc, 0, 1, lr, col, ei, -best
        else:
            cut, lb, ld, ll, nb, nd, nl, e, npar, d = row_cut, 0, 1, lr, top, -1, lc, ei, col, best
        for w in range(words):
            moved[w] = desc[path[lb + ld * cut], w]
        for t in range(ll):  # flows; the old ancestors below the apex lose the subtree
            u = path[lb + ld * t]
            tflow[u] += -theta if t % 2 == 0 else theta
            if t > cut:
                for w in range(words):
                    desc[u, w] &= ~moved[w]
        for t in range(nl):  # flows; the new ancestors gain it
            u = path[nb + nd * t]
            tflow[u] += -theta if t % 2 == 0 else theta
            for w in range(words):
                desc[u, w] |= moved[w]
        # Re-hang: parents, edge flows and masks reverse along L(0..cut); each node keeps its
        # old descendants but the branch it now hangs from, plus its new child's.
        for t in range(cut, 0, -1):
            u = path[lb + ld * t]
            below = path[lb + ld * (t - 1)]
            for w in range(words):
                desc[u, w] &= ~desc[below, w]
            if t < cut:
                above = path[lb + ld * (t + 1)]
                for w in range(words):
                    desc[u, w] |= desc[above, w]
            parent[u] = below
            tflow[u] = tflow[below]
        for w in range(words):
            desc[e, w] = moved[w]
        parent[e] = npar
        tflow[e] = theta
        # The entering cell's reduced cost becomes 0: the subtree's rows += d, columns -= d.
        for w in range(words):
            z = moved[w]
            while z != 0:
                u = 64 * w + _lowest_bit(z)
                sd = d if u < m else -d
                pot[u] += sd
                if coarse:
                    qpot[u] = _coarse_dual(pot, u, m, qshift, ib)
                else:
                    shifted[u] += sd << ib
                z &= z - 1
    return CAPPED


@njit(cache=True)
def _write_solution(c, cs, root: int, parent, tflow, offset, bits: int, ib: int, cmax: float, x) -> tuple:
    """The flow into ``x``; returns ``(distance from the real costs, certified error
    (c - g).x, |c|.x)``."""
    m, n = c.shape
    for i in range(m):  # here rather than np.zeros: a 5 MB memset is a pass of its own
        for j in range(n):
            x[i, j] = 0.0
    distance = 0.0
    error = 0.0
    size = 0.0
    for v in range(m + n):
        if v != root:
            p = parent[v]
            i, j = min(v, p), max(v, p) - m
            f = tflow[v]
            x[i, j] = f
            distance += f * c[i, j]
            grid = np.float64((cs[i, j] >> ib) + offset[i] + offset[m + j]) * 2.0**-bits * cmax  # no underflow
            error += f * (c[i, j] - grid)
            size += f * abs(c[i, j])
    return distance, error, size


@njit(cache=True)
def centred_duals(alpha, beta, step: float, cmax: float, a, b, alpha_out, beta_out) -> None:
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
    """``out = duals[:len(out)] * step * cmax``; returns ``(mass . out, sum(mass))``."""
    dot = 0.0
    total = 0.0
    for i in range(out.shape[0]):
        out[i] = duals[i] * step * cmax
        dot += mass[i] * out[i]
        total += mass[i]
    return dot, total


@njit(cache=True)
def _solve_one(
    c, a, b, x, alpha_out, beta_out, ws, bits: int, coarse: tuple, ib: int, max_pivots: int, block: int
) -> tuple:
    """Solve one problem in place (``coarse``: :func:`coarse_bits`): flow into ``x``, centred
    duals; returns ``(distance, pivot count, certified error)``, the count :data:`CAPPED` on
    the pivot cap, :data:`NON_FINITE` (distance NaN) for NaN or inf costs and
    :data:`IMPRECISE` when the certified error exceeds :data:`PRECISION_RTOL` of
    ``sum |c_ij| x_ij``."""
    cf, cs, pot, parent, tflow, closed, desc, path, moved, word, offset, start_ws, shifted, cq, qpot = ws
    m, n = c.shape
    qbits, priced = coarse
    qshift = bits - qbits
    cmax = _grid_costs(c, cf, cs, cq, qshift, bits, ib, word, offset)
    if cmax < 0.0:
        return np.nan, NON_FINITE, np.nan
    root = _regret_start(cq, n, a, b, qbits, ib, start_ws, parent, tflow, closed)
    _tree_masks_and_duals(cs, root, parent, closed, desc, pot, ib)
    pot[m + n :] = 0  # the padding columns': their packed costs are above every real one
    pivots = _simplex(
        cs, cq, qpot, qshift, priced, pot, shifted, ib, parent, tflow, desc, path, moved, max_pivots, block
    )
    distance, error, size = _write_solution(c, cs, root, parent, tflow, offset, bits, ib, cmax, x)
    if pivots != CAPPED and error > PRECISION_RTOL * size:
        pivots = IMPRECISE
    for v in range(m + n):  # duals of the real costs
        pot[v] += offset[v]
    centred_duals(pot[:m], pot[m:], 2.0**-bits, cmax, a, b, alpha_out, beta_out)
    return distance, pivots, error


@njit(cache=True, nogil=True)
def solve_range(c, a, b, x, alpha, beta, distance, pivots, error, max_pivots, block, start, stop):
    """Problems ``start..stop-1`` of the batch ``c (B, m, n)``, ``a (B, m)``, ``b (B, n)``
    (balanced masses) with one workspace, allocated once and reused per problem, pricing
    ``block`` rows per pivot; writes flow ``x``, centred duals, distance, pivot count and
    certified error. ``nogil``: threads run it concurrently on disjoint ranges."""
    m, n = c.shape[1], c.shape[2]
    nodes = m + n
    width = padded_width(n)
    words = (nodes + 63) // 64
    cf = np.empty((m, width), np.float64)
    start_ws = (
        np.empty(width, np.int32),  # shift: 0 for an open column, (4 << qbits) << ib for a closed one
        np.empty(m, np.float64),  # ra: supply left per row
        np.empty(n, np.float64),  # rb: demand left per column
        np.empty(-(-m // 8) * 8, np.int32),  # key: padded for the vectorised maximum
        np.empty(m, np.int64),  # first
        np.empty(m, np.int64),  # second
        np.empty((n, (m + 63) // 64), np.int64),  # watch
    )
    ws = (
        cf,
        cf.view(np.int64),  # cs: the packed grid costs, in place of their float conversion
        np.empty(m + width, np.int64),  # pot
        np.empty(nodes, np.int64),  # parent
        np.empty(nodes, np.float64),  # tflow
        np.empty(nodes, np.int64),  # closed
        np.empty((nodes, words), np.int64),  # desc
        np.empty(nodes + 2, np.int64),  # path: the row side from 0 up, the column side from the end down
        np.empty(words, np.int64),  # moved
        np.empty(1, np.int64),  # word
        np.empty(nodes, np.int64),  # offset
        start_ws,
        np.empty(m + width, np.int64),  # shifted: the duals << ib, for the exact pricing
        np.empty((m, width), np.int32),  # cq: the packed coarse costs
        np.empty(m + width, np.int32),  # qpot: the coarse duals
    )
    bits = cost_bits(m, n)
    ib = index_bits(width)  # bits of a column index in a packed cost
    coarse = coarse_bits(m, n)
    for k in range(start, stop):
        distance[k], pivots[k], error[k] = _solve_one(
            c[k], a[k], b[k], x[k], alpha[k], beta[k], ws, bits, coarse, ib, max_pivots, block
        )
