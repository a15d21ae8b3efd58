"""Property-based tests (hypothesis) for the feature store, the id map and a whole gallery:
random galleries, kills at random writes, random byte corruptions. The property everywhere is
"never a silent wrong result": either exactly the right answer or one DeepEMDError."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepemd.errors import DeepEMDError
from deepemd.retrieval.gallery import id_map_text, parse_id_map
from deepemd.retrieval.store import LocalFeatureStore, build_store

FP = {"backbone": "toy"}


@st.composite
def galleries(draw):
    """(local sets, vectors or None, chunk size, dtype) of a random small gallery."""
    n = draw(st.integers(1, 40))
    m, d = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    exponent = draw(st.floats(-30, 30))  # sets of any magnitude, each its own
    rng = np.random.default_rng(seed)
    local = (rng.standard_normal((n, m, d)) * 10.0 ** (exponent + rng.uniform(-3, 3, (n, 1, 1)))).astype(np.float32)
    vectors = rng.standard_normal((n, 3)).astype(np.float32) if draw(st.booleans()) else None
    return local, vectors, draw(st.integers(1, 9)), draw(st.sampled_from(["float16", "float32"]))


def write(path: Path, local, vectors, chunk: int, dtype: str, batches: list[int]) -> LocalFeatureStore:
    store = LocalFeatureStore.create(
        path,
        local.shape[1],
        local.shape[2],
        FP,
        chunk_size=chunk,
        vector_dim=None if vectors is None else 3,
        dtype=dtype,
    )
    start = 0
    for size in batches + [len(local)]:
        stop = min(len(local), start + size)
        if stop > start:
            store.append(local[start:stop], None if vectors is None else vectors[start:stop])
        start = stop
    store.flush()
    return store


def read_all(path: Path) -> list[np.ndarray]:
    store = LocalFeatureStore.open(path, expected_fingerprint=FP)
    n = len(store)
    out = [store.get(np.arange(n)), store.get(np.arange(n)[::-1]), np.concatenate([c for _, c in store.iter_chunks()])]
    if store.vector_dim is not None:
        out += [store.get_vectors(np.arange(n)), np.concatenate([c for _, c in store.iter_chunks(vectors=True)])]
    return out


@settings(max_examples=30, deadline=None)
@given(galleries(), st.lists(st.integers(1, 12), max_size=5))
def test_store_round_trip_or_refusal(gallery, batches):
    local, vectors, chunk, dtype = gallery
    with tempfile.TemporaryDirectory() as tmp:
        try:
            write(Path(tmp) / "s", local, vectors, chunk, dtype, batches)
        except DeepEMDError as err:  # float16 cannot hold a set spanning more than its range
            assert dtype == "float16" and "--store-dtype float32" in str(err)
            return
        got = read_all(Path(tmp) / "s")
    if dtype == "float32":
        np.testing.assert_array_equal(got[0], local)
    else:
        exact = local.astype(np.float64)
        node = np.linalg.norm(exact, axis=2)
        assert (np.linalg.norm(got[0] - exact, axis=2) <= 1e-2 * node).all()
    np.testing.assert_array_equal(got[1], got[0][::-1])
    np.testing.assert_array_equal(got[2], got[0])
    if vectors is not None:
        np.testing.assert_array_equal(got[3], vectors)
        np.testing.assert_array_equal(got[4], vectors)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_random_byte_corruption_is_an_error_or_harmless(data):
    local, vectors, chunk, _ = data.draw(galleries())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s"
        write(path, local, vectors, chunk, "float32", [])
        want = read_all(path)
        victim = data.draw(st.sampled_from(sorted(p for p in path.iterdir() if p.is_file())))
        raw = bytearray(victim.read_bytes())
        offset = data.draw(st.integers(0, len(raw) - 1))
        raw[offset] ^= data.draw(st.integers(1, 255))
        victim.write_bytes(bytes(raw))
        try:
            got = read_all(path)
        except DeepEMDError as err:
            assert "Traceback" not in str(err)
            return
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)  # a harmless byte (JSON whitespace, header padding)


class Killed(Exception):
    """Stands in for SIGKILL at a rename: nothing after it happens."""


@settings(max_examples=25, deadline=None)
@given(galleries(), st.integers(0, 30))
def test_a_build_killed_at_any_write_resumes_to_the_same_store(gallery, kill_at):
    local, vectors, chunk, dtype = gallery
    dtype = "float32"  # the refusal is the other test's business

    def produce(start, stop):
        return local[start:stop] if vectors is None else (vectors[start:stop], local[start:stop])

    def build(path):
        return build_store(
            path,
            len(local),
            produce,
            local.shape[1],
            local.shape[2],
            FP,
            chunk_size=chunk,
            vector_dim=None if vectors is None else 3,
            progress=False,
            dtype=dtype,
        )

    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp) / "ref")
        calls = {"n": 0}
        replace = os.replace

        def dying_replace(src, dst):
            calls["n"] += 1
            if calls["n"] > kill_at:
                raise Killed
            replace(src, dst)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "replace", dying_replace)
            with contextlib.suppress(Killed):
                build(Path(tmp) / "run")
        build(Path(tmp) / "run")
        ref = {p.name: p.read_bytes() for p in (Path(tmp) / "ref").iterdir()}
        run = {p.name: p.read_bytes() for p in (Path(tmp) / "run").iterdir()}
        assert run == ref


names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1, max_size=12)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(names, min_size=1, max_size=3), min_size=1, max_size=6), st.booleans())
def test_id_map_round_trip_from_any_working_directory(parts, relative):
    """Paths survive write -> read exactly, from another working directory; names an id-map line
    cannot hold (control characters) are refused when writing, never written."""
    paths = [Path(*p) for p in parts]
    paths = [p for p in paths if p.name not in (".", "..") and all(s not in (".", "..") for s in p.parts)]
    if not paths:
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "gallery").mkdir()
        (base / "elsewhere").mkdir()
        with contextlib.chdir(base):
            given_paths = [Path("data") / p if relative else base / "data" / p for p in paths]
            ids = np.arange(len(paths)) * 7 - 3
            try:
                text = id_map_text(base / "gallery", ids, given_paths)
            except DeepEMDError as err:
                assert "control character" in str(err)
                assert any(ord(ch) < 32 or 127 <= ord(ch) < 160 for p in paths for ch in str(p))
                return
        with contextlib.chdir(base / "elsewhere"):
            got_ids, got_paths = parse_id_map(text, base / "gallery", base / "gallery" / "ids.txt")
    np.testing.assert_array_equal(got_ids, ids)
    assert got_paths == [Path(os.path.normpath(base / "data" / p)) for p in paths]


@pytest.mark.slow
def test_a_random_byte_corruption_of_a_whole_gallery_never_changes_a_search(tmp_path):
    """Every file of a real gallery (id map, sources, manifests, index, chunks): a flipped byte
    gives the original search results or one DeepEMDError. Seeded draws, 12 of them."""
    from conftest import make_class_folders
    from test_gallery_transactions import index, search

    data = make_class_folders(tmp_path / "data", ["a", "b", "c"], 3)
    index(data, tmp_path / "g")
    want = search(tmp_path / "g", data / "a", tmp_path / "s")
    rng = np.random.default_rng(11)
    files = sorted(p.relative_to(tmp_path / "g") for p in (tmp_path / "g").rglob("*") if p.is_file())
    outcomes = []
    for trial in range(12):
        copy = tmp_path / f"g{trial}"
        shutil.copytree(tmp_path / "g", copy)
        victim = copy / files[trial % len(files)]
        raw = bytearray(victim.read_bytes())
        raw[int(rng.integers(len(raw)))] ^= int(rng.integers(1, 256))
        victim.write_bytes(bytes(raw))
        try:
            got = search(copy, data / "a", tmp_path / f"s{trial}")
        except DeepEMDError:
            outcomes.append("error")
            continue
        assert got == want, victim
        outcomes.append("same")
    assert "error" in outcomes
