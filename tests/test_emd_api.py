"""Scores and all-pairs scoring: what the retrieval and few-shot jobs call."""
import torch

from deepemd.emd import cost_matrix, cross_reference_weights, pairwise_similarity, similarity, solve


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


def test_pairwise_similarity_scores_every_pair_and_chunking_changes_nothing():
    a, b = rand(3, 4, 6), rand(5, 6, 6, seed=1)
    full = pairwise_similarity(a, b, temperature=2.0, center=True)
    assert full.shape == (3, 5)
    for p in range(3):
        for q in range(5):
            torch.testing.assert_close(
                full[p, q], similarity(a[p:p + 1], b[q:q + 1], temperature=2.0, center=True)[0])
    torch.testing.assert_close(pairwise_similarity(a, b, temperature=2.0, center=True, chunk=4),
                               full)


def test_pairwise_similarity_is_differentiable():
    a = rand(2, 3, 4).requires_grad_(True)
    b = rand(3, 3, 4, seed=1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: pairwise_similarity(a, b, chunk=4), (a, b),
                                    eps=1e-6, atol=1e-5)


def test_uniform_weights_and_sinkhorn_route_through_similarity():
    u, v = rand(2, 4, 6), rand(2, 4, 6, seed=1)
    exact = similarity(u, v, weights="uniform")
    approx = similarity(u, v, weights="uniform", solver="sinkhorn", eps=1e-3, n_iter=5000)
    torch.testing.assert_close(approx, exact, rtol=1e-2, atol=1e-2)


def test_bench_prints_a_ratio_table(capsys):
    import argparse

    from deepemd.emd.bench import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--sizes", "3x4", "--batches", "2", "--repeats", "1",
                              "--qpth-count", "1", "--no-qpth-probe", "--sinkhorn-iters", "50"])
    assert run(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 3x4 | 2 |")]
    solvers = {line.split(" | ")[2] for line in rows}
    assert solvers == {"cv2.EMD loop", "POT ot.emd loop", "exact (ours)", "sinkhorn",
                       "qpth batch-1 loop"}
    assert "loadavg" in out
