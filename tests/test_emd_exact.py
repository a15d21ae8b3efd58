"""The exact solver against independent oracles: scipy's HiGHS LP solver and POT."""

import numpy as np
import ot
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import linprog

from deepemd.emd import cost_matrix, cross_reference_weights, solve
from deepemd.emd.exact import solve_batch
from deepemd.emd.layer import exact_numpy
from deepemd.errors import DeepEMDError


def highs_emd(cost: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """The transport LP written out for HiGHS (row sums = a, column sums = b, x >= 0)."""
    m, n = cost.shape
    rows = sp.kron(sp.eye(m), np.ones((1, n)))
    cols = sp.kron(np.ones((1, m)), sp.eye(n))
    res = linprog(
        cost.ravel(),
        A_eq=sp.vstack([rows, cols]).tocsr(),
        b_eq=np.concatenate([a, b]),
        bounds=(0, None),
        method="highs",
    )
    assert res.status == 0, res.message
    return res.fun


def random_problem(rng: np.random.Generator):
    m, n = rng.integers(1, 65, size=2)
    if rng.random() < 0.2:  # keep some square problems, including the degenerate uniform ones
        n = m
    cost = rng.random((m, n)) * rng.choice([1.0, 2.0, 10.0])
    kind = rng.integers(0, 3)
    if kind == 0:  # uniform weights: degenerate when m == n
        a, b = np.ones(m), np.ones(n)
    else:
        a, b = rng.random(m), rng.random(n)
        if kind == 2:  # sparse: about 30% zeros, but never an empty side
            a[rng.random(m) < 0.3] = 0.0
            b[rng.random(n) < 0.3] = 0.0
            a[rng.integers(m)] += 0.5
            b[rng.integers(n)] += 0.5
    b = b * a.sum() / b.sum()
    return cost, a, b


def test_exact_matches_highs_and_pot_on_500_random_problems():
    rng = np.random.default_rng(1234)
    problems = [random_problem(rng) for _ in range(500)]
    fallbacks = 0
    for cost, a, b in problems:
        sol = solve_batch(cost[None], a[None], b[None])
        fallbacks += int((sol.pivots < 0).sum())
        dist, flow, alpha, beta = exact_numpy(cost[None], a[None], b[None])
        dist, flow, alpha, beta = dist[0], flow[0], alpha[0], beta[0]
        ref = highs_emd(cost, a, b)
        scale = max(abs(ref), 1e-12)
        assert abs(dist - ref) <= 1e-6 * scale
        assert abs(dist - ot.emd2(a, b, cost, numItermax=10**7)) <= 1e-6 * scale
        mass = a.sum()
        assert flow.min() >= 0.0
        assert np.abs(flow.sum(1) - a).max() <= 1e-6 * mass
        assert np.abs(flow.sum(0) - b).max() <= 1e-6 * mass
        reduced = cost - alpha[:, None] - beta[None, :]
        tol = 1e-9 * max(1.0, np.abs(cost).max())
        assert reduced.min() >= -tol  # dual feasible
        assert np.abs(reduced[flow > 1e-12 * mass]).max(initial=0) <= tol  # compl. slackness
        assert abs(a @ alpha + b @ beta - dist) <= 1e-6 * scale  # strong duality
        assert abs(a @ alpha - b @ beta) <= 1e-6 * scale  # centred gauge
    assert fallbacks == 0  # the simplex itself solved every problem (no POT fallback)


def test_batched_call_equals_problem_by_problem():
    rng = np.random.default_rng(7)
    cost = rng.random((40, 9, 13))
    a = rng.random((40, 9))
    b = rng.random((40, 13))
    b *= (a.sum(1) / b.sum(1))[:, None]
    batched = exact_numpy(cost, a, b)
    for k in range(40):
        single = exact_numpy(cost[k : k + 1], a[k : k + 1], b[k : k + 1])
        for got, want in zip(batched, single):
            np.testing.assert_array_equal(got[k], want[0])


@pytest.mark.parametrize("threads", [2, 3])
def test_threaded_batch_equals_one_thread(threads):
    """The thread pool splits the batch into ranges; every problem's answer is the same."""
    rng = np.random.default_rng(8)
    cost = rng.random((100, 12, 10))
    a = rng.random((100, 12))
    b = rng.random((100, 10))
    b *= (a.sum(1) / b.sum(1))[:, None]
    one = solve_batch(cost, a, b, threads=1)
    many = solve_batch(cost, a, b, threads=threads)
    for got, want in zip(many, one):
        np.testing.assert_array_equal(got, want)


def features(batch, m, n, d=16, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, m, d, generator=gen, dtype=dtype)
    v = torch.randn(batch, n, d, generator=gen, dtype=dtype)
    return u, v


@pytest.mark.parametrize("m,n", [(4, 4), (5, 7)])
def test_reference_solvers_agree_with_exact(m, n):
    u, v = features(3, m, n, seed=m * n)
    cost = cost_matrix(u, v)
    wu, wv = cross_reference_weights(u, v)
    exact, flow = solve(cost, wu, wv)
    with torch.no_grad():
        opencv, cv_flow = solve(cost, wu, wv, solver="opencv")
    qpth, _ = solve(cost, wu, wv, solver="qpth")
    sinkhorn, sk_flow = solve(cost, wu, wv, solver="sinkhorn", eps=1e-3, n_iter=5000, tol=1e-9)
    torch.testing.assert_close(opencv, exact, rtol=1e-5, atol=1e-5)  # float32 inside
    torch.testing.assert_close(qpth, exact, rtol=1e-4, atol=1e-5)  # L2 term 1e-6
    torch.testing.assert_close(sinkhorn, exact, rtol=1e-2, atol=1e-2)  # entropic bias ~ eps
    assert torch.allclose(cv_flow.sum(-1), wu, atol=1e-4)
    assert torch.allclose(sk_flow.sum(-1), wu, atol=1e-3)  # slow to converge at small eps


def test_sinkhorn_tends_to_exact_as_eps_shrinks():
    u, v = features(4, 6, 6, seed=3)
    cost = cost_matrix(u, v)
    wu, wv = cross_reference_weights(u, v)
    exact, _ = solve(cost, wu, wv)
    errors = [
        float((solve(cost, wu, wv, solver="sinkhorn", eps=eps, n_iter=20000, tol=1e-10)[0] - exact).abs().max())
        for eps in (1e-1, 1e-2, 1e-3)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2


def test_integer_costs_keep_differences_far_below_float32_precision():
    """The kernel scales costs to 50-bit integers (49 at 25x25): a choice that hinges on a 1e-11
    relative difference, next to a cost 1,000x larger, must still come out right (and exactly
    so)."""
    eps = 1e-11
    cost = np.array([[1.0, 1.0 + eps, 1e3], [1.0 + eps, 1.0, 1e3], [1e3, 1e3, 0.0]])
    for flip in (False, True):
        c = cost[:, [1, 0, 2]] if flip else cost
        sol = solve_batch(c[None], np.ones((1, 3)), np.ones((1, 3)))
        diagonal = np.eye(3)[:, [1, 0, 2]] if flip else np.eye(3)
        np.testing.assert_array_equal(sol.flow[0], diagonal)
        assert sol.distance[0] == 2.0


def test_non_finite_costs_are_reported_by_the_kernel():
    cost = np.random.default_rng(0).random((3, 4, 4))
    cost[1, 2, 3] = np.nan
    with pytest.raises(DeepEMDError, match=r"cost contains NaN or inf values \(problem 1 of 3\)"):
        solve_batch(cost, np.ones((3, 4)), np.ones((3, 4)))


def test_problems_that_hit_the_pivot_cap_are_finished_by_pot(monkeypatch):
    """The cycling guard's path: with a cap of zero pivots every problem goes to POT's network
    simplex, and distance, flow and centred duals agree with the simplex's own answer."""
    from deepemd.emd import exact

    rng = np.random.default_rng(11)
    cost, a, b = rng.random((5, 6, 8)), rng.random((5, 6)), rng.random((5, 8))
    b *= (a.sum(1) / b.sum(1))[:, None]
    ours = solve_batch(cost, a, b)
    monkeypatch.setattr(exact, "MAX_PIVOTS_PER_CELL", 0)
    monkeypatch.setattr(exact, "MIN_PIVOT_CAP", 0)
    capped = solve_batch(cost, a, b)
    assert (capped.pivots == exact.CAPPED).all() and (ours.pivots >= 0).all()
    np.testing.assert_allclose(capped.distance, ours.distance, rtol=1e-12)
    np.testing.assert_allclose(capped.flow, ours.flow, atol=1e-12)
    np.testing.assert_allclose(capped.alpha, ours.alpha, atol=1e-9)
    np.testing.assert_allclose(capped.beta, ours.beta, atol=1e-9)


def highs_restricted(cost: np.ndarray, a: np.ndarray, b: np.ndarray, allowed: np.ndarray):
    """The transport LP over the allowed cells only (the others bounded to 0), or None when
    the marginals cannot be met without a forbidden cell."""
    m, n = cost.shape
    rows = sp.kron(sp.eye(m), np.ones((1, n)))
    cols = sp.kron(np.ones((1, m)), sp.eye(n))
    res = linprog(
        np.where(allowed, cost, 0.0).ravel(),
        A_eq=sp.vstack([rows, cols]).tocsr(),
        b_eq=np.concatenate([a, b]),
        method="highs",
        bounds=[(0, None) if ok else (0, 0) for ok in allowed.ravel()],
    )
    return res.fun if res.status == 0 else None


@pytest.mark.parametrize("forbidden", [1e15, 1e300])
def test_forbidden_cells_far_beyond_the_integer_grid_give_the_right_distance(forbidden):
    """Costs in [0, 1] with ~20% of the cells at 1e15 or 1e300 (the usual way to forbid a
    match): the grid scaled to the huge costs cannot see the small ones, so the certificate
    sends the problem to the capped re-solve. The oracle is HiGHS on the allowed cells alone
    (POT's float potentials are no oracle here: they lose the small costs)."""
    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(30):
        m, n = rng.integers(2, 30, size=2)
        cost, a, b = rng.random((m, n)), rng.random(m) + 0.1, rng.random(n) + 0.1
        b *= a.sum() / b.sum()
        allowed = rng.random((m, n)) > 0.2
        ref = highs_restricted(cost, a, b, allowed)
        if ref is None:
            continue
        sol = solve_batch(np.where(allowed, cost, forbidden)[None], a[None], b[None])
        assert abs(sol.distance[0] - ref) <= 1e-9 * ref
        assert sol.pivots[0] >= 0  # the capped integer re-solve, not POT
        assert sol.flow[0][~allowed].max(initial=0.0) == 0.0
        np.testing.assert_allclose(sol.flow[0].sum(1), a, rtol=1e-9)
        checked += 1
    assert checked >= 25


def test_forced_forbidden_flow_is_priced_at_full_precision():
    """When a forbidden cell must carry flow the huge cost dominates and the grid is fine."""
    cost = np.array([[1e15, 0.5], [1e15, 0.25]])
    sol = solve_batch(cost[None], np.array([[1.0, 1.0]]), np.array([[1.5, 0.5]]))
    ref = highs_emd(cost, np.array([1.0, 1.0]), np.array([1.5, 0.5]))
    assert abs(sol.distance[0] - ref) <= 1e-12 * ref and sol.pivots[0] >= 0


def test_float32_costs_are_solved_as_they_are():
    """The kernel reads float32 costs directly (no float64 copy of the batch): the same
    answer as for those values in float64, and the flow comes back in float32."""
    rng = np.random.default_rng(12)
    cost = rng.random((30, 7, 9)).astype(np.float32)
    a, b = rng.random((30, 7)), rng.random((30, 9))
    b *= (a.sum(1) / b.sum(1))[:, None]
    got, want = solve_batch(cost, a, b), solve_batch(cost.astype(np.float64), a, b)
    assert got.flow.dtype == np.float32 and want.flow.dtype == np.float64
    np.testing.assert_array_equal(got.distance, want.distance)
    np.testing.assert_array_equal(got.pivots, want.pivots)
    np.testing.assert_array_equal(got.flow, want.flow.astype(np.float32))
    bad = cost.copy()
    bad[4, 1, 2] = np.inf
    with pytest.raises(DeepEMDError, match=r"problem 4 of 30"):
        solve_batch(bad, a, b)


def test_solver_threads_are_torch_pool_and_errors_reach_the_caller():
    """With an OpenMP torch the solve runs on torch's own pool (no second pool to spin against
    it); an exception in any thread is raised on the calling one."""
    from deepemd.emd import threads

    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert threads.uses_torch_pool()
    seen = []

    def work():
        seen.append(1)
        raise ValueError("from a pool thread")

    with pytest.raises(ValueError, match="from a pool thread"):
        threads.run_on_threads(work, 2)
    assert len(seen) == 2


@pytest.mark.parametrize("uniform", [False, True])
def test_block_pricing_reaches_dantzigs_optimum_on_63x63_feature_problems(uniform):
    """Above 32x32 the kernel prices blocks of rows (an eighth per pivot); its optimum is
    Dantzig's (every cell priced) and HiGHS's, degenerate uniform-weight problems included."""
    from deepemd.emd.exact import pricing_block

    m = 63
    assert pricing_block(m, m) == 8 and pricing_block(25, 25) == 25
    u, v = (torch.relu(x) for x in features(12, m, m, d=64, seed=3))
    cost = cost_matrix(u, v).numpy()
    a, b = (np.ones((12, m)), np.ones((12, m))) if uniform else (w.numpy() for w in cross_reference_weights(u, v))
    blocked, dantzig = solve_batch(cost, a, b), solve_batch(cost, a, b, block=m)
    assert (blocked.pivots > 0).all() and (dantzig.pivots > 0).all()  # none capped, none left to POT
    assert not np.array_equal(blocked.pivots, dantzig.pivots)  # the two rules really differ
    np.testing.assert_allclose(blocked.distance, dantzig.distance, rtol=1e-12, atol=1e-12)
    for k in range(0, 12, 4):
        assert blocked.distance[k] == pytest.approx(highs_emd(cost[k], a[k], b[k] * a[k].sum() / b[k].sum()), rel=1e-9)


@pytest.mark.parametrize("m,n", [(4, 3000), (60, 1500)])
def test_wide_problems_price_exactly_beyond_the_coarse_int32_bound(m, n):
    """Where the bound that keeps the coarse pricing's sums inside int32 leaves under 10 bits
    (here 3 and 5), only the start reads coarse costs (14 and 15 bits, its own bound) and the
    pricing the exact ones; the optimum is HiGHS's and POT's."""
    from deepemd.emd.simplex import coarse_bits, index_bits, padded_width

    proven = 27 - index_bits(padded_width(n)) - int(np.ceil(np.log2(m + n + 1)))
    assert proven < 10 and coarse_bits(m, n) == (26 - index_bits(padded_width(n)), False)
    assert coarse_bits(25, 25) == (16, True) and coarse_bits(63, 63) == (14, True)
    rng = np.random.default_rng(7)
    cost = rng.random((m, n)) * 3.0
    a, b = rng.random(m) + 0.01, rng.random(n) + 0.01
    b = b * a.sum() / b.sum()
    sol = solve_batch(cost[None], a[None], b[None])
    assert sol.pivots[0] >= 0  # the kernel finished it (no POT fallback)
    assert sol.distance[0] == pytest.approx(highs_emd(cost, a, b), rel=1e-9)
    assert sol.distance[0] == pytest.approx(ot.emd2(a, b, cost, numItermax=10**8), rel=1e-9)
