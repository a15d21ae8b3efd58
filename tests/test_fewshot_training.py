"""Pre-training checkpoints/resume, and 2-process gloo DDP meta-training on the CPU."""

import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from deepemd.fewshot import build
from deepemd.fewshot.config import PretrainConfig, TrainConfig
from deepemd.io import load_checkpoint
from deepemd.seeding import seed_everything

TINY = dict(
    layout="folder",
    backbone="resnet12",
    backbone_widths=(4, 8, 8, 16),
    weights="none",
    image_size=32,
    batch_size=16,
    seed=0,
)


def write_pattern_folder(root: Path, classes: int = 12, per_class: int = 4, size: int = 32) -> Path:
    """Class k: stripes of period 3 + k/2 at angle 15k degrees plus noise."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:size, :size]
    for k in range(classes):
        folder = root / f"c{k:02d}"
        folder.mkdir(parents=True)
        angle = np.deg2rad(15 * k)
        stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / (3 + k / 2)) > 0
        for i in range(per_class):
            img = 200 * stripes[..., None] + rng.normal(0, 30, (size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_pattern_folder(tmp_path_factory.mktemp("fewshot_train_folder"))


def test_pretrain_checkpoints_load_weights_only_and_resume(folder, tmp_path):
    from deepemd.fewshot.pretrain import pretrain

    cfg = PretrainConfig(
        **TINY,
        data_root=str(folder),
        out=str(tmp_path),
        epochs=1,
        rotation=True,
        val_way=2,
        val_query=2,
        val_episodes=2,
        step_size=1,
    )
    pretrain(cfg, progress=False)
    state = load_checkpoint(tmp_path / "last.pt")  # weights_only=True inside
    assert {"backbone", "heads", "optimizer", "scheduler", "epoch", "rng", "best", "config"} <= set(state)
    assert state["epoch"] == 0 and "rotation.weight" in state["heads"]
    first = pd.read_csv(tmp_path / "history.csv")
    pretrain(PretrainConfig(**{**cfg.__dict__, "epochs": 2}), progress=False)  # resumes at epoch 1
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history["epoch"]) == [0, 1]
    pd.testing.assert_frame_equal(history.iloc[:1], first)
    assert load_checkpoint(tmp_path / "last.pt")["scheduler"]["last_epoch"] == 2
    from deepemd.errors import DeepEMDError

    with pytest.raises(DeepEMDError, match="cannot resume: option 'batch_size' was 16 in the checkpoint, now 8"):
        pretrain(PretrainConfig(**{**cfg.__dict__, "epochs": 3, "batch_size": 8}), progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: TrainConfig, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from deepemd.fewshot.metatrain import meta_train

    backbone = meta_train(cfg, progress=False, load_best=False)
    torch.save(backbone.state_dict(), Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_process_gloo_ddp_meta_training_keeps_ranks_identical(folder, tmp_path):
    cfg = TrainConfig(
        **TINY,
        data_root=str(folder),
        out=str(tmp_path / "run"),
        way=2,
        shot=1,
        query=1,
        epochs=1,
        episodes_per_epoch=4,
        lr=0.05,
        val_episodes=2,
    )
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    seed_everything(cfg.seed)  # what meta_train does before building: the starting weights
    start = build.create_backbone(cfg).state_dict()
    for key in r0:
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0, msg=key)
    moved = [k for k in r0 if r0[k].is_floating_point() and not torch.equal(r0[k], start[k])]
    assert moved, "no weight changed: no training step happened"
    assert not (tmp_path / "run" / "rank1").exists()
    assert {"best.pt", "history.csv", "last.pt"} <= {p.name for p in (tmp_path / "run").iterdir()}


@pytest.mark.parametrize(
    "local, extra", [("fcn", {"pyramid": (1,)}), ("grid", {"grid_levels": (2, 1)}), ("sampling", {"num_patches": 3})]
)
def test_episode_loss_reaches_the_backbone_for_every_local_set(local, extra):
    from deepemd.fewshot.metatrain import EpisodeNet

    cfg = TrainConfig(**TINY, local=local, way=2, shot=1, query=1, **extra)
    backbone = build.create_backbone(cfg)
    net = EpisodeNet(build.create_extractor(cfg, backbone), cfg)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits = net(images)  # 2 supports then 2 queries
    assert logits.shape == (2, 2)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    grads = [p.grad for p in backbone.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
