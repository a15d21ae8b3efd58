"""Property-based tests of the EMD head (hypothesis): random shapes (1..40 a side, m != n),
weights with zeros, cost scales 1e-300..1e300, ties and constant costs, NaN and inf.

Properties: never a crash and never NaN out of finite input; non-finite input is one
DeepEMDError; the distance equals POT's ot.emd2 (on the costs divided by their scale, then
scaled back: the EMD is linear in the costs, and POT's tolerances are absolute); the flow meets
both marginals. Derandomised, so CI runs the same examples every time.
"""

import numpy as np
import ot
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepemd.emd import pairwise_similarity, similarity, solve
from deepemd.emd.exact import solve_batch
from deepemd.errors import DeepEMDError

PROPERTY = settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
COST_KINDS = ("uniform", "ties", "constant", "sparse-large", "integers")


def make_cost(rng: np.random.Generator, kind: str, m: int, n: int) -> np.ndarray:
    """Costs in [0, 1] (before scaling) of one of the degenerate kinds."""
    if kind == "uniform":
        return rng.random((m, n))
    if kind == "ties":  # few distinct values: many optimal flows
        return rng.choice([0.0, 0.25, 0.5, 1.0], size=(m, n))
    if kind == "constant":  # every flow is optimal
        return np.full((m, n), rng.random())
    if kind == "integers":
        return rng.integers(0, 4, size=(m, n)) / 3.0
    cost = rng.random((m, n)) * 1e-3  # a few cells 1,000x the rest
    cost[rng.random((m, n)) < 0.1] = 1.0
    return cost


def make_weights(rng: np.random.Generator, size: int, zeros: float, uniform: bool) -> np.ndarray:
    w = np.ones(size) if uniform else rng.random(size) + 1e-3
    w[rng.random(size) < zeros] = 0.0
    w[rng.integers(size)] = max(w.max(), 0.5)  # never an empty side
    return w


problems = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**32 - 1),
        "m": st.integers(1, 40),
        "n": st.integers(1, 40),
        "exponent": st.integers(-300, 300),
        "kind": st.sampled_from(COST_KINDS),
        "zeros": st.sampled_from([0.0, 0.3, 0.8]),
        "uniform": st.booleans(),
    }
)


def draw(p: dict):
    rng = np.random.default_rng(p["seed"])
    m, n = p["m"], p["n"]
    cost = make_cost(rng, p["kind"], m, n)
    a = make_weights(rng, m, p["zeros"], p["uniform"])
    b = make_weights(rng, n, p["zeros"], p["uniform"])
    b *= a.sum() / b.sum()
    return cost, a, b, 10.0 ** p["exponent"]


@PROPERTY
@given(problems)
def test_exact_equals_pot_at_every_scale_shape_and_degeneracy(p):
    cost, a, b, scale = draw(p)
    ref = ot.emd2(a, b, cost, numItermax=10**7) * scale
    sol = solve_batch((cost * scale)[None], a[None], b[None])
    dist, flow = sol.distance[0], sol.flow[0]
    assert np.isfinite(dist) and np.isfinite(flow).all()
    assert np.isfinite(sol.alpha).all() and np.isfinite(sol.beta).all()
    mass = a.sum()
    assert abs(dist - ref) <= 1e-9 * scale * mass  # costs are at most `scale`
    assert flow.min() >= 0.0
    np.testing.assert_allclose(flow.sum(1), a, rtol=0, atol=1e-9 * mass)
    np.testing.assert_allclose(flow.sum(0), b, rtol=0, atol=1e-9 * mass)


@PROPERTY
@given(problems)
def test_solve_through_torch_is_finite_and_equals_pot(p):
    """The public ``solve`` (balance, checks, the layer) on the same problems, float64."""
    cost, a, b, scale = draw(p)
    t = [torch.from_numpy(x)[None] for x in (cost * scale, a, b)]
    dist, flow = solve(*t)
    assert torch.isfinite(dist).all() and torch.isfinite(flow).all()
    ref = ot.emd2(a, b, cost, numItermax=10**7) * scale
    assert abs(float(dist[0]) - ref) <= 1e-9 * scale * a.sum()


@PROPERTY
@given(problems, st.sampled_from(["cost", "wu", "wv"]), st.sampled_from([np.nan, np.inf, -np.inf]))
def test_non_finite_input_is_one_clear_error(p, where, bad):
    cost, a, b, scale = draw(p)
    arrays = {"cost": cost * scale, "wu": a, "wv": b}
    target = arrays[where].reshape(-1)
    target[p["seed"] % target.size] = bad
    with pytest.raises(DeepEMDError, match=f"{where} contains NaN or inf"):
        solve(*(torch.from_numpy(arrays[k])[None] for k in ("cost", "wu", "wv")))


features = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**32 - 1),
        "p": st.integers(1, 3),
        "q": st.integers(1, 3),
        "m": st.integers(1, 12),
        "n": st.integers(1, 12),
        "d": st.integers(1, 24),
        "exponent": st.integers(-30, 30),
        "dead": st.sampled_from([0.0, 0.3]),
        "center": st.booleans(),
        "weights": st.sampled_from(["cross", "uniform"]),
    }
)


@PROPERTY
@given(features)
def test_similarity_of_float32_features_at_any_scale_matches_float64(f):
    """Scores of float32 features scaled by 1e-30..1e30 (some nodes all zero): finite, in
    [-1, 1], and the float64 computation's, pairwise and per pair."""
    gen = torch.Generator().manual_seed(f["seed"] % 2**63)
    a = torch.relu(torch.randn(f["p"], f["m"], f["d"], generator=gen))
    b = torch.relu(torch.randn(f["q"], f["n"], f["d"], generator=gen))
    a[torch.rand(a.shape[:2], generator=gen) < f["dead"]] = 0.0
    scale = 10.0 ** f["exponent"]
    a, b = a * scale, b * scale
    opts = {"weights": f["weights"], "center": f["center"]}
    got = pairwise_similarity(a, b, **opts)
    assert torch.isfinite(got).all() and got.abs().max() <= 1 + 1e-5
    ref = pairwise_similarity(a.double(), b.double(), **opts)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)
    one = similarity(a[:1].expand(f["q"], -1, -1), b, **opts)
    torch.testing.assert_close(one.double(), ref[0], rtol=0, atol=1e-5)


@PROPERTY
@given(features, st.sampled_from([float("nan"), float("inf")]))
def test_non_finite_features_are_one_clear_error(f, bad):
    gen = torch.Generator().manual_seed(f["seed"] % 2**63)
    a = torch.randn(f["p"], f["m"], f["d"], generator=gen)
    b = torch.randn(f["q"], f["n"], f["d"], generator=gen)
    b.view(-1)[f["seed"] % b.numel()] = bad
    with pytest.raises(DeepEMDError, match="b contains NaN or inf"):
        pairwise_similarity(a, b, weights=f["weights"], center=f["center"])
