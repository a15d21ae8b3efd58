"""Edge cases of the EMD head, each with a defined result or a clear error."""

import numpy as np
import pytest
import torch
from test_emd_exact import highs_emd  # tests/ is on sys.path (pytest prepend mode)

from deepemd.emd import cost_matrix, cross_reference_weights, pairwise_similarity, similarity, solve, uniform_weights
from deepemd.errors import DeepEMDError


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_zero_weight_nodes_get_no_flow_and_change_nothing():
    cost = rand(1, 4, 5, seed=1).abs()
    wu = torch.tensor([[1.0, 0.0, 2.0, 1.0]], dtype=torch.float64)
    wv = torch.tensor([[0.0, 1.5, 1.5, 0.0, 1.0]], dtype=torch.float64)
    dist, flow = solve(cost, wu, wv)
    assert flow[0, 1].abs().sum() == 0 and flow[0, :, [0, 3]].abs().sum() == 0
    reduced, _ = solve(cost[:, [0, 2, 3]][:, :, [1, 2, 4]], wu[:, [0, 2, 3]], wv[:, [1, 2, 4]])
    torch.testing.assert_close(dist, reduced)


@pytest.mark.parametrize("side", ["wu", "wv"])
def test_all_zero_weights_on_one_side_is_a_clear_error(side):
    cost = rand(2, 3, 3).abs()
    w = {"wu": torch.ones(2, 3, dtype=torch.float64), "wv": torch.ones(2, 3, dtype=torch.float64)}
    w[side][1] = 0.0
    with pytest.raises(DeepEMDError, match=f"{side} is all zero in problem 1"):
        solve(cost, w["wu"], w["wv"])


def test_negative_weights_are_a_clear_error():
    with pytest.raises(DeepEMDError, match="negative"):
        solve(rand(1, 2, 2).abs(), torch.tensor([[1.0, -1.0]]).double(), torch.ones(1, 2).double())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_are_a_clear_error(bad):
    u, v = rand(2, 3, 4), rand(2, 3, 4, seed=1)
    v[1, 2, 0] = bad
    with pytest.raises(DeepEMDError, match="v contains NaN or inf"):
        similarity(u, v)
    with pytest.raises(DeepEMDError, match="cost contains NaN or inf"):
        solve(torch.full((1, 2, 2), bad), torch.ones(1, 2), torch.ones(1, 2))


def test_zero_norm_nodes_have_cost_one():
    u, v = rand(1, 3, 4), rand(1, 2, 4, seed=1)
    u[0, 1] = 0.0
    cost = cost_matrix(u, v)
    assert torch.equal(cost[0, 1], torch.ones(2, dtype=torch.float64))
    assert torch.isfinite(similarity(u, v)).all()
    centred = cost_matrix(torch.ones(1, 1, 4), torch.ones(1, 1, 4), center=True)
    assert centred.item() == 1.0  # a constant node is zero after centring


def test_unequal_set_sizes():
    u, v = rand(3, 4, 6), rand(3, 9, 6, seed=1)
    wu, wv = cross_reference_weights(u, v)
    torch.testing.assert_close(wu.sum(-1), torch.full((3,), 6.5, dtype=torch.float64))
    torch.testing.assert_close(wv.sum(-1), torch.full((3,), 6.5, dtype=torch.float64))
    cost = cost_matrix(u, v)
    dist, flow = solve(cost, wu, wv)
    assert flow.shape == (3, 4, 9)
    for k in range(3):
        ref = highs_emd(cost[k].numpy(), wu[k].numpy(), wv[k].numpy())
        assert abs(dist[k].item() - ref) <= 1e-9 * ref
    uu, uv = uniform_weights(u, v)
    assert torch.allclose(uu, torch.full_like(uu, 6.5 / 4)) and torch.allclose(uv.sum(-1), uu.sum(-1))


def test_unbalanced_masses_are_rescaled_to_their_mean_total():
    cost = rand(1, 3, 4).abs()
    wu, wv = torch.rand(1, 3).double() + 0.1, torch.rand(1, 4).double() + 0.1
    dist, flow = solve(cost, wu, 3.0 * wv)
    total = 0.5 * (wu.sum() + 3.0 * wv.sum())
    torch.testing.assert_close(flow.sum(), total)
    ref = highs_emd(cost[0].numpy(), (wu * total / wu.sum())[0].numpy(), (wv * total / wv.sum())[0].numpy())
    assert abs(dist.item() - ref) <= 1e-9 * ref


def test_empty_batch_gives_empty_results_of_the_right_shape():
    dist, flow = solve(torch.zeros(0, 3, 4), torch.zeros(0, 3), torch.zeros(0, 4))
    assert dist.shape == (0,) and flow.shape == (0, 3, 4)
    u, v = torch.zeros(0, 3, 8), torch.zeros(0, 5, 8)
    assert similarity(u, v).shape == (0,)
    assert pairwise_similarity(torch.zeros(0, 3, 8), rand(4, 5, 8).float()).shape == (0, 4)


def test_half_precision_is_computed_and_returned_in_float32():
    u, v = rand(2, 4, 8, dtype=torch.float16), rand(2, 5, 8, seed=1, dtype=torch.float16)
    score = similarity(u, v)
    assert score.dtype == torch.float32
    torch.testing.assert_close(score, similarity(u.float(), v.float()))
    cost = cost_matrix(u, v)
    dist, flow = solve(cost.half(), *(w.half() for w in cross_reference_weights(u, v)))
    assert dist.dtype == flow.dtype == torch.float32


@pytest.mark.parametrize("scale", [1e-310, 1e-300, 1e-12, 1e6, 1e300])
def test_tiny_and_huge_costs(scale):
    rng = np.random.default_rng(5)
    cost = rng.random((6, 7)) * scale
    a, b = rng.random(6), rng.random(7)
    b *= a.sum() / b.sum()
    dist, flow = solve(torch.from_numpy(cost)[None], torch.from_numpy(a)[None], torch.from_numpy(b)[None])
    ref = highs_emd(cost / scale, a, b) * scale  # HiGHS's own tolerances are absolute
    assert abs(dist.item() - ref) <= 1e-9 * ref
    unit, _ = solve(torch.from_numpy(cost / scale)[None], torch.from_numpy(a)[None], torch.from_numpy(b)[None])
    assert abs(dist.item() - scale * unit.item()) <= 1e-9 * ref


def test_bad_shapes_and_names_are_clear_errors():
    with pytest.raises(DeepEMDError, match="shape"):
        similarity(torch.zeros(3, 4), torch.zeros(3, 4))
    with pytest.raises(DeepEMDError, match="agree"):
        similarity(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(DeepEMDError, match="do not match"):
        solve(torch.zeros(1, 3, 4), torch.ones(1, 3), torch.ones(1, 3))
    with pytest.raises(DeepEMDError, match="unknown EMD solver 'simplex'"):
        solve(torch.zeros(1, 2, 2), torch.ones(1, 2), torch.ones(1, 2), solver="simplex")
    with pytest.raises(DeepEMDError, match="unknown weights"):
        similarity(rand(1, 2, 3), rand(1, 2, 3), weights="equal")


def test_opencv_refuses_to_pretend_it_has_a_gradient():
    u = rand(1, 3, 4).requires_grad_(True)
    with pytest.raises(DeepEMDError, match="no gradient"):
        similarity(u, rand(1, 3, 4, seed=1), solver="opencv")
    with torch.no_grad():
        torch.testing.assert_close(
            similarity(u, rand(1, 3, 4, seed=1), solver="opencv"),
            similarity(u, rand(1, 3, 4, seed=1)),
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e-9, 1e19, 1e25, 1e35])
@pytest.mark.parametrize("center", [False, True])
def test_tiny_and_huge_float32_nodes_get_their_true_cosine(scale, center):
    """float32 norms below ~1e-8 (the old floor) or above ~1.8e19 (squares overflow) used to
    give cosine 0, i.e. score 0. The reference is the same computation in float64, where
    these norms are unremarkable."""
    gen = torch.Generator().manual_seed(3)
    a = torch.relu(torch.randn(3, 5, 32, generator=gen)) * scale
    b = torch.relu(torch.randn(4, 6, 32, generator=gen)) * scale
    for weights in ("cross", "uniform"):
        ref = pairwise_similarity(a.double(), b.double(), weights=weights, center=center)
        got = pairwise_similarity(a, b, weights=weights, center=center)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-6)
        one = similarity(a[:1].expand(4, -1, -1), b, weights=weights, center=center)
        torch.testing.assert_close(one.double(), ref[0], rtol=0, atol=2e-6)
    assert ref.abs().min() > 0.05  # the scores are not the old 0


def test_nodes_of_very_different_norms_in_one_set():
    gen = torch.Generator().manual_seed(4)
    a, b = torch.rand(2, 4, 16, generator=gen), torch.rand(3, 5, 16, generator=gen)
    a[0, 0] *= 1e-25
    a[1, 2] *= 1e18
    b[2, 1] *= 1e-20
    for weights in ("cross", "uniform"):  # uniform: the tiny nodes carry real mass
        ref = pairwise_similarity(a.double(), b.double(), weights=weights)
        got = pairwise_similarity(a, b, weights=weights)
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-6)
    cost = cost_matrix(a[:1], b[:1])
    torch.testing.assert_close(cost.double(), cost_matrix(a[:1].double(), b[:1].double()), rtol=0, atol=1e-6)


def test_pairwise_similarity_with_an_empty_side_is_empty():
    a, b = rand(3, 4, 8, dtype=torch.float32), rand(2, 5, 8, seed=1, dtype=torch.float32)
    assert pairwise_similarity(a, b[:0]).shape == (3, 0)
    assert pairwise_similarity(a[:0], b).shape == (0, 2)
    assert pairwise_similarity(a[:0], b[:0], weights="uniform").shape == (0, 0)
