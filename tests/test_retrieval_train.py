"""Retrieval training: pml losses, per-rank class-balanced sampling, DDP, kill and resume."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from deepemd.data import DistributedMPerClassSampler
from deepemd.errors import DeepEMDError
from deepemd.io import load_checkpoint
from deepemd.retrieval.config import TrainConfig
from deepemd.retrieval.train import train


def tiny_config(root: Path, out: Path, **kw) -> TrainConfig:
    """resnet18 at 32 px (1x1 map): a few milliseconds per step on one core."""
    base = dict(
        data_root=str(root),
        split="all",
        backbone="resnet18",
        weights="none",
        embed_dim=8,
        image_size=32,
        loss="contrastive",
        batch_size=4,
        m_per_class=2,
        epochs=3,
        steps_per_epoch=2,
        lr=1e-2,
        augment=True,
        out=str(out),
        seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_distributed_sampler_splits_global_batches_into_whole_classes():
    labels = np.repeat(np.arange(6), 5)
    ranks = [
        DistributedMPerClassSampler(labels, m=2, batch_size=4, batches_per_epoch=3, seed=1, rank=r, world=2)
        for r in range(2)
    ]
    single = DistributedMPerClassSampler(labels, m=2, batch_size=8, batches_per_epoch=3, seed=1)
    per_rank = [np.array(list(s)).reshape(3, 4) for s in ranks]
    glued = np.concatenate(per_rank, axis=1).reshape(-1)
    assert glued.tolist() == list(single)  # both ranks together = the single-process global batch
    for batch in np.concatenate(per_rank):
        _, counts = np.unique(labels[batch], return_counts=True)
        assert (counts == 2).all()  # m images of each class inside every rank's batch
    again = DistributedMPerClassSampler(labels, m=2, batch_size=4, batches_per_epoch=3, seed=1, rank=0, world=2)
    assert list(again) == list(ranks[0])
    again.set_epoch(1)
    assert list(again) != list(ranks[0])


def test_training_lowers_loss_and_writes_loadable_checkpoint(folder_dataset, tmp_path):
    cfg = tiny_config(
        folder_dataset, tmp_path / "run", loss="normsoftmax", epochs=8, steps_per_epoch=3, augment=False, loss_lr=0.1
    )
    result = train(cfg, progress=False)
    losses = [row["loss"] for row in result["history"]]
    assert losses[-1] < losses[0]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")  # weights_only=True
    assert ckpt["epoch"] == 7 and set(ckpt) >= {"model", "optimizer", "loss", "loss_optimizer", "rng", "config"}
    assert ckpt["loss"]["W"].shape == (8, 5)  # the proxies: embed_dim x classes
    assert (tmp_path / "run" / "train_log.csv").read_text().count("\n") == 9


def test_resume_refuses_changed_options(folder_dataset, tmp_path):
    train(tiny_config(folder_dataset, tmp_path / "run", epochs=1), progress=False)
    with pytest.raises(DeepEMDError, match="cannot resume: option 'loss'"):
        train(tiny_config(folder_dataset, tmp_path / "run", epochs=2, loss="multisimilarity"), progress=False)


def test_deepemd_distance_needs_a_pair_loss(folder_dataset, tmp_path):
    with pytest.raises(DeepEMDError, match="cannot use a custom distance"):
        train(tiny_config(folder_dataset, tmp_path / "run", loss="arcface", distance="deepemd"), progress=False)


def test_contrastive_through_deepemd_trains(folder_dataset, tmp_path):
    cfg = tiny_config(
        folder_dataset, tmp_path / "run", distance="deepemd", image_size=64, pyramid=(2, 1), epochs=1, steps_per_epoch=2
    )
    before = {k: v.clone() for k, v in _fresh_backbone(cfg).state_dict().items()}
    train(cfg, progress=False)
    after = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    changed = [k for k in after if after[k].dtype.is_floating_point and not torch.equal(after[k], before[k])]
    assert "head.weight" in changed  # gradients reached the network through the EMD layer


def _fresh_backbone(cfg: TrainConfig):
    from deepemd.retrieval.model import build_backbone

    torch.manual_seed(cfg.seed)
    return build_backbone(cfg.backbone, cfg.weights, cfg.embed_dim, cfg.image_size, cfg.seed)[0]


# ---------------------------------------------------------------------------- kill and resume
RUNNER = textwrap.dedent("""
    import sys, time, pathlib, torch
    torch.set_num_threads(1)
    from deepemd.retrieval.config import TrainConfig
    from deepemd.retrieval import train as T
    cfg = TrainConfig(**eval(sys.argv[1]))
    hang_at = int(sys.argv[2])
    if hang_at >= 0:
        seed_fn = T.derive_seed
        def hanging(seed, *keys):
            if keys[:2] == ("epoch", hang_at):  # mid-run: the checkpoint of the epoch before is on disk
                pathlib.Path(cfg.out, "HANGING").write_text("1")
                time.sleep(600)
            return seed_fn(seed, *keys)
        T.derive_seed = hanging
    T.train(cfg, progress=False)
""")


def _run(cfg: TrainConfig, hang_at: int = -1) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", RUNNER, repr(asdict(cfg)), str(hang_at)], env=env)


def test_sigkill_then_resume_equals_uninterrupted_run(folder_dataset, tmp_path):
    full = tiny_config(folder_dataset, tmp_path / "full")
    killed = tiny_config(folder_dataset, tmp_path / "killed")
    reference = _run(full)
    victim = _run(killed, hang_at=2)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "HANGING").exists():
        assert victim.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["epoch"] == 1  # two of three epochs done
    resumed = _run(killed)
    assert resumed.wait(timeout=120) == 0 and reference.wait(timeout=120) == 0
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]


# ---------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: TrainConfig, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    result = train(cfg, progress=False)
    torch.save(result["model"].backbone.state_dict(), Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("loss", ["contrastive", "normsoftmax"])
def test_ddp_two_ranks_hold_identical_weights(folder_dataset, tmp_path, loss):
    cfg = tiny_config(folder_dataset, tmp_path / "ddp", loss=loss, batch_size=2, epochs=1, steps_per_epoch=3)
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    init = _fresh_backbone(cfg).state_dict()
    assert any(not torch.equal(w0[k], init[k]) for k in w0 if w0[k].dtype.is_floating_point)  # it trained
    for key in w0:
        assert torch.allclose(w0[key], w1[key], atol=1e-6), key
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoint.pt", "train_log.csv"]
