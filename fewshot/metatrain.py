"""``deepemd fewshot train``: episodic meta-training through the differentiable EMD layer.

Each step is one N-way K-shot episode: the backbone embeds support and query images as local
sets (FCN cells, grid crops or sampled patches), every query is scored against every class by
the EMD similarity with cross-reference weights (``temperature / N`` logits, as the authors),
and cross-entropy flows back through the exact solver's flow and dual gradients into the
backbone. For K > 1 a class is represented by the node-wise mean of its K support sets (the
paper re-uses the 1-shot model for K-shot and fits an SFC at test time instead).

Validation episodes (classes never trained on) pick ``best.pt``; the pre-trained start is
validated first, so meta-training never hands back a model worse than where it started.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from deepemd import distributed
from deepemd.backbones import batchnorm
from deepemd.emd import pairwise_similarity
from deepemd.eval import write_results
from deepemd.fewshot import build
from deepemd.fewshot.checkpoints import (
    BEST,
    end_epoch,
    resume_or_start,
    run_keeping_best,
    save_training_state,
    say_if_complete,
    sgd_with_steps,
)
from deepemd.fewshot.config import TrainConfig
from deepemd.fewshot.episodes import check_episode_size, episode_indices, episode_labels
from deepemd.fewshot.methods import emd_fusion, emd_nn
from deepemd.fewshot.validation import emd_options, validation_accuracy
from deepemd.seeding import derive_seed, seed_everything


class EpisodeNet(nn.Module):
    """``forward(images) -> (way*query, way)`` logits; images = supports (class-major) + queries."""

    def __init__(self, extractor: nn.Module, cfg: TrainConfig):
        super().__init__()
        self.extractor = extractor
        self.way, self.shot = cfg.way, cfg.shot
        self.weights, self.solver = cfg.node_weights, cfg.solver
        self.temperature, self.center = cfg.temperature, cfg.center

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        sets = self.extractor(images)
        n_support = self.way * self.shot
        support = sets[:n_support].reshape(self.way, self.shot, *sets.shape[1:]).mean(dim=1)
        return pairwise_similarity(
            sets[n_support:],
            support,
            weights=self.weights,
            solver=self.solver,
            temperature=self.temperature,
            center=self.center,
        )


def validate(
    cfg: TrainConfig, backbone: nn.Module, extractor: nn.Module, val_set, device: torch.device, progress: bool
) -> float:
    """Mean accuracy (percent) of seeded val episodes with the variant being trained."""
    opts = emd_options(cfg)
    method = emd_nn(opts) if cfg.shot == 1 else emd_fusion(opts)
    episode = (cfg.way, cfg.shot, cfg.query)
    return validation_accuracy(cfg, val_set, backbone, extractor, cfg.local, method, episode, device, progress)


def meta_train(cfg: TrainConfig, progress: bool = True, load_best: bool = True) -> nn.Module:
    """Run (or resume) meta-training; returns the backbone: the best on validation
    (``load_best``, read from ``OUT/best.pt`` after every rank finished), else the last epoch's."""
    return run_keeping_best(_meta_train, cfg, progress, load_best)


def _meta_train(cfg: TrainConfig, rank: distributed.Rank, device: torch.device, progress: bool) -> nn.Module:
    seed_everything(cfg.seed)
    train, val = build.train_val_splits(cfg, cfg.val_split, cfg.val_fraction, cfg.way, cfg.val_episodes > 0)
    check_episode_size(train.labels, cfg.way, cfg.shot, cfg.query, "train split")
    if len(train.classes) < 2 * cfg.way:
        warnings.warn(
            f"only {len(train.classes)} train classes for {cfg.way}-way episodes: every episode is "
            "(nearly) the same task, and meta-training tends to specialise to these classes "
            "(on Fashion-MNIST's 5 classes it cost 16 points on the test classes)",
            stacklevel=2,
        )
    if val is not None:
        check_episode_size(val.labels, cfg.way, cfg.shot, cfg.query, "validation split")
    backbone = build.create_backbone(cfg, cfg.init).to(device)
    bn, bn_line = batchnorm.prepare(backbone, cfg, cfg.init)
    cfg = replace(cfg, bn=bn)  # the resolved policy is what every checkpoint's config records
    if rank.main:
        print(f"meta-train {bn_line}", flush=True)
    extractor = build.create_extractor(cfg, backbone).to(device)
    model = EpisodeNet(extractor, cfg).to(device)
    # Episodes are not augmented (the authors' meta-training uses the test-time resize + crop).
    train_set = build.dataset(train, cfg, backbone, train=False)
    val_set = build.dataset(val, cfg, backbone, train=False) if val is not None else None
    optimizer, scheduler = sgd_with_steps(model, cfg)
    out = Path(cfg.out)
    start_epoch, best = resume_or_start(cfg, {"backbone": backbone}, optimizer, scheduler)
    if rank.main:
        say_if_complete("meta-train", start_epoch, cfg)
    if start_epoch == 0 and rank.main and val_set is not None:  # epoch -1 = the start, a candidate for best.pt
        start_acc = validate(cfg, backbone, extractor, val_set, device, progress)
        best = {"accuracy": start_acc, "epoch": -1}
        save_training_state(
            out / BEST, backbone=backbone, optimizer=optimizer, scheduler=scheduler, epoch=-1, best=best, config=cfg
        )
        write_results(
            [
                {
                    "epoch": -1,
                    "loss": float("nan"),
                    "train_accuracy": float("nan"),
                    "val_accuracy": start_acc,
                    "lr": cfg.lr,
                }
            ],
            out,
            name="history",
            float_format="%.6g",
        )
        print(f"meta-train start: val acc {start_acc:.2f}%", flush=True)
    ddp_model = distributed.wrap(model, rank, device)
    per_step = rank.world
    episodes = -(-cfg.episodes_per_epoch // per_step) * per_step  # equal steps on every rank
    history = []
    for epoch in range(start_epoch, cfg.epochs):
        idx_stream = episode_indices(
            train.labels,
            cfg.way,
            cfg.shot,
            cfg.query,
            episodes,
            seed=derive_seed(cfg.seed, "episodes", epoch),
            rank=rank.rank,
            world=rank.world,
        )
        loader = DataLoader(train_set, batch_sampler=[list(i) for i in idx_stream], num_workers=cfg.workers)
        batchnorm.train_mode(model, cfg.bn)
        losses, accs = [], []
        for images, labels in tqdm(loader, desc=f"meta-train epoch {epoch}", disable=not progress, leave=False):
            _, query_labels = episode_labels(labels.numpy(), np.arange(len(labels)), cfg.way, cfg.shot)
            logits = ddp_model(images.to(device))
            loss = F.cross_entropy(logits, query_labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            accs.append(float((logits.argmax(1).cpu() == query_labels).float().mean()))
        scheduler.step()
        distributed.sync_buffers(model, rank)
        has_val = rank.main and val_set is not None
        val_acc = validate(cfg, backbone, extractor, val_set, device, progress) if has_val else float("nan")
        best = end_epoch(
            out,
            rank,
            history,
            best,
            epoch=epoch,
            loss=float(np.mean(losses)),
            train_accuracy=100.0 * float(np.mean(accs)),
            val_acc=val_acc,
            job="meta-train",
            accuracy_name="episode acc",
            backbone=backbone,
            optimizer=optimizer,
            scheduler=scheduler,
            config=cfg,
        )
    return backbone
