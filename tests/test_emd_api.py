"""Scores and all-pairs scoring: what the retrieval and few-shot jobs call."""

import pytest
import torch

from deepemd.emd import cost_matrix, cross_reference_weights, pairwise_similarity, similarity, solve
from deepemd.errors import DeepEMDError


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cross_reference_weights_follow_the_paper():
    u, v = rand(2, 4, 6), rand(2, 5, 6, seed=1)
    wu, wv = cross_reference_weights(u, v)
    raw_u = torch.relu(torch.einsum("bmd,bd->bm", u, v.mean(1))) + 1e-3
    raw_v = torch.relu(torch.einsum("bnd,bd->bn", v, u.mean(1))) + 1e-3
    torch.testing.assert_close(wu, raw_u / raw_u.sum(-1, keepdim=True) * 4.5)
    torch.testing.assert_close(wv, raw_v / raw_v.sum(-1, keepdim=True) * 4.5)


def test_similarity_is_eq3_times_temperature_over_mass():
    u, v = rand(3, 5, 7), rand(3, 5, 7, seed=1)
    cost = cost_matrix(u, v)
    wu, wv = cross_reference_weights(u, v)
    _, flow = solve(cost, wu, wv)
    eq3 = ((1 - cost) * flow).sum((1, 2))
    torch.testing.assert_close(similarity(u, v, temperature=12.5), 12.5 * eq3 / 5)
    # identical sets match node to node: every cosine is 1
    torch.testing.assert_close(similarity(u, u), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("weights", ["cross", "uniform"])
@pytest.mark.parametrize("center", [False, True])
def test_pairwise_similarity_scores_every_pair_and_chunking_changes_nothing(weights, center):
    """The matmul-per-block path gives the per-pair similarity() numbers, whatever the blocks
    (whole rows of pairs, several rows, or pieces of one row)."""
    a, b = rand(3, 4, 6), rand(5, 6, 6, seed=1)
    opts = dict(weights=weights, temperature=2.0, center=center)
    full = pairwise_similarity(a, b, **opts)
    assert full.shape == (3, 5)
    per_pair = torch.stack(
        [torch.cat([similarity(a[p : p + 1], b[q : q + 1], **opts) for q in range(5)]) for p in range(3)]
    )
    torch.testing.assert_close(full, per_pair, rtol=0, atol=1e-6)
    for chunk in (1, 4, 5, 7, 10, 1000):
        torch.testing.assert_close(pairwise_similarity(a, b, chunk=chunk, **opts), full, rtol=0, atol=1e-12)


def test_pairwise_similarity_float32_matches_per_pair():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.relu(torch.randn(2, 25, 64, generator=gen)), torch.randn(7, 9, 64, generator=gen)
    full = pairwise_similarity(a, b)
    assert full.dtype == torch.float32
    per_pair = torch.stack([similarity(a[p : p + 1].expand(7, -1, -1), b) for p in range(2)])
    torch.testing.assert_close(full, per_pair, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_pairwise_similarity_rejects_non_finite_sets(bad):
    a, b = rand(2, 3, 4), rand(4, 3, 4, seed=1)
    b[3, 1, 2] = bad
    with pytest.raises(DeepEMDError, match="b contains NaN or inf"):
        pairwise_similarity(a, b)
    with pytest.raises(DeepEMDError, match="unknown weights"):
        pairwise_similarity(a, a, weights="equal")


def test_finite_check_is_not_fooled_by_an_overflowing_sum():
    """The fast check sums the tensor; huge finite values overflow that sum and must still pass
    (the full element-wise check decides), and so must a cost of such features."""
    huge = torch.full((1, 2, 4), 3e38)
    assert torch.isinf(huge.sum())
    cost = cost_matrix(huge, torch.ones(1, 3, 4))
    assert torch.isfinite(cost).all()


def test_pairwise_similarity_is_differentiable():
    a = rand(2, 3, 4).requires_grad_(True)
    b = rand(3, 3, 4, seed=1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: pairwise_similarity(a, b, chunk=4), (a, b), eps=1e-6, atol=1e-5)


def test_uniform_weights_and_sinkhorn_route_through_similarity():
    u, v = rand(2, 4, 6), rand(2, 4, 6, seed=1)
    exact = similarity(u, v, weights="uniform")
    approx = similarity(u, v, weights="uniform", solver="sinkhorn", eps=1e-3, n_iter=5000)
    torch.testing.assert_close(approx, exact, rtol=1e-2, atol=1e-2)


def test_bench_prints_a_ratio_table(capsys):
    import argparse

    from deepemd.bench.emd import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--sizes",
            "3x4",
            "--batches",
            "2",
            "--repeats",
            "1",
            "--qpth-count",
            "1",
            "--no-qpth-probe",
            "--sinkhorn-iters",
            "50",
        ]
    )
    assert run(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 3x4 | 2 |")]
    solvers = {line.split(" | ")[2] for line in rows}
    assert solvers == {"cv2.EMD loop", "POT ot.emd loop", "exact (ours)", "sinkhorn", "qpth batch-1 loop"}
    assert "loadavg" in out


def test_bench_pairwise_mode_prints_the_rerank_table(capsys):
    import argparse

    from deepemd.bench.emd import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--pairwise", "2x3", "--nodes", "4", "--channels", "8", "--repeats", "1"])
    assert run(args) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ")[1] for line in out.splitlines() if line.startswith("| 2x3 |")]
    assert rows == [
        "per-pair similarity on gathered copies (reference)",
        "pairwise_similarity",
        "  of which the exact solve (solve_batch)",
    ]
    difference = float(out.split("between the two: ")[1].split()[0])
    assert difference < 1e-5
