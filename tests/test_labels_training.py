"""The label losses wired into training: `deepemd fewshot pretrain --loss ... --hierarchy ...`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from deepemd.fewshot.config import PretrainConfig
from deepemd.labels import LabelTree, TreeEMDLoss, build_label_loss, tree_emd

TINY = dict(
    layout="folder",
    backbone="resnet12",
    backbone_widths=(4, 4, 4, 8),
    weights="none",
    image_size=32,
    batch_size=8,
    seed=0,
    epochs=1,
    val_episodes=0,
    step_size=1,
)


def _folder(root: Path, classes=("a1", "a2", "b1", "b2"), per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            img = rng.normal(60 * k, 20, (24, 24, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / c / f"{i}.png")
    return root


def test_build_label_loss_resolves_names_and_hierarchies(tmp_path):
    assert build_label_loss("ce", None, ["x", "y"]) is None  # the caller's own cross-entropy
    (tmp_path / "h.csv").write_text("class,parent\na1,a\na2,a\nb1,b\nb2,b\na,root\nb,root\n")
    loss = build_label_loss("relaxed-emd", str(tmp_path / "h.csv"), ["a1", "a2", "b1", "b2"], rho=3)
    assert isinstance(loss, TreeEMDLoss) and loss.rho == 3 and loss.tree.leaves == ("a1", "a2", "b1", "b2")
    assert build_label_loss("ce+relaxed-emd", "chain", ["s", "m", "l"], ce_weight=0.5).ce_weight == 0.5


def test_pretrain_loss_uses_the_tree_loss():
    from deepemd.fewshot.pretrain import pretrain_loss

    tree = LabelTree.from_parents({"a1": "a", "a2": "a", "b1": "b", "b2": "b", "a": "r", "b": "r"})
    head = torch.nn.Linear(3, 4)

    def model(x):
        return head(x), None

    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    cfg = PretrainConfig(**TINY, data_root="unused")
    loss, logits = pretrain_loss(model, x, y, cfg, torch.Generator(), TreeEMDLoss(tree, rho=1))
    torch.testing.assert_close(loss, tree_emd(logits.softmax(1), y, tree).mean())


@pytest.mark.parametrize("loss", ["emd", "ce+relaxed-emd"])
def test_cli_pretrain_with_a_hierarchy_file(tmp_path, loss):
    from deepemd.cli import main

    root = _folder(tmp_path / "data")
    (tmp_path / "h.csv").write_text("class,parent,edge_length\na1,a,1\na2,a,1\nb1,b,2\nb2,b,2\na,root,1\nb,root,1\n")
    out = tmp_path / "out"
    argv = [
        "fewshot",
        "pretrain",
        "--layout",
        "folder",
        "--data-root",
        str(root),
        "--backbone",
        "resnet12",
        "--backbone-widths",
        "4",
        "4",
        "4",
        "8",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--val-episodes",
        "0",
        "--loss",
        loss,
        "--hierarchy",
        str(tmp_path / "h.csv"),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    history = pd.read_csv(out / "history.csv")
    assert np.isfinite(history["loss"]).all()


def test_normsoftmax_with_a_label_loss_scores_its_proxy_logits():
    from deepemd.retrieval.losses import build_loss

    tree = LabelTree.from_parents({"a1": "a", "a2": "a", "b1": "b", "b2": "b", "a": "r", "b": "r"})
    label_loss = TreeEMDLoss(tree, rho=2, reduction="none")
    torch.manual_seed(0)
    bundle = build_loss("normsoftmax", 4, 6, label_loss=label_loss)
    emb, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 1])
    want = tree_emd(bundle.loss.get_logits(emb).softmax(1), y, tree, rho=2).mean()
    torch.testing.assert_close(bundle.loss(emb, y), want)
    from deepemd.errors import DeepEMDError

    with pytest.raises(DeepEMDError, match="applies to normsoftmax"):
        build_loss("contrastive", 4, 6, label_loss=label_loss)


def test_retrieval_train_with_label_emd(tmp_path):
    from deepemd.retrieval.config import TrainConfig
    from deepemd.retrieval.train import train

    root = _folder(tmp_path / "data")
    cfg = TrainConfig(
        data_root=str(root),
        split="all",
        backbone="resnet18",
        weights="none",
        embed_dim=8,
        image_size=32,
        loss="normsoftmax",
        label_loss="relaxed-emd",
        hierarchy="chain",
        batch_size=4,
        m_per_class=2,
        epochs=1,
        steps_per_epoch=2,
        lr=1e-2,
        augment=False,
        out=str(tmp_path / "out"),
    )
    result = train(cfg, progress=False)
    assert np.isfinite(result["history"][-1]["loss"])
    assert isinstance(result_loss := torch.load(result["checkpoint"], weights_only=True)["loss"], dict)
    assert "W" in result_loss  # the NormSoftmax proxies were trained and saved as before
