"""Gallery round trip (index + store reopened in a new process), a user's own FAISS index, and
the errors for mismatched or missing pieces."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from deepemd.errors import DeepEMDError
from deepemd.retrieval.config import IndexConfig, SearchConfig
from deepemd.retrieval.search import run_index, run_search

MODEL = dict(backbone="efficientnet_lite0", weights="imagenet", image_size=64, pyramid=(2, 1), batch_size=16)


@pytest.fixture
def gallery(folder_dataset, tmp_path):
    run_index(IndexConfig(data_root=str(folder_dataset), out=str(tmp_path / "g"), **MODEL), progress=False)
    return tmp_path / "g"


def search_cfg(gallery: Path, queries: Path, out: Path, **kw) -> SearchConfig:
    return SearchConfig(gallery=str(gallery), queries=str(queries), out=str(out), top=5, rerank_k=10, **{**MODEL, **kw})


ROUND_TRIP = textwrap.dedent("""
    import json, sys
    from deepemd.retrieval.config import SearchConfig
    from deepemd.retrieval.search import run_search
    result = run_search(SearchConfig(**json.loads(sys.argv[1])), progress=False)
    print(json.dumps(result["ids"].tolist()))
""")


def test_saved_gallery_gives_the_same_top_k_in_a_new_process(gallery, folder_dataset, tmp_path):
    cfg = search_cfg(gallery, folder_dataset / "class_b", tmp_path / "s1")
    here = run_search(cfg, progress=False)
    # every query is itself in the gallery: EMD of a set with itself is the maximum
    paths = [Path(r["path"]).name for r in here["rows"] if r["rank"] == 1]
    assert paths == sorted(p.name for p in (folder_dataset / "class_b").iterdir())
    args = {**cfg.__dict__, "out": str(tmp_path / "s2")}
    proc = subprocess.run(
        [sys.executable, "-c", ROUND_TRIP, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == here["ids"].tolist()


def test_gallery_refuses_another_backbone_or_local_setting(gallery, folder_dataset, tmp_path):
    with pytest.raises(DeepEMDError, match="index"):
        run_search(search_cfg(gallery, folder_dataset / "class_b", tmp_path / "s", weights="none"), progress=False)
    with pytest.raises(DeepEMDError):
        run_search(search_cfg(gallery, folder_dataset / "class_b", tmp_path / "s", pyramid=(3,)), progress=False)


def test_store_out_of_step_with_index_is_refused(folder_dataset, tmp_path):
    small = tmp_path / "small"
    run_index(IndexConfig(data_root=str(folder_dataset), out=str(small), per_class=2, **MODEL), progress=False)
    run_index(IndexConfig(data_root=str(folder_dataset), out=str(tmp_path / "big"), **MODEL), progress=False)
    for name in ("index.faiss", "index.faiss.json", "ids.txt"):  # index + id map of another gallery
        (small / name).write_bytes((tmp_path / "big" / name).read_bytes())
    with pytest.raises(DeepEMDError):
        run_search(search_cfg(small, folder_dataset / "class_b", tmp_path / "s"), progress=False)


def test_empty_query_folder_and_missing_gallery_are_clear_errors(gallery, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeepEMDError, match="no query images"):
        run_search(search_cfg(gallery, tmp_path / "empty", tmp_path / "s"), progress=False)
    with pytest.raises(DeepEMDError, match="gallery not found"):
        run_search(search_cfg(tmp_path / "nowhere", tmp_path / "empty", tmp_path / "s"), progress=False)


def test_users_own_faiss_index_is_reranked(folder_dataset, tmp_path):
    """An IndexIDMap with ids 1000+ built outside deepemd, plus the id -> image text file."""
    from deepemd.data import read_layout
    from deepemd.retrieval.build import local_specs, make_embedder, make_loader
    from deepemd.retrieval.model import embed_loader

    cfg = search_cfg(tmp_path / "g", folder_dataset / "class_c", tmp_path / "s")
    images = read_layout("folder", folder_dataset, "all")
    model = make_embedder(cfg, local_specs(cfg, ["fcn"]))
    vectors, _, _ = embed_loader(model, make_loader(images, model, 16, 0), torch.device("cpu"), progress=False)
    user_ids = 1000 + np.arange(len(images), dtype=np.int64)[::-1].copy()
    index = faiss.IndexIDMap(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(vectors, user_ids)
    faiss.write_index(index, str(tmp_path / "mine.faiss"))
    id_map = tmp_path / "mine_ids.txt"
    id_map.write_text("".join(f"{i}\t{p}\n" for i, p in zip(user_ids, images.paths)))

    result = run_search(
        search_cfg(
            tmp_path / "g",
            folder_dataset / "class_c",
            tmp_path / "s",
            index=str(tmp_path / "mine.faiss"),
            id_map=str(id_map),
        ),
        progress=False,
    )
    top1 = {Path(r["query"]).name: (r["id"], Path(r["path"])) for r in result["rows"] if r["rank"] == 1}
    by_path = dict(zip(images.paths, user_ids))
    for name, (fid, path) in top1.items():
        assert path == folder_dataset / "class_c" / name and fid == by_path[path]
    assert (tmp_path / "g" / "local" / "manifest.json").exists()  # built once, reused next time
    with pytest.raises(DeepEMDError, match="id map lists"):
        id_map.write_text("".join(f"{i}\t{p}\n" for i, p in zip(user_ids[:3], images.paths)))
        run_search(
            search_cfg(
                tmp_path / "g2",
                folder_dataset / "class_c",
                tmp_path / "s",
                index=str(tmp_path / "mine.faiss"),
                id_map=str(id_map),
            ),
            progress=False,
        )


@pytest.mark.parametrize(
    "name, weights, embed_dim", [("resnet12", "none", None), ("efficientnet_lite0", "imagenet", 16)]
)
def test_untrained_parts_are_rebuilt_identically(name, weights, embed_dim):
    """`index` then `search` in two processes must build the same network (same fingerprint),
    also for a random backbone or a random embedding head on pretrained weights."""
    from deepemd.retrieval.model import build_backbone

    a, _ = build_backbone(name, weights, embed_dim, 32)
    torch.manual_seed(123)  # the caller's RNG state must not matter
    b, _ = build_backbone(name, weights, embed_dim, 32)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
