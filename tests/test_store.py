"""The chunked, memory-mapped local-feature store (deepemd.retrieval.store).

The oracle is the in-memory array that was appended: every read must return exactly those
float16 rows, and every way the files can disagree with the manifest must be an error.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from deepemd.errors import DeepEMDError
from deepemd.retrieval.store import LocalFeatureStore, build_store

M, DIM, VDIM, CHUNK = 4, 6, 3, 16
FP = {"backbone": "resnet12", "local": {"kind": "fcn", "pyramid": [3, 2, 1]}}


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, M, DIM)).astype(np.float16),
            rng.standard_normal((n, VDIM)).astype(np.float32))


def make(path, n: int = 100, vectors: bool = True) -> tuple[np.ndarray, np.ndarray]:
    local, vecs = data(n)
    store = LocalFeatureStore.create(path, M, DIM, FP, chunk_size=CHUNK, vector_dim=VDIM if vectors else None)
    for start in range(0, n, 7):  # batches that do not line up with chunks
        store.append(local[start:start + 7], vecs[start:start + 7] if vectors else None)
    store.flush()
    return local, vecs


def test_round_trip_random_ids(tmp_path):
    local, vecs = make(tmp_path / "s")
    store = LocalFeatureStore.open(tmp_path / "s", expected_fingerprint=FP)
    assert len(store) == 100 and store.m == M and store.d == DIM
    ids = np.random.default_rng(1).integers(0, 100, 300)  # repeats, every chunk, any order
    got = store.get(ids)
    assert got.dtype == np.float16 and got.shape == (300, M, DIM)
    np.testing.assert_array_equal(got, local[ids])
    np.testing.assert_array_equal(store.get_vectors(ids), vecs[ids])
    assert store.get(np.array([], dtype=np.int64)).shape == (0, M, DIM)
    starts = [start for start, _ in store.iter_chunks()]
    assert starts == list(range(0, 100, CHUNK))
    np.testing.assert_array_equal(np.concatenate([c for _, c in store.iter_chunks()]), local)
    store.verify()


def test_chunk_files_and_manifest(tmp_path):
    make(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert [c["rows"] for c in manifest["chunks"]] == [16] * 6 + [4]
    assert manifest["fingerprint"] == FP and manifest["dtype"] == "<f2"
    first = np.load(tmp_path / "s" / manifest["chunks"][0]["file"], mmap_mode="r")
    assert isinstance(first, np.memmap) and first.shape == (CHUNK, M, DIM)


def test_flush_then_append_refills_the_short_chunk(tmp_path):
    local, vecs = data(40)
    store = LocalFeatureStore.create(tmp_path / "s", M, DIM, FP, chunk_size=CHUNK, vector_dim=VDIM)
    store.append(local[:20], vecs[:20])
    store.flush()  # chunks of 16 + 4
    np.testing.assert_array_equal(store.get(np.arange(20)), local[:20])
    reopened = LocalFeatureStore.open(tmp_path / "s", mode="a")
    reopened.append(local[20:], vecs[20:])
    assert len(reopened) == 40
    np.testing.assert_array_equal(reopened.get(np.arange(40)), local)  # 32 on disk, 8 in the buffer
    reopened.flush()
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["chunk_000000.16.npy", "chunk_000000.16.vec.npy", "chunk_000001.16.npy",
                     "chunk_000001.16.vec.npy", "chunk_000002.8.npy", "chunk_000002.8.vec.npy",
                     "manifest.json"]  # the superseded 4-row chunk is gone
    # identical to writing the 40 rows in one go
    make_once = LocalFeatureStore.create(tmp_path / "t", M, DIM, FP, chunk_size=CHUNK, vector_dim=VDIM)
    make_once.append(local, vecs)
    make_once.flush()
    for name in names:
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "t" / name).read_bytes()


def test_truncated_chunk_is_detected(tmp_path):
    make(tmp_path / "s")
    chunk = tmp_path / "s" / "chunk_000002.16.npy"
    chunk.write_bytes(chunk.read_bytes()[:-10])
    with pytest.raises(DeepEMDError, match="truncated, half-written") as err:
        LocalFeatureStore.open(tmp_path / "s")
    assert str(chunk) in str(err.value) and "fix:" in str(err.value)


def test_missing_chunk_is_detected(tmp_path):
    make(tmp_path / "s")
    (tmp_path / "s" / "chunk_000001.16.vec.npy").unlink()
    with pytest.raises(DeepEMDError, match="chunk file is missing"):
        LocalFeatureStore.open(tmp_path / "s")


def test_flipped_bytes_fail_verify(tmp_path):
    make(tmp_path / "s")
    chunk = tmp_path / "s" / "chunk_000003.16.npy"
    raw = bytearray(chunk.read_bytes())
    raw[-5] ^= 0x40
    chunk.write_bytes(bytes(raw))
    store = LocalFeatureStore.open(tmp_path / "s")  # same size: only the checksum can tell
    with pytest.raises(DeepEMDError, match="checksum does not match"):
        store.verify()


def test_manifest_problems(tmp_path):
    with pytest.raises(DeepEMDError, match="no feature store here"):
        LocalFeatureStore.open(tmp_path / "nothing")
    make(tmp_path / "s")
    manifest = tmp_path / "s" / "manifest.json"
    content = json.loads(manifest.read_text())
    content["chunks"][1]["rows"] = 5  # a short chunk in the middle
    manifest.write_text(json.dumps(content))
    with pytest.raises(DeepEMDError, match="chunk 1 with 5 rows"):
        LocalFeatureStore.open(tmp_path / "s")
    manifest.write_text('{"format": "deepemd-local-store", "version": 1')
    with pytest.raises(DeepEMDError, match="unreadable store manifest"):
        LocalFeatureStore.open(tmp_path / "s")


def test_fingerprint_and_shape_errors(tmp_path):
    make(tmp_path / "s")
    with pytest.raises(DeepEMDError, match="backbone: feature store has 'resnet12', expected 'resnet50'"):
        LocalFeatureStore.open(tmp_path / "s", expected_fingerprint={"backbone": "resnet50"})
    store = LocalFeatureStore.open(tmp_path / "s")
    with pytest.raises(DeepEMDError, match="read-only"):
        store.append(*data(1)[::-1])
    appendable = LocalFeatureStore.open(tmp_path / "s", mode="a")
    with pytest.raises(DeepEMDError, match=r"shape \(2, 4, 5\)"):
        appendable.append(np.zeros((2, M, 5), np.float16), np.zeros((2, VDIM), np.float32))
    with pytest.raises(IndexError, match="-1"):
        store.get(np.array([3, -1]))
    with pytest.raises(DeepEMDError, match="already exists"):
        LocalFeatureStore.create(tmp_path / "s", M, DIM, FP)


def test_leftovers_of_a_killed_write_are_ignored_and_removed(tmp_path):
    local, vecs = make(tmp_path / "s", n=32)
    # what a kill leaves: a temp file mid-write, and a renamed chunk the manifest never listed
    (tmp_path / "s" / ".chunk_000002.16.npy.abc.tmp").write_bytes(b"half")
    (tmp_path / "s" / "chunk_000002.16.npy").write_bytes(b"not listed")
    store = LocalFeatureStore.open(tmp_path / "s")
    assert len(store) == 32
    np.testing.assert_array_equal(store.get(np.arange(32)), local)
    LocalFeatureStore.open(tmp_path / "s", mode="a")
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if "000002" in p.name) == []


def test_build_store_resumes_and_rejects_a_different_build(tmp_path):
    local, vecs = data(50)
    calls = []

    def produce(start, stop):
        calls.append((start, stop))
        return vecs[start:stop], local[start:stop]

    build_store(tmp_path / "s", 20, produce, M, DIM, FP, chunk_size=CHUNK, vector_dim=VDIM, progress=False)
    store = build_store(tmp_path / "s", 50, produce, M, DIM, FP, chunk_size=CHUNK, vector_dim=VDIM, progress=False)
    assert calls == [(0, 16), (16, 20), (20, 32), (32, 48), (48, 50)]  # chunk-aligned, nothing redone
    np.testing.assert_array_equal(store.get(np.arange(50)), local)
    with pytest.raises(DeepEMDError, match="different settings"):
        build_store(tmp_path / "s", 50, produce, M, DIM, {"backbone": "other"}, chunk_size=CHUNK, vector_dim=VDIM)
    with pytest.raises(DeepEMDError, match="different shapes"):
        build_store(tmp_path / "s", 50, produce, M, DIM, FP, chunk_size=8, vector_dim=VDIM)
    with pytest.raises(DeepEMDError, match="more than the 10 requested"):
        build_store(tmp_path / "s", 10, produce, M, DIM, FP, chunk_size=CHUNK, vector_dim=VDIM)
