"""Gallery writes as transactions, incremental index, verified reads, id-map paths (issue 11).

Each test names the finding it pins down. The oracle for an incremental or repaired gallery is
a fresh build over the same images: the search results (paths, order, scores) must agree.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_class_folders, write_image

from deepemd.errors import DeepEMDError
from deepemd.retrieval.config import IndexConfig, SearchConfig
from deepemd.retrieval.search import run_index, run_search

MODEL = {"backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": 32, "pyramid": (2, 1), "batch_size": 16}


def index(data: Path | str, out: Path | str, **kw) -> dict:
    return run_index(IndexConfig(data_root=str(data), out=str(out), split="all", **{**MODEL, **kw}), progress=False)


def search(gallery: Path | str, queries: Path | str, out: Path | str, **kw) -> list[tuple[str, int, str, float]]:
    rows = run_search(
        SearchConfig(gallery=str(gallery), queries=str(queries), out=str(out), top=5, rerank_k=10, **{**MODEL, **kw}),
        progress=False,
    )["rows"]
    return [(Path(r["query"]).name, r["rank"], str(r["path"]), r["score"]) for r in rows]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_results(a, b, atol: float = 1e-4) -> None:
    """Same queries, ranks and paths; scores equal up to the network's batch-composition rounding."""
    assert [r[:3] for r in a] == [r[:3] for r in b]
    np.testing.assert_allclose([r[3] for r in a], [r[3] for r in b], atol=atol)


@pytest.fixture
def data(tmp_path) -> Path:
    return make_class_folders(tmp_path / "data", [f"class_{c}" for c in "abcd"], 5)


@pytest.fixture
def built(data, tmp_path):
    out = tmp_path / "g"
    index(data, out)
    return out, search(out, data / "class_b", tmp_path / "s0")


def test_a_failed_index_leaves_the_previous_gallery_exactly_as_it_was(built, data, tmp_path):
    """Finding 1: a failing second `index` had already rewritten ids.txt, and search refused."""
    out, before = built
    snapshot = files(out)
    (data / "class_a" / "zz_bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")  # fails while embedding
    with pytest.raises(DeepEMDError, match="cannot read image"):
        index(data, out)
    assert files(out) == snapshot
    assert search(out, data / "class_b", tmp_path / "s1") == before


def test_incremental_index_embeds_only_new_images_and_equals_a_fresh_build(built, data, tmp_path):
    out, _ = built
    write_image(data / "class_a" / "img02b.png", seed=901)  # lands in the middle of the sorted list
    write_image(data / "class_e" / "new.png", seed=902)  # a new class at the end
    result = index(data, out)
    assert (result["reused"], result["embedded"]) == (20, 2)
    fresh = tmp_path / "fresh"
    assert index(data, fresh)["embedded"] == 22
    same_results(search(out, data / "class_a", tmp_path / "s1"), search(fresh, data / "class_a", tmp_path / "s2"))
    assert (out / "ids.txt").read_bytes() == (fresh / "ids.txt").read_bytes()  # relative to each gallery
    os.utime(data / "class_b" / "img01.png", ns=(1, 1))  # a touched file counts as changed
    again = index(data, out)
    assert (again["reused"], again["embedded"]) == (21, 1)


def test_changed_image_is_embedded_again(built, data, tmp_path):
    out, _ = built
    write_image(data / "class_c" / "img00.png", size=(30, 30), seed=777)  # same name, new content
    result = index(data, out)
    assert (result["reused"], result["embedded"]) == (19, 1)
    fresh = tmp_path / "fresh"
    index(data, fresh)
    same_results(search(out, data / "class_c", tmp_path / "s1"), search(fresh, data / "class_c", tmp_path / "s2"))


def flip_last_byte_of_a_chunk(gallery: Path) -> Path:
    chunk = min((gallery / "local").glob("chunk_*.[0-9]*[0-9].npy"))
    raw = bytearray(chunk.read_bytes())
    raw[-3] ^= 0x10
    chunk.write_bytes(bytes(raw))
    return chunk


def test_corrupt_chunk_is_refused_by_search_and_index_and_repaired(built, data, tmp_path):
    """Finding 2: a flipped byte changed a score silently, and `index` kept the bad chunk."""
    out, before = built
    chunk = flip_last_byte_of_a_chunk(out)
    with pytest.raises(DeepEMDError, match="feature store corrupted") as err:
        search(out, data / "class_d", tmp_path / "s1")  # the last row: an image of class_d
    assert str(chunk) in str(err.value) and "--repair" in str(err.value)
    damaged = files(out)
    with pytest.raises(DeepEMDError, match="feature store corrupted"):
        index(data, out)
    assert files(out) == damaged  # refused, nothing written
    result = index(data, out, repair=True)
    assert (result["embedded"], result["reused"]) == (1, 19)  # only the row that fails its own CRC
    same_results(search(out, data / "class_b", tmp_path / "s2"), before)
    search(out, data / "class_d", tmp_path / "s3")


def test_id_map_paths_are_relative_to_the_id_map_from_any_working_directory(data, tmp_path, monkeypatch):
    """Finding 3: ids.txt was written relative to the cwd but read relative to its folder."""
    work = tmp_path / "work"
    (work / "data4").mkdir(parents=True)
    os.rename(data, work / "data4" / "d")
    monkeypatch.chdir(work)
    index("data4/d", "g1")
    rows = search("g1", "data4/d/class_b", "out")
    assert rows and all(Path(path).is_file() for _, _, path, _ in rows)
    assert (work / "g1" / "ids.txt").read_text().splitlines()[0] == "0\t../data4/d/class_a/img00.png"
    monkeypatch.chdir(tmp_path)
    again = search(work / "g1", work / "data4" / "d" / "class_b", "out2")
    assert [(q, r, str(Path(p).resolve())) for q, r, p, _ in again] == [
        (q, r, str((work / p).resolve())) for q, r, p, _ in rows
    ]


def users_index(images: list[Path], tmp: Path, ids_file: Path, relative: bool = True) -> tuple[Path, np.ndarray]:
    """A user's own IndexIDMap (ids 500+) over the deepemd global vectors, and its id map file."""
    import faiss

    from deepemd.data import ImageList
    from deepemd.retrieval.build import local_specs, make_embedder, make_loader
    from deepemd.retrieval.model import embed_loader

    cfg = SearchConfig(**MODEL)
    model = make_embedder(cfg, local_specs(cfg, ["fcn"]))
    listed = ImageList(images, np.zeros(len(images), np.int64), ["x"], Path("."))
    vectors, _, _ = embed_loader(model, make_loader(listed, model, 16, 0), torch.device("cpu"), progress=False)
    ids = 500 + np.arange(len(images), dtype=np.int64)
    index = faiss.IndexIDMap(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(vectors, ids)
    faiss.write_index(index, str(tmp / "mine.faiss"))
    names = [os.path.relpath(p, ids_file.parent) if relative else str(p) for p in images]
    ids_file.write_text("".join(f"{i}\t{n}\n" for i, n in zip(ids, names)))
    return tmp / "mine.faiss", ids


def test_users_index_with_a_relative_id_map_and_id_map_disagreement(data, tmp_path, monkeypatch):
    """Findings 3 and 4: the own-index route had the same path fault, and a second --id-map
    was silently ignored once the store existed (a reversed map printed the old paths)."""
    images = sorted(data.rglob("*.png"))
    maps = tmp_path / "maps"
    maps.mkdir()
    mine, _ = users_index(images, tmp_path, maps / "ids.txt")
    monkeypatch.chdir(data / "class_c")  # neither the id map's folder nor the gallery's
    kw = {"index": str(mine), "id_map": str(maps / "ids.txt")}
    rows = search(tmp_path / "store", data / "class_a", tmp_path / "s1", **kw)
    top1 = {q: (Path(p), r) for q, r, p, _ in rows if r == 1}
    assert {q: p for q, (p, _) in top1.items()} == {p.name: p for p in sorted((data / "class_a").iterdir())}
    reversed_map = maps / "reversed.txt"
    lines = (maps / "ids.txt").read_text().splitlines()
    reversed_map.write_text(
        "".join(f"{a.split(chr(9))[0]}\t{b.split(chr(9))[1]}\n" for a, b in zip(lines, lines[::-1]))
    )
    with pytest.raises(DeepEMDError, match="--id-map disagrees with the feature store") as err:
        search(tmp_path / "store", data / "class_a", tmp_path / "s2", index=str(mine), id_map=str(reversed_map))
    assert str(reversed_map) in str(err.value) and "retrieval index" in str(err.value)
    # the fix the message names: `index` updates the store for the new map (rows reused by image)
    result = run_index(
        IndexConfig(index=str(mine), id_map=str(reversed_map), out=str(tmp_path / "store"), **MODEL), progress=False
    )
    assert (result["reused"], result["embedded"]) == (len(images), 0)
    flipped = search(tmp_path / "store", data / "class_a", tmp_path / "s3", index=str(mine), id_map=str(reversed_map))
    assert {q: Path(p) for q, r, p, _ in flipped if r == 1} != {q: p for q, (p, _) in top1.items()}


def test_a_newline_in_a_file_name_is_refused_at_index_time(data, tmp_path):
    """Finding 11: a newline in a file name made `index` write an id map that `search` rejected."""
    out = tmp_path / "g"
    index(data, out)
    snapshot = files(out)
    odd = write_image(data / "class_a" / "two\nlines.png", seed=5)
    with pytest.raises(DeepEMDError, match="control character") as err:
        index(data, out)
    assert repr(str(odd.resolve()))[1:-1] in str(err.value) or "two\\nlines" in str(err.value)
    assert "rename the file" in str(err.value)
    assert files(out) == snapshot


def test_tiny_features_give_the_right_nonzero_rerank_scores(data, tmp_path):
    """Finding 10a: EfficientNet-Lite0 with --weights none has features ~1e-9; float16 stored them
    as zeros and every rerank score was 0. The oracle reranks the network's float32 sets held in
    memory with the same code: the store must not change a score."""
    from deepemd.retrieval.build import local_specs, make_embedder
    from deepemd.retrieval.gallery import Gallery, make_producer, search_gallery
    from deepemd.retrieval.rerank import RerankSettings

    out = tmp_path / "g"
    gallery = index(data, out, weights="none")["gallery"]
    cfg = IndexConfig(**{**MODEL, "weights": "none"})
    model = make_embedder(cfg, local_specs(cfg, ["fcn"]))
    vectors, sets = make_producer(model, "fcn", gallery.paths, 16, 0, torch.device("cpu"), True)(
        np.arange(len(gallery.paths))
    )
    assert 0 < np.abs(sets).max() < 1e-6  # the premise: tiny features
    stored = gallery.store.get(np.arange(len(sets)))
    np.testing.assert_allclose(stored, sets, rtol=0, atol=2e-3 * np.abs(sets).max())
    assert (stored != 0).mean() > 0.5

    class InMemory:
        fingerprint = gallery.store.fingerprint

        @staticmethod
        def get(rows):
            return sets[rows]

    memory = Gallery(gallery.index, InMemory(), gallery.ids, gallery.paths)
    settings = RerankSettings(depth=10)
    queries = np.arange(0, len(sets), 4)
    want, want_ids, _ = search_gallery(memory, vectors[queries], sets[queries], 5, settings)
    got, got_ids, _ = search_gallery(gallery, vectors[queries], sets[queries], 5, settings)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got, want, rtol=1e-3)
    finite = np.isfinite(got)
    assert (got[finite] != 0).all() and len(np.unique(np.round(got[finite], 4))) > 5  # not all one value
    rows = search(out, data / "class_b" / "img01.png", tmp_path / "s", weights="none")  # the CLI route
    assert all(score != 0 for *_, score in rows)


def test_a_second_writer_gets_one_clear_error(built, data):
    """The lock is held here the way another process holds it: an flock on the lock file."""
    import fcntl

    from deepemd.retrieval.transaction import lock_path

    out, _ = built
    snapshot = files(out)
    write_image(data / "class_a" / "later.png", seed=3)
    fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b'{"pid": 4242, "host": "elsewhere", "command": "deepemd retrieval index ..."}')
        with pytest.raises(DeepEMDError, match="another deepemd run is writing this gallery") as err:
            index(data, out)
        assert '"pid": 4242' in str(err.value) and str(out) in str(err.value)
    finally:
        os.close(fd)  # releases the flock, as a process's death does
    assert files(out) == snapshot
    assert index(data, out)["embedded"] == 1
