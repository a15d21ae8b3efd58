"""`retrieval search` over a built gallery as a new user runs it: the gallery's own network
options, clear refusals before any network loads, an index rebuilt from the stored vectors, bad
queries skipped on request, and result rows that say which score they carry."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from conftest import TINY, make_class_folders

from deepemd.cli import main
from deepemd.errors import DeepEMDError
from deepemd.retrieval import Gallery
from deepemd.retrieval.build import local_specs, make_embedder
from deepemd.retrieval.config import SearchConfig
from deepemd.retrieval.gallery import open_gallery


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_class_folders(tmp_path_factory.mktemp("opts") / "folder", [f"class_{c}" for c in "abcd"], 5)


@pytest.fixture(scope="module")
def gallery(images) -> Path:
    out = images.parent / "gallery"
    assert main(["retrieval", "index", "--data-root", str(images), "--split", "all", *TINY, "--out", str(out)]) == 0
    return out


def search(gallery: Path, queries: Path, out: Path, *flags: str) -> int:
    return main(
        ["retrieval", "search", "--gallery", str(gallery), "--queries", str(queries), "--out", str(out), *flags]
    )


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "search.csv") as fh:
        return list(csv.DictReader(fh))


def test_search_needs_no_repeat_of_the_index_flags(gallery, images, tmp_path):
    query = images / "class_b" / "img01.png"
    assert search(gallery, query, tmp_path / "bare") == 0
    assert search(gallery, query, tmp_path / "flags", *TINY) == 0
    bare, flags = read_rows(tmp_path / "bare"), read_rows(tmp_path / "flags")
    assert [r["id"] for r in bare] == [r["id"] for r in flags]
    assert bare[0]["path"] == str(query)  # the image finds itself first: the same network embedded it


def test_a_clashing_flag_is_refused_before_any_network_loads(gallery, images, tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was built before the options were checked")

    monkeypatch.setattr("deepemd.retrieval.search.make_embedder", no_network)
    assert search(gallery, images / "class_a", tmp_path / "s", "--image-size", "48", "--num-patches", "25") == 2
    err = capsys.readouterr().err
    assert "the gallery was built with --image-size 32 (this search: --image-size 48)" in err
    assert "--num-patches" not in err  # an option FCN sets do not depend on is no clash
    assert "fix: leave those flags out" in err and err.count("\n") == 2


def test_a_lost_index_is_rebuilt_by_index_without_repair(gallery, images, tmp_path, capsys):
    copy = gallery.with_name("gallery-lost-index")  # beside it: ids.txt paths are relative to the folder
    shutil.copytree(gallery, copy)
    (copy / "index.faiss").unlink()
    assert search(copy, images / "class_a", tmp_path / "s1") == 2
    err = capsys.readouterr().err
    assert f"run `deepemd retrieval index --out {copy}` again" in err and "--repair" not in err
    assert main(["retrieval", "index", "--data-root", str(images), "--split", "all", *TINY, "--out", str(copy)]) == 0
    assert "0 embedded, 20 reused" in capsys.readouterr().out
    assert search(copy, images / "class_a", tmp_path / "s2") == 0
    assert search(gallery, images / "class_a", tmp_path / "s3") == 0
    assert read_rows(tmp_path / "s2") == read_rows(tmp_path / "s3")


def test_skip_bad_drops_an_unreadable_query_with_one_warning(gallery, images, tmp_path, capsys):
    queries = tmp_path / "queries"
    shutil.copytree(images / "class_c", queries)
    (queries / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    assert search(gallery, queries, tmp_path / "s1") == 2
    assert "--skip-bad" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="skipped 1 of 6 images"):
        assert search(gallery, queries, tmp_path / "s2", "--skip-bad") == 0
    assert {Path(r["query"]).name for r in read_rows(tmp_path / "s2")} == {f"img{i:02d}.png" for i in range(5)}


def test_results_past_the_rerank_depth_carry_only_their_global_score(gallery, images, tmp_path):
    assert search(gallery, images / "class_d" / "img00.png", tmp_path / "s", "--top", "6", "--rerank-k", "3") == 0
    rows = read_rows(tmp_path / "s")
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert all(r["score"] for r in rows[:3]) and not any(r["score"] for r in rows[3:])
    assert all(r["global_score"] for r in rows)
    assert [r["raw_rank"] for r in rows[3:]] == ["4", "5", "6"]  # behind the depth: FAISS order kept
    assert "|  |" in (tmp_path / "s" / "search.md").read_text()  # an empty cell, not "nan"


def test_gallery_search_takes_a_folder_a_file_or_refuses_an_empty_list(gallery, images):
    opened = Gallery.open(gallery)
    folder = sorted((images / "class_a").glob("*.png"))
    assert (opened.search(str(images / "class_a"), k=3).ids == opened.search(folder, k=3).ids).all()
    assert opened.search(folder[0], k=3).ids.shape == (1, 3)
    with pytest.raises(DeepEMDError, match="no queries given"):
        opened.search([], k=3)


# CPUs without bf16 warn that it is emulated (that warning is tested in test_inference_dtype)
@pytest.mark.filterwarnings("ignore:.*bfloat16 is emulated:UserWarning")
def test_a_model_in_another_dtype_is_refused_by_the_gallery(images, tmp_path):
    out = tmp_path / "bf16"
    flags = [*TINY, "--inference-dtype", "bfloat16", "--out", str(out)]
    assert main(["retrieval", "index", "--data-root", str(images), "--split", "all", *flags]) == 0
    cfg = SearchConfig(backbone="resnet12", backbone_widths=(8, 8, 8, 8), weights="none", image_size=32, pyramid=(2, 1))
    with pytest.raises(DeepEMDError, match="extracted in bfloat16, this model runs in float32"):
        open_gallery(out, make_embedder(cfg, local_specs(cfg, ["fcn"])), "fcn")
