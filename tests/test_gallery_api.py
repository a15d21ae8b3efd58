"""``Gallery.open(path).search(...)``: the Python API of the main job, agreeing with the CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import TINY, make_class_folders

from deepemd.cli import main
from deepemd.errors import DeepEMDError
from deepemd.retrieval import Gallery


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_class_folders(tmp_path_factory.mktemp("api") / "folder", [f"class_{c}" for c in "abcd"], 5)


@pytest.fixture(scope="module")
def gallery(images):
    out = images.parent / "gallery"
    assert main(["retrieval", "index", "--data-root", str(images), "--split", "all", *TINY, "--out", str(out)]) == 0
    return out


def test_open_rebuilds_the_network_and_matches_the_cli_search(gallery, images, tmp_path, monkeypatch):
    queries = sorted(images.rglob("*.png"))[:3]
    assert (
        main(
            [
                "retrieval",
                "search",
                "--gallery",
                str(gallery),
                "--queries",
                *map(str, queries[:1]),
                *TINY,
                "--top",
                "4",
                "--out",
                str(tmp_path / "cli"),
            ]
        )
        == 0
    )
    with open(tmp_path / "cli" / "search.csv") as fh:
        cli_ids = [int(row["id"]) for row in csv.DictReader(fh)]
    monkeypatch.chdir(tmp_path)  # the recorded options hold no path relative to where index ran
    opened = Gallery.open(gallery)
    top = opened.search(queries, k=4)
    assert top.ids.shape == (3, 4) and list(top.ids[0]) == cli_ids
    assert [opened.paths[int(r)] for r in opened.rows(top.ids[:, 0])] == queries  # each image finds itself first
    raw = opened.search(queries, k=4, rerank=False)
    assert set(raw.ids[0]) <= set(range(len(opened.ids)))
    with pytest.raises(DeepEMDError, match="no local sets to rerank"):
        opened.search(np.zeros((1, opened.index.d), np.float32))


def test_a_gallery_without_recorded_options_names_the_fix(gallery, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(gallery, old)
    manifest = json.loads((old / "gallery.json").read_text())
    manifest.pop("options")
    (old / "gallery.json").write_text(json.dumps(manifest))
    with pytest.raises(DeepEMDError, match="does not record the options"):
        Gallery.open(old)
