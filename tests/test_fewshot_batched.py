"""The batched few-shot path against the one-episode-at-a-time code it replaced.

Oracles: ``deepemd.emd.pairwise_similarity`` per episode for the batched EMD scores, and the old
per-episode methods (tests/fewshot_reference.py: torch.optim per episode, one pairwise call per
episode, ``fit_sfc`` per episode) scored on the same seeded episodes through ``evaluate``.
"""

import numpy as np
import pytest
import torch
from fewshot_reference import REFERENCE

from deepemd.emd import pairwise_similarity
from deepemd.emd.sfc import SFCFit
from deepemd.fewshot.episode_emd import NodeSets, episode_similarity
from deepemd.fewshot.episodes import episode_indices, episode_labels, evaluate, make_batch, make_episode
from deepemd.fewshot.features import FeatureCache
from deepemd.fewshot.methods import METHODS, MethodOptions, default_methods

NODES, DIM, CLASSES, PER_CLASS = 4, 24, 7, 8


def _cache(seed=0, separate_local=False, noise=1.5):
    """Post-ReLU cell features around a per-class centre (hard enough that methods err)."""
    gen = torch.Generator().manual_seed(seed)
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    centres = torch.randn(CLASSES, NODES, DIM, generator=gen)
    cells = (centres[labels] + noise * torch.randn(len(labels), NODES, DIM, generator=gen)).relu()
    local = cells.clone() if separate_local else cells
    return FeatureCache(cells.mean(1), cells, local, labels)


def _sets(gen, *shape):
    return torch.randn(*shape, generator=gen).relu()


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("weights", ["cross", "uniform"])
def test_episode_scores_are_pairwise_similarity_per_episode(center, weights):
    gen = torch.Generator().manual_seed(1)
    a, b = _sets(gen, 3, 5, 6, 16), _sets(gen, 3, 4, 7, 16)  # m != n
    got = episode_similarity(NodeSets.of(a, center), NodeSets.of(b, center), weights=weights, temperature=12.5)
    for e in range(3):
        want = pairwise_similarity(a[e], b[e], weights=weights, temperature=12.5, center=center)
        torch.testing.assert_close(got[e], want, rtol=1e-5, atol=1e-5)


def test_episode_scores_of_tiny_features_take_the_rescaled_route_as_pairwise_does():
    gen = torch.Generator().manual_seed(8)
    a, b = _sets(gen, 2, 3, 5, 16) * 1e-25, _sets(gen, 2, 4, 5, 16)  # a's squared norms underflow float32
    nodes = NodeSets.of(a, True)
    assert nodes.scaled
    got = episode_similarity(nodes, NodeSets.of(b, True), temperature=12.5)
    for e in range(2):
        want = pairwise_similarity(a[e], b[e], temperature=12.5, center=True)
        torch.testing.assert_close(got[e], want, rtol=1e-5, atol=1e-5)


def test_episode_scores_have_the_pairwise_gradient():
    gen = torch.Generator().manual_seed(2)
    a, b = _sets(gen, 2, 3, 5, 8), _sets(gen, 2, 2, 5, 8)
    b1 = b.clone().requires_grad_(True)
    episode_similarity(NodeSets.of(a, True), NodeSets.of(b1, True), temperature=12.5).pow(2).sum().backward()
    b2 = b.clone().requires_grad_(True)
    sum(pairwise_similarity(a[e], b2[e], temperature=12.5, center=True).pow(2).sum() for e in range(2)).backward()
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-4, atol=1e-5)


def _accuracies(cache, methods, shot, episodes=12, batch=5):
    return evaluate(cache, methods, 5, shot, 3, episodes, seed=3, progress=False, batch=batch)


OPTS = MethodOptions(sfc=SFCFit(steps=15, batch_size=4), finetune_steps=40, seed=5)


@pytest.mark.parametrize("shot", [1, 2])
def test_every_method_matches_the_old_per_episode_code_on_seeded_episodes(shot):
    cache = _cache()
    keys = list(default_methods(shot))
    new = _accuracies(cache, {k: METHODS[k].build(OPTS) for k in keys}, shot)
    old = _accuracies(cache, {k: (lambda ep, k=k: REFERENCE[k](ep, OPTS)) for k in keys}, shot)
    for k in keys:
        assert len(new[k]) == 12
        # Batching changes floating-point order only: per-episode accuracies agree (one query of
        # one episode may flip where two classes tie to rounding), the means within a query.
        assert np.mean(new[k] != old[k]) <= 1 / 12, k
        assert abs(new[k].mean() - old[k].mean()) <= 1 / (15 * 12) + 1e-12, k
    assert any(0 < a.mean() < 1 for a in new.values())  # not a trivial episode set


@pytest.mark.parametrize("shot", [1, 2])
def test_batched_scores_are_close_to_the_old_scores(shot):
    cache = _cache(seed=4)
    idx = np.stack(list(episode_indices(cache.labels, 5, shot, 3, 3, seed=0)))
    eb = make_batch(cache, idx, 5, shot)
    for key in default_methods(shot):
        got = METHODS[key].build(OPTS).batch(eb)
        want = torch.stack([REFERENCE[key](make_episode(cache, row, 5, shot), OPTS) for row in idx])
        # Scores up to a per-query constant (what softmax and argmax see): FC's bias gradient
        # sums to zero over the classes and Adam's normalisation turns its rounding noise into
        # a step common to every class. Adam does the same to any near-zero gradient entry, so
        # the two Adam-fitted classifiers agree to 1% of their score range, the rest to 1e-4.
        got, want = got - got.mean(2, keepdim=True), want - want.mean(2, keepdim=True)
        tol = 1e-2 if key in ("fc", "cosine") else 1e-4
        torch.testing.assert_close(got, want, rtol=0, atol=tol * max(float(want.abs().max()), 1.0), msg=key)


def test_results_do_not_depend_on_the_batch_size():
    cache = _cache(seed=6)
    methods = {k: METHODS[k].build(OPTS) for k in default_methods(2)}
    one = _accuracies(cache, methods, 2, episodes=7, batch=1)
    many = _accuracies(cache, methods, 2, episodes=7, batch=4)
    for k in methods:
        np.testing.assert_allclose(one[k], many[k], err_msg=k)


def test_knn_sharing_the_emd_dot_products_equals_its_own_matmul():
    shared, separate = _cache(seed=7), _cache(seed=7, separate_local=True)
    assert shared.local is shared.cells and separate.local is not separate.cells
    idx = np.stack(list(episode_indices(shared.labels, 5, 2, 3, 2, seed=1)))
    for center in (True, False):
        o = MethodOptions(center=center)
        a, b = make_batch(shared, idx, 5, 2), make_batch(separate, idx, 5, 2)
        METHODS["emd_nn"].build(o).batch(a)  # computes the shared dots first
        assert ("local_dots", center) in a.memo
        torch.testing.assert_close(
            METHODS["knn"].build(o).batch(a), METHODS["knn"].build(o).batch(b), rtol=1e-5, atol=1e-5
        )


def test_stacked_episode_labels_match_one_episode_at_a_time():
    labels = np.repeat(np.arange(6), 5)
    idx = np.stack(list(episode_indices(labels, 4, 2, 3, 5, seed=2)))
    support, query = episode_labels(labels, idx, 4, 2)
    for e, row in enumerate(idx):
        s1, q1 = episode_labels(labels, row, 4, 2)
        assert torch.equal(support, s1) and torch.equal(query[e], q1)
    with pytest.raises(RuntimeError, match="class-major"):
        episode_labels(labels, idx[:, ::-1].copy(), 4, 2)
