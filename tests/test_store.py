"""The chunked, memory-mapped local-feature store (deepemd.retrieval.store).

The oracle is the in-memory array that was appended: every read must return those rows (exactly
for float32 stores, within float16's relative precision of each set's largest value for float16
stores, at any magnitude), and every way the files can disagree with the manifest must be an
error naming the file.
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
    return (rng.standard_normal((n, M, DIM)).astype(np.float16), rng.standard_normal((n, VDIM)).astype(np.float32))


def close(got: np.ndarray, want: np.ndarray) -> None:
    """float16 keeps 11 bits relative to each set's largest value (the set's own scale)."""
    peak = np.abs(want).reshape(len(want), -1).max(axis=1)[:, None, None]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * peak.max() if want.size else 0)
    assert (np.abs(got - want) <= 2.0**-11 * 2 * peak).all()


def make(path, n: int = 100, vectors: bool = True) -> tuple[np.ndarray, np.ndarray]:
    local, vecs = data(n)
    store = LocalFeatureStore.create(path, M, DIM, FP, chunk_size=CHUNK, vector_dim=VDIM if vectors else None)
    for start in range(0, n, 7):  # batches that do not line up with chunks
        store.append(local[start : start + 7], vecs[start : start + 7] if vectors else None)
    store.flush()
    return local, vecs


def test_round_trip_random_ids(tmp_path):
    local, vecs = make(tmp_path / "s")
    store = LocalFeatureStore.open(tmp_path / "s", expected_fingerprint=FP)
    assert len(store) == 100 and store.m == M and store.d == DIM
    ids = np.random.default_rng(1).integers(0, 100, 300)  # repeats, every chunk, any order
    got = store.get(ids)
    assert got.dtype == np.float32 and got.shape == (300, M, DIM)
    close(got, local[ids].astype(np.float32))
    np.testing.assert_array_equal(store.get_vectors(ids), vecs[ids])
    assert store.get(np.array([], dtype=np.int64)).shape == (0, M, DIM)
    starts = [start for start, _ in store.iter_chunks()]
    assert starts == list(range(0, 100, CHUNK))
    np.testing.assert_array_equal(np.concatenate([c for _, c in store.iter_chunks()]), store.get(np.arange(100)))
    store.verify()


def test_stored_rows_times_their_scales_are_the_sets_in_ids_order(tmp_path):
    """get_stored reads each row straight into its slot (scatter reads, at most READ_ROWS rows
    a read): any order, repeats, runs longer than one read, rows still in the write buffer."""
    from deepemd.retrieval import store as store_module

    n = 3 * store_module.READ_ROWS + 5
    local, _ = data(n)
    local = (local.astype(np.float32) * np.geomspace(1e-3, 1e3, n)[:, None, None]).astype(np.float32)
    store = LocalFeatureStore.create(tmp_path / "s", M, DIM, FP, chunk_size=2 * store_module.READ_ROWS + 3)
    store.append(local)  # one full chunk on disk, the rest unflushed
    for ids in (np.arange(n), np.random.default_rng(2).integers(0, n, 500), np.array([n - 1, 0, n - 1, 3])):
        rows, scales = store.get_stored(ids)
        assert rows.dtype == np.float16 and scales.dtype == np.float32 and scales.shape == ids.shape
        close(rows.astype(np.float32) * scales[:, None, None], local[ids])
        np.testing.assert_array_equal(rows.astype(np.float32) * scales[:, None, None], store.get(ids))


def test_chunk_files_and_manifest(tmp_path):
    make(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert [c["rows"] for c in manifest["chunks"]] == [16] * 6 + [4]
    assert manifest["fingerprint"] == FP and manifest["dtype"] == "<f2" and manifest["version"] == 2
    first = np.load(tmp_path / "s" / manifest["chunks"][0]["file"], mmap_mode="r")
    assert isinstance(first, np.memmap) and first.shape == (CHUNK, M, DIM)


def test_flush_then_append_refills_the_short_chunk(tmp_path):
    local, vecs = data(40)
    store = LocalFeatureStore.create(tmp_path / "s", M, DIM, FP, chunk_size=CHUNK, vector_dim=VDIM)
    store.append(local[:20], vecs[:20])
    store.flush()  # chunks of 16 + 4
    close(store.get(np.arange(20)), local[:20])
    reopened = LocalFeatureStore.open(tmp_path / "s", mode="a")
    reopened.append(local[20:], vecs[20:])
    assert len(reopened) == 40
    close(reopened.get(np.arange(40)), local)  # 32 on disk, 8 in the buffer
    reopened.flush()
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == [
        f"chunk_00000{i}.{n}.{kind}" for i, n in ((0, 16), (1, 16), (2, 8)) for kind in ("npy", "rows.npy", "vec.npy")
    ] + ["manifest.json"]  # the 4-row chunk is gone
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


def flip(path, offset: int, value: int | None = None, xor: int = 0x40) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] = value if value is not None else raw[offset] ^ xor
    path.write_bytes(bytes(raw))


# which reads touch which file of a chunk: every read that touches the damaged file must fail
TOUCHES = {
    "get": {"npy", "rows"},
    "get_vectors": {"vec", "rows"},
    "iter_chunks": {"npy", "rows"},
    "iter_vectors": {"vec"},
    "verify": {"npy", "rows", "vec"},
}


@pytest.mark.parametrize("kind", ["npy", "vec", "rows"])
def test_a_flipped_byte_is_caught_by_every_read(tmp_path, kind):
    """Finding 2: one flipped byte changed a search score silently; now every read checks."""
    make(tmp_path / "s")
    chunk = tmp_path / "s" / ("chunk_000003.16.npy" if kind == "npy" else f"chunk_000003.16.{kind}.npy")
    flip(chunk, -5)  # inside the last row of chunk 3
    store = LocalFeatureStore.open(tmp_path / "s")  # same size: only the checksum can tell
    row = np.array([4 * CHUNK - 1])
    reads = {
        "get": lambda: store.get(row),
        "get_vectors": lambda: store.get_vectors(row),
        "iter_chunks": lambda: list(store.iter_chunks()),
        "iter_vectors": lambda: list(store.iter_chunks(vectors=True)),
        "verify": store.verify,
    }
    for name, read in reads.items():
        if kind in TOUCHES[name]:
            with pytest.raises(DeepEMDError, match="feature store corrupted") as err:
                read()
            assert str(chunk) in str(err.value) and "--repair" in str(err.value), name
        else:
            read()
    fresh = LocalFeatureStore.open(tmp_path / "s")
    assert fresh.get(np.arange(3 * CHUNK)).shape == (3 * CHUNK, M, DIM)  # undamaged chunks still read


def test_nan_written_over_a_value_is_store_corruption_not_a_network_problem(tmp_path):
    """Finding 2: a byte flipped to NaN was blamed on the network output, naming no file."""
    make(tmp_path / "s")
    chunk = tmp_path / "s" / "chunk_000001.16.npy"
    flip(chunk, -1, value=0x7E)  # high byte of the last float16: 0x7Exx is a NaN
    store = LocalFeatureStore.open(tmp_path / "s")
    with pytest.raises(DeepEMDError) as err:
        store.get(np.array([2 * CHUNK - 1]))
    assert "feature store corrupted" in str(err.value) and str(chunk) in str(err.value)
    assert "network" not in str(err.value)


def test_nan_from_the_network_is_refused_before_writing(tmp_path):
    local, vecs = data(5)
    local = local.astype(np.float32)
    local[2, 1, 3] = np.nan
    store = LocalFeatureStore.create(tmp_path / "s", M, DIM, FP, chunk_size=CHUNK, vector_dim=VDIM)
    with pytest.raises(DeepEMDError, match="NaN or inf.*row 2"):
        store.append(local, vecs)
    assert len(store) == 0


@pytest.mark.parametrize("magnitude", [1e-30, 1e-8, 1.0, 1e8, 1e30])
def test_float16_store_keeps_sets_of_any_magnitude(tmp_path, magnitude):
    """Finding 10a: features ~1e-8 were stored as 99.99% zeros; each set now carries its scale."""
    rng = np.random.default_rng(3)
    local = (magnitude * rng.random((40, M, DIM))).astype(np.float32)
    store = LocalFeatureStore.create(tmp_path / "s", M, DIM, FP, chunk_size=CHUNK)
    store.append(local)
    store.flush()
    got = LocalFeatureStore.open(tmp_path / "s").get(np.arange(40))
    np.testing.assert_allclose(got, local, rtol=2.0**-10, atol=magnitude * 2.0**-11)
    assert (got != 0).mean() > 0.99


def test_float16_refuses_a_set_wider_than_its_range_and_float32_keeps_it(tmp_path):
    local = np.random.default_rng(4).random((3, M, DIM)).astype(np.float32)
    local[1, 2] *= 1e-9  # one node a billion times smaller than its neighbours
    store = LocalFeatureStore.create(tmp_path / "h", M, DIM, FP, chunk_size=CHUNK)
    with pytest.raises(DeepEMDError, match="float16 cannot hold.*node 2 of row 1") as err:
        store.append(local)
    assert "--store-dtype float32" in str(err.value)
    exact = LocalFeatureStore.create(tmp_path / "f", M, DIM, FP, chunk_size=CHUNK, dtype="float32")
    exact.append(local)
    exact.flush()
    np.testing.assert_array_equal(LocalFeatureStore.open(tmp_path / "f").get(np.arange(3)), local)


def test_a_damaged_header_is_not_read_as_another_dtype(tmp_path):
    make(tmp_path / "s")
    chunk = tmp_path / "s" / "chunk_000000.16.npy"
    raw = chunk.read_bytes()
    chunk.write_bytes(raw.replace(b"'<f2'", b"'<i2'", 1))  # same size, same bytes, other meaning
    store = LocalFeatureStore.open(tmp_path / "s")
    with pytest.raises(DeepEMDError, match="header of chunk 0"):
        list(store.iter_chunks())


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
    local, _ = make(tmp_path / "s", n=32)
    # what a kill leaves: a temp file mid-write, and a renamed chunk the manifest never listed
    (tmp_path / "s" / ".chunk_000002.16.npy.abc.tmp").write_bytes(b"half")
    (tmp_path / "s" / "chunk_000002.16.npy").write_bytes(b"not listed")
    store = LocalFeatureStore.open(tmp_path / "s")
    assert len(store) == 32
    close(store.get(np.arange(32)), local)
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
    close(store.get(np.arange(50)), local)
    with pytest.raises(DeepEMDError, match="different settings"):
        build_store(tmp_path / "s", 50, produce, M, DIM, {"backbone": "other"}, chunk_size=CHUNK, vector_dim=VDIM)
    with pytest.raises(DeepEMDError, match="different shapes"):
        build_store(tmp_path / "s", 50, produce, M, DIM, FP, chunk_size=8, vector_dim=VDIM)
    with pytest.raises(DeepEMDError, match="more than the 10 requested"):
        build_store(tmp_path / "s", 10, produce, M, DIM, FP, chunk_size=CHUNK, vector_dim=VDIM)
