"""Retrieval metrics through pml's AccuracyCalculator, the rerank, the DeepEMD pml distance and
the eval command's contract."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_metric_learning import distances, losses

from deepemd.emd import similarity
from deepemd.errors import DeepEMDError
from deepemd.eval.retrieval import ShortlistKNN, depth_note, retrieval_metrics
from deepemd.retrieval.distance import DeepEMDSimilarity, flatten_sets
from deepemd.retrieval.evaluate import flat_shortlist
from deepemd.retrieval.rerank import Reranker, RerankSettings, rerank


def clustered(n_classes=4, per_class=6, dim=8, noise=0.9, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    emb = centres[labels] + noise * rng.normal(size=(len(labels), dim))
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32), labels


def keep_order(shortlist, k, skip):
    return shortlist


def test_shortlist_knn_without_rerank_equals_pml_default_knn():
    emb, labels = clustered()
    raw = retrieval_metrics(emb, labels)
    same = retrieval_metrics(emb, labels, ShortlistKNN(flat_shortlist, keep_order, depth=5))
    for key in ("P@1", "RP", "MAP@R"):
        assert same[key] == pytest.approx(raw[key], abs=1e-9)
    assert raw["P@1"] < 100.0  # the noise makes the raw order imperfect, so the next test can fix it


def test_perfect_rescoring_within_depth_gives_perfect_metrics():
    emb, labels = clustered()

    def oracle(shortlist, k, skip):  # same-class candidates first: what a perfect metric would do
        onehot = np.eye(4, dtype=np.float32)[labels][:, None, :]
        return Reranker(onehot, k=k, weights="uniform").rerank(onehot, shortlist, skip)

    row = retrieval_metrics(emb, labels, ShortlistKNN(flat_shortlist, oracle, depth=len(labels)))
    assert row["P@1"] == row["RP"] == row["MAP@R"] == pytest.approx(100.0)


def test_rerank_reorders_only_the_head_and_keeps_skip_and_padding():
    sets = np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.1]], [[0.6, 0.8]]], dtype=np.float32)
    scores = np.array([[0.9, 0.8, 0.7, 0.6, -np.inf]], dtype=np.float32)
    ids = np.array([[0, 1, 3, 2, -1]])
    out_scores, out_ids = rerank(
        scores,
        ids,
        lambda i: sets[0],
        lambda rows: sets[rows],
        RerankSettings(depth=3, weights="uniform"),
        skip_ids=np.array([0]),
    )
    # head (0 skipped and kept first; 1 and 3 rescored by cosine to [1,0]: 3 (0.6) beats 1 (0.0));
    # beyond the depth, 2 and the -1 padding keep their places
    assert out_ids.tolist() == [[0, 3, 1, 2, -1]]
    assert out_scores[0, 1] == pytest.approx(0.6, abs=1e-5) and out_scores[0, 2] == pytest.approx(0.0, abs=1e-5)


def test_fusion_mixes_the_global_score():
    sets = np.array([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=np.float32)
    scores, _ = rerank(
        np.array([[0.5]], dtype=np.float32),
        np.array([[1]]),
        lambda i: sets[0],
        lambda rows: sets[rows],
        RerankSettings(depth=1, weights="uniform", alpha=0.25),
    )
    assert scores[0, 0] == pytest.approx(0.75 * 0.0 + 0.25 * 0.5, abs=1e-6)


def test_bad_inputs_are_one_clear_error():
    with pytest.raises(DeepEMDError, match="no query embeddings"):
        retrieval_metrics(np.zeros((0, 4), dtype=np.float32), np.zeros(0, dtype=np.int64))
    with pytest.raises(DeepEMDError, match="alpha"):
        RerankSettings(alpha=2.0)


def test_depth_note_says_when_rp_cannot_fully_change():
    labels = np.repeat(np.arange(3), 10)
    assert "R=9" in depth_note(labels, 5)
    assert depth_note(labels, 9) is None


def test_deepemd_distance_reshapes_flat_sets_and_matches_the_emd_head():
    torch.manual_seed(0)
    sets = torch.randn(5, 4, 6)
    dist = DeepEMDSimilarity(num_nodes=4)
    mat = dist(flatten_sets(sets))
    expected = torch.stack([similarity(sets[i].expand(5, -1, -1), sets) for i in range(5)])
    assert torch.allclose(mat, expected.to(mat.dtype), atol=1e-5)
    assert torch.allclose(
        dist.pairwise_distance(flatten_sets(sets), flatten_sets(sets.flip(0))),
        similarity(sets, sets.flip(0)).to(mat.dtype),
        atol=1e-5,
    )
    with pytest.raises(DeepEMDError, match="num_nodes"):
        dist(torch.randn(3, 10))


def test_one_node_deepemd_contrastive_loss_equals_cosine_contrastive_loss():
    """With one node per set, EMD similarity is the cosine: pml's loss must agree, value and gradient."""
    torch.manual_seed(1)
    emb = torch.randn(8, 5, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    ours = losses.ContrastiveLoss(pos_margin=0.9, neg_margin=0.4, distance=DeepEMDSimilarity(num_nodes=1))
    ref = losses.ContrastiveLoss(pos_margin=0.9, neg_margin=0.4, distance=distances.CosineSimilarity())
    a = ours(emb, labels)
    (ga,) = torch.autograd.grad(a, emb)
    b = ref(emb, labels)
    (gb,) = torch.autograd.grad(b, emb)
    assert a.item() == pytest.approx(b.item(), abs=1e-5)
    assert torch.allclose(ga.float(), gb, atol=1e-5)


def test_eval_command_contract(folder_dataset, tmp_path):
    """The documented command: pretrained features, no training, results.csv in --out."""
    from deepemd.cli import main

    out = tmp_path / "out"
    code = main(
        [
            "retrieval",
            "eval",
            "--layout",
            "folder",
            "--data-root",
            str(folder_dataset),
            "--backbone",
            "efficientnet_lite0",
            "--out",
            str(out),
            "--image-size",
            "64",
            "--num-patches",
            "4",
            "--grid-levels",
            "2",
            "--flow-queries",
            "1",
        ]
    )
    assert code == 0
    frame = pd.read_csv(out / "results.csv")
    assert list(frame.columns) == ["method", "P@1", "RP", "MAP@R", "queries/s"]
    assert frame["method"].tolist() == ["raw", "+DeepEMD-FCN", "+DeepEMD-Grid", "+DeepEMD-Sampling"]
    assert frame[["P@1", "RP", "MAP@R"]].apply(lambda c: c.between(0, 100)).all().all()
    assert (out / "results.md").read_text().startswith("| method |")
    assert (out / "flows.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_rejects_unknown_config_key_and_missing_checkpoint(folder_dataset, tmp_path, capsys):
    from deepemd.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("rerank_kk: 5\n")
    assert main(["retrieval", "eval", "--config", str(cfg), "--data-root", str(folder_dataset)]) == 2
    assert "did you mean 'rerank_k'" in capsys.readouterr().err
    assert (
        main(["retrieval", "eval", "--data-root", str(folder_dataset), "--checkpoint", str(tmp_path / "none.pt")]) == 2
    )
    assert "checkpoint not found" in capsys.readouterr().err


def test_every_bundled_retrieval_config_is_valid():
    from pathlib import Path

    from deepemd.config import build_config, read_yaml
    from deepemd.retrieval.config import EvalConfig, TrainConfig
    from deepemd.retrieval.losses import LOSSES

    folder = Path(__file__).resolve().parents[1] / "configs" / "retrieval"
    for loss in LOSSES:
        cfg = build_config(TrainConfig, read_yaml(folder / f"cub_{loss}.yaml"), f"cub_{loss}.yaml")
        assert cfg.loss == loss and cfg.embed_dim == 128 and cfg.layout == "cub-retrieval"
    assert build_config(EvalConfig, read_yaml(folder / "cub_eval.yaml")).methods == ("fcn", "grid", "sampling")


def test_demo_runs_eval_on_the_bundled_set_with_its_own_options(tmp_path):
    from deepemd.data import demo_root
    from deepemd.retrieval.cli import demo_eval_config
    from deepemd.retrieval.config import DemoConfig

    cfg = demo_eval_config(DemoConfig(out=str(tmp_path), max_classes=3, rerank_k=7))
    assert cfg.data_root == str(demo_root()) and cfg.split == "test" and cfg.backbone == "efficientnet_lite0"
    assert (cfg.max_classes, cfg.rerank_k, cfg.weights, cfg.out) == (3, 7, "imagenet", str(tmp_path))
