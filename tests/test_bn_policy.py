"""The BatchNorm policy of the training commands (issue 14): a pretrained start keeps its running
statistics (``--bn frozen``, the default for pretrained weights), ``--bn train`` updates them.

The oracle for "frozen" is exact: with a learning rate of zero nothing may change at all, not the
validation accuracy, not one BN buffer (``num_batches_tracked`` included).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from deepemd import backbones
from deepemd.backbones import batchnorm
from deepemd.errors import DeepEMDError
from deepemd.fewshot import build
from deepemd.fewshot.config import TrainConfig
from deepemd.io import load_checkpoint

NET = {
    "layout": "folder",
    "backbone": "resnet12",
    "backbone_widths": (8, 8, 8, 8),
    "image_size": 32,
    "batch_size": 16,
    "seed": 0,
}


def bn_buffers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def write_blob_folder(root: Path, classes: int = 12, per_class: int = 6, size: int = 32) -> Path:
    """Class k: a bright disc at a class-specific place and colour on a noisy, class-tinted field
    (the means differ from the BN init's 0/1, so train-mode batches move the statistics)."""
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:size, :size]
    for k in range(classes):
        folder = root / f"c{k:02d}"
        folder.mkdir(parents=True)
        cy, cx = 8 + 16 * (k % 2), 8 + 4 * (k // 2)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < 30)[..., None]
        colour = np.array([40 + 17 * k, 200 - 13 * k, 90 + 11 * (k % 5)])
        for i in range(per_class):
            img = 60 + 150 * disc * colour / 255 + rng.normal(0, 25, (size, size, 3)) + 10 * k
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return write_blob_folder(tmp_path_factory.mktemp("bn_blobs"))


@pytest.fixture(scope="module")
def start_weights(tmp_path_factory) -> Path:
    """A "pretrained" ResNet-12 file: random weights, so the backbone counts as a pretrained start."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("bn_start") / "start.pt"
    torch.save(build.create_backbone(TrainConfig(**NET, weights="none")).state_dict(), path)
    return path


def test_auto_is_frozen_for_pretrained_starts_and_train_from_scratch(start_weights):
    assert batchnorm.resolve_bn("auto", "resnet12", "none") == "train"
    assert batchnorm.resolve_bn("auto", "resnet12", "auto") == "train"  # no packaged ResNet-12 weights
    assert batchnorm.resolve_bn("auto", "efficientnet_lite0", "auto") == "frozen"
    assert batchnorm.resolve_bn("auto", "efficientnet_lite0", "imagenet") == "frozen"
    assert batchnorm.resolve_bn("auto", "resnet12", str(start_weights)) == "frozen"
    assert batchnorm.resolve_bn("auto", "resnet12", "none", init=str(start_weights)) == "frozen"
    assert batchnorm.resolve_bn("Train", "efficientnet_lite0", "imagenet") == "train"
    assert batchnorm.resolve_bn("frozen", "resnet12", "none") == "frozen"
    with pytest.raises(DeepEMDError, match="unknown BatchNorm policy 'eval'"):
        batchnorm.resolve_bn("eval", "resnet12", "none")
    with pytest.raises(DeepEMDError, match="affine"):
        batchnorm.check_affine("fixed")


def test_train_mode_keeps_frozen_statistics_through_forward_and_backward():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 2, 1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batchnorm.train_mode(net, "frozen")
    assert net.training and net[3].training and not net[1].training  # dropout trains, BN does not
    net(torch.randn(6, 3, 8, 8) * 3 + 2).sum().backward()
    for k, v in bn_buffers(net.state_dict()).items():
        assert torch.equal(v, before[k]), k
    assert net[1].weight.grad is not None  # the affine parameters still learn by default
    batchnorm.train_mode(net, "train")
    net(torch.randn(6, 3, 8, 8) * 3 + 2)
    assert not torch.equal(net[1].running_mean, before["1.running_mean"])


def _meta_cfg(blobs: Path, out: Path, weights: str, **kw) -> TrainConfig:
    base = dict(
        **NET,
        weights=weights,
        data_root=str(blobs),
        out=str(out),
        way=2,
        shot=1,
        query=3,
        epochs=1,
        episodes_per_epoch=3,
        lr=0.0,
        val_episodes=6,
        val_fraction=0.34,
    )
    return TrainConfig(**{**base, **kw})


def test_meta_training_at_lr_zero_changes_nothing_under_the_default_policy(blobs, start_weights, tmp_path, capsys):
    from deepemd.fewshot.metatrain import meta_train

    start = torch.load(start_weights, weights_only=True)
    meta_train(_meta_cfg(blobs, tmp_path / "frozen", str(start_weights)), progress=False, load_best=False)
    assert "meta-train batchnorm frozen (auto: pretrained start)" in capsys.readouterr().out
    history = pd.read_csv(tmp_path / "frozen" / "history.csv")
    assert list(history["epoch"]) == [-1, 0]
    assert history["val_accuracy"].iloc[1] == history["val_accuracy"].iloc[0]
    last = load_checkpoint(tmp_path / "frozen" / "last.pt")
    assert last["config"]["bn"] == "frozen"  # the resolved choice is recorded
    buffers = bn_buffers(last["backbone"])
    assert buffers and all(torch.equal(v, start[k]) for k, v in buffers.items())

    meta_train(_meta_cfg(blobs, tmp_path / "train", str(start_weights), bn="train"), progress=False, load_best=False)
    history = pd.read_csv(tmp_path / "train" / "history.csv")
    assert history["val_accuracy"].iloc[1] != history["val_accuracy"].iloc[0]
    last = load_checkpoint(tmp_path / "train" / "last.pt")
    assert last["config"]["bn"] == "train"
    moved = [k for k, v in bn_buffers(last["backbone"]).items() if not torch.equal(v, start[k])]
    assert len(moved) == len(buffers)  # every BN buffer moved (statistics and batch counters)
    weights = {k: v for k, v in last["backbone"].items() if k not in buffers}
    assert all(torch.equal(v, start[k]) for k, v in weights.items())  # lr 0: only the statistics moved


def test_frozen_affine_parameters_stay_while_convolutions_learn(blobs, start_weights, tmp_path):
    from deepemd.fewshot.metatrain import meta_train

    start = torch.load(start_weights, weights_only=True)
    cfg = _meta_cfg(blobs, tmp_path / "run", str(start_weights), lr=0.05, bn_affine="frozen", val_episodes=0)
    meta_train(cfg, progress=False, load_best=False)
    last = load_checkpoint(tmp_path / "run" / "last.pt")["backbone"]
    bn_names = {name for name, m in build.create_backbone(cfg).named_modules() if isinstance(m, nn.BatchNorm2d)}
    affine = [f"{n}.{p}" for n in bn_names for p in ("weight", "bias")]
    assert all(torch.equal(last[k], start[k]) for k in affine)
    assert all(torch.equal(v, start[k]) for k, v in bn_buffers(last).items())
    convs = [k for k in last if k.endswith("weight") and k not in affine]
    assert any(not torch.equal(last[k], start[k]) for k in convs)


@pytest.mark.slow
def test_retrieval_training_at_lr_zero_keeps_bn_buffers_unless_told_to_train(folder_dataset, tmp_path, capsys):
    from deepemd.retrieval.config import TrainConfig as RetrievalTrain
    from deepemd.retrieval.train import train

    torch.manual_seed(5)
    weights = tmp_path / "resnet18.pt"
    torch.save(backbones.create("resnet18").state_dict(), weights)
    start = torch.load(weights, weights_only=True)
    common = dict(
        data_root=str(folder_dataset),
        split="all",
        backbone="resnet18",
        weights=str(weights),
        embed_dim=None,
        image_size=32,
        loss="contrastive",
        batch_size=4,
        m_per_class=2,
        epochs=1,
        steps_per_epoch=2,
        lr=0.0,
        augment=False,
        seed=3,
    )
    for distance in ("cosine", "deepemd"):  # the global embedding and the DeepEMD distance
        train(RetrievalTrain(**common, distance=distance, out=str(tmp_path / distance)), progress=True)
        assert "retrieval train batchnorm frozen (auto: pretrained start)" in capsys.readouterr().out
        ckpt = load_checkpoint(tmp_path / distance / "checkpoint.pt")
        assert ckpt["config"]["bn"] == "frozen"
        assert all(torch.equal(v, start[k]) for k, v in ckpt["model"].items()), distance

    train(RetrievalTrain(**common, bn="train", out=str(tmp_path / "bn_train")), progress=False)
    model = load_checkpoint(tmp_path / "bn_train" / "checkpoint.pt")["model"]
    buffers = bn_buffers(model)
    assert buffers and all(not torch.equal(v, start[k]) for k, v in buffers.items())


def test_test_time_feature_extraction_runs_the_backbone_in_eval_mode(blobs, start_weights):
    """The few-shot test (and the SFC fitted on its cached features) never runs BN in train mode."""
    from deepemd.fewshot.features import extract

    cfg = TrainConfig(**NET, weights=str(start_weights), data_root=str(blobs))
    backbone = build.create_backbone(cfg)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.train()  # as a training loop leaves it
    images = build.read_split(cfg, "train")
    extract(
        build.dataset(images, cfg, backbone, train=False),
        backbone,
        build.create_extractor(cfg, backbone),
        "fcn",
        progress=False,
    )
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())


def test_a_validation_pass_keeps_frozen_batchnorm_frozen():
    """Feature extraction (validation, test) leaves every submodule in its own mode afterwards."""
    from torch import nn

    from deepemd.backbones import evaluating

    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    net.train()
    net[1].eval()  # the frozen policy: BN in eval inside a training model
    with evaluating(net):
        assert not any(m.training for m in net.modules())
    assert net.training and net[0].training and not net[1].training
