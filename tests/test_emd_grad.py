"""Gradients of the exact layer: finite differences, qpth's KKT gradients, subgradients."""

import pytest
import torch

from deepemd.emd import cost_matrix, cross_reference_weights, similarity, solve, uniform_weights


def features(batch, m, n, d=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, m, d, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, n, d, generator=gen, dtype=torch.float64)
    return u.requires_grad_(True), v.requires_grad_(True)


@pytest.mark.parametrize(
    "m,n,weights,center", [(4, 4, "cross", False), (5, 3, "cross", True), (3, 6, "uniform", False)]
)
def test_similarity_gradient_matches_finite_differences(m, n, weights, center):
    # Gaussian features give non-degenerate LPs with probability 1, where the layer is smooth.
    u, v = features(3, m, n, seed=m + 10 * n)
    assert torch.autograd.gradcheck(
        lambda u, v: similarity(u, v, weights=weights, center=center, temperature=12.5),
        (u, v),
        eps=1e-6,
        atol=1e-5,
        rtol=1e-4,
    )


def test_solve_gradient_reaches_cost_and_both_weight_vectors():
    u, v = features(2, 4, 5, seed=3)
    cost = cost_matrix(u, v).detach().requires_grad_(True)
    wu, wv = (w.detach().requires_grad_(True) for w in cross_reference_weights(u, v))
    # Unbalanced directions included: solve() rescales both sides to the mean total first.
    assert torch.autograd.gradcheck(lambda c, a, b: solve(c, a, b)[0], (cost, wu, wv), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("m,n", [(3, 3), (4, 5)])
def test_gradients_match_qpth(m, n):
    """qpth differentiates the KKT system of the L2-regularised QP (paper Sec. 4.3); with the
    authors' tiny L2 term its gradients must agree with our LP-sensitivity gradients."""
    u, v = features(1, m, n, seed=m * n)
    grads = {}
    for solver in ("exact", "qpth"):
        uu, vv = u.detach().requires_grad_(True), v.detach().requires_grad_(True)
        similarity(uu, vv, solver=solver).sum().backward()
        grads[solver] = (uu.grad, vv.grad)
    for ours, theirs in zip(grads["exact"], grads["qpth"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4)


def _degenerate_problem(seed):
    """Uniform weights and m == n (an assignment problem: fully degenerate), with duplicated
    nodes so that several optimal flows and many optimal duals exist."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(1, 5, 6, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 5, 6, generator=gen, dtype=torch.float64)
    u[0, 1] = u[0, 0]
    v[0, 3] = v[0, 2]
    cost = cost_matrix(u, v)
    wu, wv = uniform_weights(u, v)
    return cost, wu, wv


@pytest.mark.parametrize("seed", range(3))
def test_gradient_is_a_valid_subgradient_on_degenerate_problems(seed):
    cost, wu, wv = _degenerate_problem(seed)
    cost.requires_grad_(True)
    wu.requires_grad_(True)
    wv.requires_grad_(True)
    dist, _ = solve(cost, wu, wv)
    g_cost, g_wu, g_wv = torch.autograd.grad(dist.sum(), (cost, wu, wv))
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for _ in range(50):
            # D is concave in the cost (a minimum of linear functions): the flow is a
            # supergradient, D(c + d) <= D(c) + <flow, d> for every direction d.
            d = 0.1 * torch.randn(cost.shape, generator=gen, dtype=torch.float64)
            assert solve(cost + d, wu, wv)[0] <= dist + (g_cost * d).sum() + 1e-9
            # D is convex in the masses (LP value as a function of its right-hand side): the
            # duals are a subgradient for mass moves that keep both totals fixed.
            da = 0.1 * torch.randn(wu.shape, generator=gen, dtype=torch.float64)
            db = 0.1 * torch.randn(wv.shape, generator=gen, dtype=torch.float64)
            da, db = da - da.mean(), db - db.mean()
            assert solve(cost, wu + da, wv + db)[0] >= dist + (g_wu * da).sum() + (g_wv * db).sum() - 1e-9


def test_gradient_is_deterministic_on_degenerate_problems():
    cost, wu, wv = _degenerate_problem(0)
    grads = []
    for _ in range(2):
        c, a, b = (t.detach().requires_grad_(True) for t in (cost, wu, wv))
        grads.append(torch.autograd.grad(solve(c, a, b)[0].sum(), (c, a, b)))
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)
