"""The Shortlist value, the EMD bounds (never above the exact optimum) and the pruned Reranker
(same top k and scores as the full rerank), on random problems and on real CNN features
(EfficientNet-Lite0 ImageNet maps of the bundled Omniglot images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepemd.emd import (
    cost_matrix,
    cross_reference_weights,
    pairwise_similarity,
    solve,
    uniform_weights,
)
from deepemd.emd.bounds import centroid_bound, relaxed_bound, score_upper_bound
from deepemd.errors import DeepEMDError
from deepemd.eval.shortlist import Shortlist
from deepemd.retrieval.rerank import Reranker


@pytest.fixture(scope="module")
def real_sets():
    """Global vectors, FCN + pyramid sets (23 nodes x 1280-d, float16 as eval keeps them) and
    labels of 40 demo images."""
    from deepemd.build import read_images
    from deepemd.retrieval.build import local_specs, make_embedder, make_loader
    from deepemd.retrieval.config import EvalConfig
    from deepemd.retrieval.model import embed_loader

    cfg = EvalConfig(data_root="demo", max_classes=8, per_class=5, image_size=96, methods=("fcn",))
    images = read_images(cfg, cfg.split, cfg.seed)
    model = make_embedder(cfg, local_specs(cfg, ["fcn"]))
    glob, sets, labels = embed_loader(model, make_loader(images, model, 20, 0), torch.device("cpu"), progress=False)
    return glob, sets["fcn"], labels


def random_problems(seed: int, b: int = 40, m: int = 7, n: int = 9, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    u = torch.relu(torch.randn(b, m, d, generator=g, dtype=torch.float64))
    v = torch.relu(torch.randn(b, n, d, generator=g, dtype=torch.float64))
    return u, v


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weights", [cross_reference_weights, uniform_weights])
def test_bounds_never_exceed_the_exact_optimum_on_random_problems(seed, weights):
    u, v = random_problems(seed)
    cost = cost_matrix(u, v)
    wu, wv = weights(u, v)
    dist, _ = solve(cost, wu, wv)
    relaxed = relaxed_bound(cost, wu, wv)
    centroid = centroid_bound(F.normalize(u, dim=-1), F.normalize(v, dim=-1), wu, wv)
    assert (relaxed <= dist + 1e-9).all() and (centroid <= dist + 1e-9).all()
    assert (relaxed > 0.5 * dist).any()  # a real bound, not a trivial zero
    total = 0.5 * (wu.sum(1) + wv.sum(1))
    assert (score_upper_bound(relaxed, wu, wv) >= (total - dist) / total - 1e-12).all()


def test_bounds_are_valid_on_real_features_and_tight_when_one_side_is_a_point(real_sets):
    _, sets, _ = real_sets
    u = torch.from_numpy(sets[:20]).double()
    v = torch.from_numpy(sets[20:]).double()
    cost = cost_matrix(u, v)
    wu, wv = cross_reference_weights(u, v)
    dist, _ = solve(cost, wu, wv)
    assert (relaxed_bound(cost, wu, wv) <= dist + 1e-9).all()
    assert (centroid_bound(F.normalize(u, dim=-1), F.normalize(v, dim=-1), wu, wv) <= dist + 1e-9).all()
    # one node on a side: every row must send its mass to it, so the relaxation is exact
    one = cost[:, :, :1].contiguous()
    w1 = wu.sum(1, keepdim=True)
    d1, _ = solve(one, wu, w1)
    torch.testing.assert_close(relaxed_bound(one, wu, w1), d1)


def test_eval_keeps_sets_node_major_for_the_rerank_gather(real_sets):
    # the FCN map's sets are channel-major views of the conv output; stored as they come, every
    # shortlist gather and float conversion walks 1280-element strides (2-3x slower)
    _, sets, _ = real_sets
    assert sets.dtype == np.float16 and sets.flags.c_contiguous


def test_shortlist_checks_its_rules_once():
    ok = Shortlist(np.array([[3, 1, -1]]), np.array([[0.9, 0.5, 7.0]]))
    assert ok.scores[0, 2] == -np.inf and ok.ids.dtype == np.int64 and ok.width == 3
    with pytest.raises(DeepEMDError, match="not sorted"):
        Shortlist(np.array([[1, 2]]), np.array([[0.1, 0.5]]))
    with pytest.raises(DeepEMDError, match="after a -1"):
        Shortlist(np.array([[1, -1, 2]]), np.array([[0.9, 0.5, 0.1]]))
    with pytest.raises(DeepEMDError, match="must both be"):
        Shortlist(np.zeros((2, 3)), np.zeros((2, 2)))
    fixed = Shortlist.from_unsorted(np.array([[1, 2, -1, 4]]), np.array([[0.1, 0.5, 0.9, 0.5]]))
    assert fixed.ids.tolist() == [[2, 4, 1, -1]]


def test_pruned_rerank_equals_the_full_rerank_on_real_features(real_sets):
    glob, sets, _ = real_sets
    sims = glob @ glob.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :30]
    shortlist = Shortlist(order, np.take_along_axis(sims, order, 1))
    for kw in ({}, {"weights": "uniform"}, {"center": True}, {"alpha": 0.3}):
        full = Reranker(sets, k=30, prune=False, **kw).rerank(sets, shortlist)
        pruned_reranker = Reranker(sets, k=5, **kw)
        pruned = pruned_reranker.rerank(sets, shortlist)
        assert np.array_equal(pruned.ids, full.ids[:, :5]), kw
        assert np.array_equal(pruned.scores, full.scores[:, :5]), kw
        assert pruned_reranker.stats.skipped_fraction > 0.2, kw
    # and the full rerank's scores are the EMD head's own pairwise scores
    q = 3
    full = Reranker(sets, k=30, prune=False).rerank(sets, shortlist)
    expected = pairwise_similarity(
        torch.from_numpy(sets[q : q + 1]).float(), torch.from_numpy(sets[full.ids[q]]).float()
    )[0]
    np.testing.assert_allclose(full.scores[q], expected.numpy(), atol=2e-6)


def test_reranker_keeps_the_query_first_padding_last_and_checks_the_store_kind(real_sets):
    _, sets, _ = real_sets
    shortlist = Shortlist(np.array([[0, 5, 9, 2, -1]]), np.array([[1.0, 0.9, 0.8, 0.7, 0.0]]))
    out = Reranker(sets, k=5, depth=3).rerank(sets, shortlist, skip_ids=np.array([0]))
    assert out.ids[0, 0] == 0 and out.scores[0, 0] == np.inf
    assert sorted(out.ids[0, 1:3].tolist()) == [5, 9] and out.ids[0, 3] == 2 and out.ids[0, 4] == -1

    class Store:
        def __init__(self):
            self.fingerprint = {"local": {"kind": "grid"}}

        def get(self, ids):
            return sets[ids].astype(np.float32)

    with pytest.raises(DeepEMDError, match="holds grid local sets"):
        Reranker(Store(), local="fcn")
    from_store = Reranker(Store(), local="grid", k=3).rerank(sets, shortlist)
    from_array = Reranker(sets, k=3).rerank(sets, shortlist)
    assert np.array_equal(from_store.ids, from_array.ids)
    np.testing.assert_allclose(from_store.scores, from_array.scores, atol=1e-6)


def shortlist_of(glob: np.ndarray, depth: int) -> Shortlist:
    sims = glob @ glob.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :depth]
    return Shortlist(order, np.take_along_axis(sims, order, 1))


def scores_by_id(out: Shortlist) -> list[dict[int, float]]:
    return [dict(zip(ids.tolist(), scores.tolist())) for ids, scores in zip(out.ids, out.scores)]


def test_sparse_and_pyramid_dots_give_the_plain_dense_scores(real_sets):
    glob, sets, _ = real_sets
    shortlist = shortlist_of(glob, 30)
    plain = Reranker(sets, k=30, prune=False, sparse=False)
    expected = scores_by_id(plain.rerank(sets, shortlist))
    assert plain.sets.sparse is None
    for sparse, pyramid, tol in ((True, (), 1e-6), (False, (3, 2, 1), 3e-5), (True, (3, 2, 1), 3e-5)):
        reranker = Reranker(sets, k=30, prune=False, sparse=sparse, pyramid=pyramid)
        got = scores_by_id(reranker.rerank(sets, shortlist))
        assert (reranker.sets.sparse is not None) == sparse
        gaps = [abs(row[i] - ref[i]) for row, ref in zip(got, expected) for i in ref]
        # the pyramid path recomputes the pooled nodes from the float16 cells in float32: the
        # scores move by the float16 rounding of the stored pooled nodes, no more
        assert max(gaps) < tol, (sparse, pyramid, max(gaps))
        assert 0 < max(gaps) or not pyramid  # the pyramid path really recomputed those nodes
    # the default decides by itself: 40 queries x 30 entries pay for indexing 40 sets
    auto = Reranker(sets, k=5, pyramid=(3, 2, 1))
    auto.rerank(sets, shortlist)
    assert auto.sets.sparse is not None
    one_query = Reranker(sets, k=5)
    one_query.rerank(sets[:1], Shortlist(shortlist.ids[:1], shortlist.scores[:1]))
    assert one_query.sets.sparse is None


def test_a_gallery_store_reranks_as_the_in_memory_sets_do(real_sets, tmp_path):
    """A memory-mapped float16 store read by id (rows as stored, their scales applied to the
    dot blocks, pooled nodes averaged from the cells) gives the scores of the same decoded sets
    in memory; and search_gallery hands the rerank the pyramid of the store's fingerprint."""
    import faiss

    from deepemd.retrieval.gallery import Gallery, search_gallery
    from deepemd.retrieval.rerank import RerankSettings
    from deepemd.retrieval.store import LocalFeatureStore, build_store

    glob, sets, _ = real_sets
    sets = sets.astype(np.float32) * np.geomspace(1e-2, 1e2, len(sets)).astype(np.float32)[:, None, None]
    fingerprint = {"local": {"kind": "fcn", "pyramid": [3, 2, 1]}}
    build_store(tmp_path / "s", len(sets), lambda lo, hi: sets[lo:hi], *sets.shape[1:], fingerprint, 16, progress=False)
    store = LocalFeatureStore.open(tmp_path / "s", expected_fingerprint=fingerprint)
    decoded = store.get(np.arange(len(sets)))
    shortlist = shortlist_of(glob, 30)
    scores = {}
    for center in (False, True):
        want = scores_by_id(
            Reranker(decoded, k=30, prune=False, pyramid=(3, 2, 1), center=center).rerank(decoded, shortlist)
        )
        reranker = Reranker(store, k=30, prune=False, pyramid=(3, 2, 1), center=center)
        got = scores_by_id(reranker.rerank(decoded, shortlist))
        assert reranker.sets.stored is not None  # the stored-rows route, not store.get
        gaps = [abs(row[i] - ref[i]) for row, ref in zip(got, want) for i in ref]
        assert max(gaps) < 1e-5, (center, max(gaps))  # float32 rounding: scales applied late
        scores[center] = want
    assert scores[False] != scores[True]  # centring changed the scores: both routes were checked
    # search_gallery: a store whose fingerprint names a pyramid its sets do not carry is refused
    build_store(
        tmp_path / "t",
        len(sets),
        lambda lo, hi: sets[lo:hi, ::-1].copy(),
        *sets.shape[1:],
        fingerprint,
        16,
        progress=False,
    )
    index = faiss.IndexFlatIP(glob.shape[1])
    index.add(glob)
    gallery = Gallery(index, LocalFeatureStore.open(tmp_path / "t"), np.arange(len(sets)), [])
    with pytest.raises(DeepEMDError, match=r"not the feature pyramid \(3, 2, 1\)"):
        search_gallery(gallery, glob[:2], decoded[:2], 5, RerankSettings(depth=10))


def test_a_pyramid_the_sets_do_not_carry_is_one_clear_error(real_sets):
    _, sets, _ = real_sets
    with pytest.raises(DeepEMDError, match="not an FCN set with the feature pyramid"):
        Reranker(sets, pyramid=(2, 1))  # 23 - 5 = 18 cells: no square map
    shuffled = sets[:, ::-1].copy()  # 23 nodes still, but the pooled ones are not first
    with pytest.raises(DeepEMDError, match=r"first 14 nodes are not the feature pyramid \(3, 2, 1\)"):
        Reranker(shuffled, pyramid=(3, 2, 1))
    shortlist = Shortlist(np.array([[1, 2]]), np.array([[0.9, 0.8]]))
    fetched = Reranker(lambda ids: shuffled[ids], k=2, pyramid=(3, 2, 1))  # a store read by id: its first read
    with pytest.raises(DeepEMDError, match="not the feature pyramid"):
        fetched.rerank(sets[:1], shortlist)
    right = Reranker(lambda ids: sets[ids], k=2, pyramid=(3, 2, 1)).rerank(sets[:1], shortlist)
    assert sorted(right.ids[0].tolist()) == [1, 2]


def test_eval_gives_the_pyramid_to_fcn_sets_only(real_sets):
    from deepemd.retrieval.evaluate import evaluate_arrays
    from deepemd.retrieval.rerank import RerankSettings

    glob, sets, labels = real_sets
    grid = np.maximum(np.random.default_rng(0).normal(size=(len(sets), 13, sets.shape[2])), 0).astype(np.float16)
    methods = [("fcn", "cross", "+DeepEMD-FCN"), ("grid", "cross", "+DeepEMD-Grid")]
    sets_by_kind = {"fcn": sets, "grid": grid}
    # 13 Grid nodes are no (3, 2, 1) pyramid: handed the FCN pyramid, the Grid rerank would raise
    with_pyramid = evaluate_arrays(
        glob, labels, sets_by_kind, methods, RerankSettings(30, pyramid=(3, 2, 1)), progress=False
    )
    plain = evaluate_arrays(glob, labels, sets_by_kind, methods, RerankSettings(30), progress=False)
    for a, b in zip(with_pyramid, plain):
        assert a["method"] == b["method"]
        for metric in ("P@1", "RP", "MAP@R"):
            assert a[metric] == pytest.approx(b[metric], abs=1e-9), (a["method"], metric)
