"""``deepemd fewshot pretrain``: a linear classifier over all train classes on the backbone
(paper 5.1), optionally with the 4-way rotation self-supervision loss (paper 5.3, Table 4).

Each epoch the backbone is validated by few-shot episodes on classes it never trained on
(DeepEMD-FCN as the paper, or the cheaper prototype rule); ``best.pt`` keeps the best epoch and
``last.pt`` every epoch, from which an interrupted run resumes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from deepemd import distributed, local
from deepemd.backbones import batchnorm
from deepemd.build import resolve_data
from deepemd.errors import DeepEMDError
from deepemd.fewshot import build
from deepemd.fewshot.checkpoints import (
    end_epoch,
    resume_or_start,
    run_keeping_best,
    say_if_complete,
    sgd_with_steps,
)
from deepemd.fewshot.config import PretrainConfig
from deepemd.fewshot.episodes import check_episode_size
from deepemd.fewshot.methods import emd_nn, protonet
from deepemd.fewshot.validation import emd_options, validation_accuracy
from deepemd.labels import build_label_loss
from deepemd.seeding import derive_seed, seed_everything

#: Rotations (multiples of 90 degrees) the self-supervised head predicts.
ROTATIONS = 4


class ClassifierHeads(nn.Module):
    """Linear class head and optional 4-way rotation head on the average-pooled feature."""

    def __init__(self, channels: int, num_classes: int, rotation: bool):
        super().__init__()
        self.classifier = nn.Linear(channels, num_classes)
        self.rotation = nn.Linear(channels, ROTATIONS) if rotation else None


class PretrainNet(nn.Module):
    def __init__(self, backbone: nn.Module, heads: ClassifierHeads):
        super().__init__()
        self.backbone, self.heads = backbone, heads

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        pooled = local.global_features(self.backbone(images))
        rot = self.heads.rotation(pooled) if self.heads.rotation is not None else None
        return self.heads.classifier(pooled), rot


def rotated_copies(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image turned by a random multiple of 90 degrees, and that multiple (the label)."""
    turns = torch.randint(ROTATIONS, (images.shape[0],), generator=generator)
    out = torch.stack([torch.rot90(img, int(k), dims=(1, 2)) for img, k in zip(images, turns)])
    return out, turns.to(images.device)


def pretrain_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: PretrainConfig,
    generator: torch.Generator,
    criterion=F.cross_entropy,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class loss (``criterion``: cross-entropy, or a ``deepemd.labels.TreeEMDLoss`` for
    ``--loss emd|relaxed-emd|ce+relaxed-emd``) on the upright images (+ ``rotation_weight`` x
    rotation cross-entropy on upright and turned copies, one forward pass). Returns ``(loss, class logits)``."""
    if not cfg.rotation:
        logits, _ = model(images)
        return criterion(logits, labels), logits
    turned, turns = rotated_copies(images, generator)
    logits, rot = model(torch.cat([images, turned]))
    n = images.shape[0]
    rot_labels = torch.cat([torch.zeros_like(turns), turns])
    loss = criterion(logits[:n], labels) + cfg.rotation_weight * F.cross_entropy(rot, rot_labels)
    return loss, logits[:n]


@torch.no_grad()
def validate(cfg: PretrainConfig, backbone: nn.Module, val_set, device: torch.device, progress: bool) -> float:
    """Mean accuracy (percent) of val episodes: DeepEMD-FCN (``val_method='fcn'``) or prototype."""
    opts = emd_options(cfg)
    method = emd_nn(opts) if cfg.val_method == "fcn" else protonet(opts)
    episode = (cfg.val_way, cfg.val_shot, cfg.val_query)
    fcn = local.create("fcn", backbone)
    return validation_accuracy(cfg, val_set, backbone, fcn, "fcn", method, episode, device, progress)


def pretrain(cfg: PretrainConfig, progress: bool = True, load_best: bool = True) -> nn.Module:
    """Run (or resume) pre-training; returns the backbone: the best on validation
    (``load_best``, read from ``OUT/best.pt`` after every rank finished), else the last epoch's."""
    return run_keeping_best(_pretrain, cfg, progress, load_best)


def _pretrain(cfg: PretrainConfig, rank: distributed.Rank, device: torch.device, progress: bool) -> nn.Module:
    if cfg.val_method not in ("fcn", "proto"):
        raise DeepEMDError(f"unknown val_method '{cfg.val_method}'", None, "use fcn or proto")
    seed_everything(cfg.seed)  # same initial weights on every rank
    train, val = build.train_val_splits(cfg, cfg.val_split, cfg.val_fraction, cfg.val_way, cfg.val_episodes > 0)
    if val is not None:
        check_episode_size(val.labels, cfg.val_way, cfg.val_shot, cfg.val_query, "validation split")
    backbone = build.create_backbone(cfg)
    bn, bn_line = batchnorm.prepare(backbone, cfg)
    cfg = replace(cfg, bn=bn)  # the resolved policy is what every checkpoint's config records
    if rank.main:
        print(f"pretrain {bn_line}", flush=True)
    label_root = resolve_data(cfg)[1] if cfg.hierarchy == "folders" else None
    class_loss = (
        build_label_loss(cfg.loss, cfg.hierarchy, train.classes, label_root, cfg.emd_rho, cfg.ce_weight)
        or F.cross_entropy
    )
    heads = ClassifierHeads(backbone.out_channels, len(train.classes), cfg.rotation)
    model = PretrainNet(backbone, heads).to(device)
    train_set = build.dataset(train, cfg, backbone, train=True)
    val_set = build.dataset(val, cfg, backbone, train=False) if val is not None else None
    optimizer, scheduler = sgd_with_steps(model, cfg)
    out = Path(cfg.out)
    start_epoch, best = resume_or_start(cfg, {"backbone": backbone, "heads": heads}, optimizer, scheduler)
    if rank.main:
        say_if_complete("pretrain", start_epoch, cfg)
    ddp_model = distributed.wrap(model, rank, device)
    if rank.distributed:
        sampler = DistributedSampler(train_set, rank.world, rank.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    history = []
    for epoch in range(start_epoch, cfg.epochs):
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "augment", epoch, "rank", rank.rank))
        if rank.distributed:
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(
                train_set, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "order", epoch))
            )
        loader = DataLoader(
            train_set,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=cfg.workers,
            drop_last=len(train_set) > cfg.batch_size,
        )
        batchnorm.train_mode(model, cfg.bn)
        losses, correct, seen = [], 0, 0
        for images, labels in tqdm(loader, desc=f"pretrain epoch {epoch}", disable=not progress, leave=False):
            images, labels = images.to(device), labels.to(device)
            loss, logits = pretrain_loss(ddp_model, images, labels, cfg, gen, class_loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            correct += int((logits.argmax(1) == labels).sum())
            seen += labels.numel()
        scheduler.step()
        distributed.sync_buffers(model, rank)
        has_val = rank.main and val_set is not None
        val_acc = validate(cfg, backbone, val_set, device, progress) if has_val else float("nan")
        best = end_epoch(
            out,
            rank,
            history,
            best,
            epoch=epoch,
            loss=float(np.mean(losses)),
            train_accuracy=100.0 * correct / max(seen, 1),
            val_acc=val_acc,
            job="pretrain",
            accuracy_name="train acc",
            backbone=backbone,
            optimizer=optimizer,
            scheduler=scheduler,
            config=cfg,
            heads=heads,
        )
    return backbone
