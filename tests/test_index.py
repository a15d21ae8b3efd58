"""FAISS index building, searching, sharding, saving and loading (deepemd.retrieval.index).

The oracle for search is a brute-force numpy top-k; approximate indexes are judged by their
recall of the exact top-10 on clustered data (where a good IVF/HNSW index should find nearly all).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import faiss
import numpy as np
import pytest

from deepemd.errors import DeepEMDError
from deepemd.retrieval import index as ix

D = 32


def clustered(n: int, q: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, D)).astype(np.float32)
    x = centres[rng.integers(0, 40, n)] + 0.25 * rng.standard_normal((n, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = x[rng.integers(0, n, q)] + 0.05 * rng.standard_normal((q, D)).astype(np.float32)
    return x, queries.astype(np.float32)


def exact_topk(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ x.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the true neighbours ``truth`` that appear anywhere in ``found``."""
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


X, Q = clustered(3000, 50)
TRUTH = exact_topk(X, Q, 10)


def test_flat_matches_brute_force_and_ids_are_positions():
    scores, ids = ix.search(ix.build_index(X, "Flat"), Q, 10)
    assert recall(ids, TRUTH) == 1.0
    np.testing.assert_allclose(scores, np.take_along_axis(Q @ X.T, ids, axis=1), rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


@pytest.mark.parametrize(
    "spec,depth,min_recall",
    [
        ("IVF32,Flat", 10, 0.95),
        ("HNSW16", 10, 0.95),
        # 16 bytes per 32-d vector is lossy: PQ is used for a deeper shortlist that then gets reranked,
        # so it is judged by how many of the true top-10 its top-50 holds
        ("IVF16,PQ16", 50, 0.9),
    ],
)
def test_approximate_specs_recall_against_flat(spec, depth, min_recall):
    index = ix.build_index(X, spec, train_sample=2000, seed=0)
    assert index.ntotal == len(X)
    scores, ids = ix.search(index, Q, depth)
    assert ids.shape == (len(Q), depth) and (ids >= 0).all()
    assert recall(ids, TRUTH) >= min_recall, spec


def test_search_params_change_ivf_recall():
    index = ix.build_index(X, "IVF64,Flat", nprobe=1)
    low = recall(ix.search(index, Q, 10)[1], TRUTH)
    ix.set_search_params(index, nprobe=64)  # every list: exact
    assert recall(ix.search(index, Q, 10)[1], TRUTH) == 1.0
    assert low < 1.0


def test_l2_scores_are_negated_distances():
    scores, ids = ix.search(ix.build_index(X, "Flat", metric="l2"), Q, 5)
    d2 = ((Q[:, None, :] - X[ids]) ** 2).sum(-1)
    np.testing.assert_allclose(scores, -d2, rtol=1e-4, atol=1e-4)
    assert recall(ids, TRUTH[:, :5]) == 1.0  # unit vectors: L2 order equals inner-product order


def test_k_larger_than_gallery_is_clipped():
    scores, ids = ix.search(ix.build_index(X[:7], "Flat"), Q[:2], 100)
    assert ids.shape == (2, 7) and sorted(ids[0]) == list(range(7))


@pytest.mark.parametrize("spec", ["Flat", "IVF16,Flat", "HNSW16"])
def test_shards_return_gallery_positions(spec, tmp_path):
    single = ix.build_index(X, spec, nprobe=16)
    sharded = ix.build_index(X, spec, shards=3, nprobe=16)
    assert isinstance(faiss.downcast_index(sharded), faiss.IndexShards) and sharded.ntotal == len(X)
    s1, i1 = ix.search(single, Q, 10)
    s3, i3 = ix.search(sharded, Q, 10)
    assert recall(i3, TRUTH) >= (1.0 if spec == "Flat" else 0.95)
    if spec == "Flat":
        np.testing.assert_array_equal(i1, i3)
    ix.save_index(sharded, tmp_path / "g.faiss", {"backbone": "toy"})
    loaded = ix.load_index(tmp_path / "g.faiss", {"backbone": "toy"})
    np.testing.assert_array_equal(ix.search(loaded, Q, 10)[1], i3)


def test_add_in_batches_keeps_positions_and_rejects_gaps():
    index = ix.train_index("Flat", X[:10])
    ix.add_in_batches(index, iter([(0, X[:1000]), (1000, X[1000:])]), batch_size=300)
    np.testing.assert_array_equal(ix.search(index, Q, 10)[1], TRUTH)
    with pytest.raises(ValueError, match="gallery order"):
        ix.add_in_batches(index, iter([(5, X[:10])]))


ROUND_TRIP = textwrap.dedent("""
    import sys, numpy as np
    from deepemd.retrieval.index import load_index, search
    index = load_index(sys.argv[1], {"backbone": "resnet50", "embed_dim": 32})
    scores, ids = search(index, np.load(sys.argv[2]), 10)
    np.save(sys.argv[3], ids); np.save(sys.argv[4], scores)
""")


def test_round_trip_in_a_new_process(tmp_path):
    index = ix.build_index(X, "IVF32,Flat", nprobe=8)
    scores, ids = ix.search(index, Q, 10)
    ix.save_index(index, tmp_path / "g.faiss", {"backbone": "resnet50", "embed_dim": 32})
    np.save(tmp_path / "q.npy", Q)
    subprocess.run(
        [
            sys.executable,
            "-c",
            ROUND_TRIP,
            str(tmp_path / "g.faiss"),
            str(tmp_path / "q.npy"),
            str(tmp_path / "ids.npy"),
            str(tmp_path / "scores.npy"),
        ],
        check=True,
        timeout=120,
    )
    np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"), ids)  # nprobe survived the file
    np.testing.assert_array_equal(np.load(tmp_path / "scores.npy"), scores)
    sidecar = json.loads((tmp_path / "g.faiss.json").read_text())
    assert sidecar["fingerprint"] == {"backbone": "resnet50", "embed_dim": 32, "count": len(X)}


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "gallery.faiss"
    ix.save_index(ix.build_index(X, "Flat"), path, {"backbone": "resnet50", "embed_dim": 32, "local": [3, 2, 1]})
    return path


def test_fingerprint_mismatch_names_every_difference(saved):
    with pytest.raises(DeepEMDError) as err:
        ix.load_index(saved, {"backbone": "resnet18", "embed_dim": 32, "local": (3, 2, 1), "count": 10})
    msg = str(err.value)
    assert "backbone: index has 'resnet50', expected 'resnet18'" in msg
    assert "count: index has 3000, expected 10" in msg
    assert "embed_dim:" not in msg and "local:" not in msg  # tuples compare equal to stored lists
    assert str(saved) in msg and "fix:" in msg
    assert ix.load_index(saved, {"local": (3, 2, 1)}).ntotal == len(X)


def test_missing_index(tmp_path):
    with pytest.raises(DeepEMDError, match="index not found"):
        ix.load_index(tmp_path / "nothing.faiss")


def test_truncated_index_file_is_detected(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(DeepEMDError, match="does not match its manifest"):
        ix.load_index(saved)


def test_corrupted_bytes_same_size_are_detected(saved):
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(DeepEMDError, match="checksum differs"):
        ix.load_index(saved)


def test_corrupt_sidecar_and_missing_sidecar(saved):
    side = ix.sidecar_path(saved)
    side.write_text("{not json")
    with pytest.raises(DeepEMDError, match="unreadable index sidecar"):
        ix.load_index(saved)
    side.unlink()
    with pytest.raises(DeepEMDError, match="no deepemd sidecar"):
        ix.load_index(saved)


def test_foreign_index(tmp_path):
    path = tmp_path / "mine.index"
    own = faiss.IndexFlatIP(D)
    own.add(X)
    faiss.write_index(own, str(path))
    loaded = ix.load_foreign_index(path)
    assert loaded.d == D
    np.testing.assert_array_equal(ix.search(loaded, Q, 10)[1], TRUTH)
    (tmp_path / "junk.index").write_bytes(b"not a faiss index at all")
    with pytest.raises(DeepEMDError, match="not a readable FAISS index"):
        ix.load_foreign_index(tmp_path / "junk.index")
    with pytest.raises(DeepEMDError, match="not found"):
        ix.load_foreign_index(tmp_path / "absent.index")


def test_bad_spec_small_gallery_and_wrong_query_dim():
    with pytest.raises(DeepEMDError, match="cannot build index spec"):
        ix.build_index(X, "IVF32,PQ7")  # 7 does not divide 32
    with pytest.raises(DeepEMDError, match="cannot train index"):
        ix.build_index(X[:20], "IVF64,Flat")
    with pytest.raises(DeepEMDError, match="dimension 16 but the index has 32"):
        ix.search(ix.build_index(X, "Flat"), Q[:, :16], 5)
    with pytest.raises(DeepEMDError, match="unknown metric"):
        ix.build_index(X, "Flat", metric="cosine")
