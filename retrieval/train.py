"""`deepemd retrieval train`: a pml loss on the train classes, one or many processes.

Backbone + 1x1 linear head to ``embed_dim`` (paper: ResNet-50 + 128-d). The embedding a loss sees
is either the pooled global vector (``--distance cosine``, every loss) or the FCN local set,
flattened, scored by DeepEMD (``--distance deepemd``, pair losses: paper 5.8).

Reproducible and resumable: every epoch's randomness (batch order, augmentation) is derived from
``(seed, epoch, rank)``, and after each epoch rank 0 writes one atomic checkpoint (model,
optimizers, loss state, epoch, RNG, history). A killed run restarted with the same command
resumes after the last finished epoch and ends with the weights of an uninterrupted run.
Under ``torchrun`` the model is wrapped in DistributedDataParallel, losses see the batch of all
ranks (pml's DistributedLossWrapper) and only rank 0 writes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from deepemd import distributed
from deepemd.backbones import batchnorm, feature_map_size
from deepemd.build import resolve_data
from deepemd.checkpoints import append_log, check_resumable, restore_rng, rng_state
from deepemd.data import DistributedMPerClassSampler, ImageDataset, build_transform
from deepemd.errors import DeepEMDError
from deepemd.io import load_checkpoint, load_state_dict_checked, save_checkpoint
from deepemd.labels import build_label_loss
from deepemd.local import FCN, global_features
from deepemd.retrieval.build import dataset_images
from deepemd.retrieval.config import TrainConfig
from deepemd.retrieval.distance import DeepEMDSimilarity, flatten_sets
from deepemd.retrieval.losses import build_loss
from deepemd.retrieval.model import build_backbone
from deepemd.seeding import derive_seed

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.csv"
#: Options that must not change between a checkpoint and its resumption.
FROZEN = (
    "backbone",
    "backbone_widths",
    "embed_dim",
    "image_size",
    "loss",
    "distance",
    "pyramid",
    "m_per_class",
    "batch_size",
    "seed",
    "bn",
    "bn_affine",
    "label_loss",
    "hierarchy",
)


class TrainNet(nn.Module):
    """What the loss sees: the global vector ``(B, C)`` or the flattened FCN set ``(B, m*C)``."""

    def __init__(self, backbone: nn.Module, local_sets: bool, pyramid: tuple[int, ...], image_size: int):
        super().__init__()
        self.backbone = backbone
        self.fcn = FCN(backbone, pyramid=pyramid) if local_sets else None
        h, w = feature_map_size(backbone, image_size)
        self.num_nodes = sum(s * s for s in pyramid) + h * w  # FCN set size at the training size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self.backbone(images)
        if self.fcn is None:
            return global_features(fmap)
        return flatten_sets(self.fcn.from_feature_map(fmap))


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) training; returns ``{"history": [...], "checkpoint": path, "model": net}``."""
    if not cfg.data_root:
        raise DeepEMDError("no --data-root given", fix="point --data-root at the training images")
    place, device = distributed.setup(cfg.device)
    rank, world = place.rank, place.world
    torch.manual_seed(cfg.seed)
    images = dataset_images(cfg)
    if len(images) == 0:
        raise DeepEMDError(f"split '{cfg.split}' holds no training images", cfg.data_root, "check --split / --layout")
    num_classes = int(images.labels.max()) + 1
    backbone, info = build_backbone(
        cfg.backbone, cfg.weights, cfg.embed_dim, cfg.image_size, cfg.seed, widths=tuple(cfg.backbone_widths)
    )
    bn, bn_line = batchnorm.prepare(backbone, cfg)
    cfg = replace(cfg, bn=bn)  # the resolved policy is what the checkpoint's config records
    if rank == 0 and progress:
        print(f"retrieval train {bn_line}", flush=True)
    local_sets = cfg.distance == "deepemd"
    if cfg.distance not in ("cosine", "deepemd"):
        raise DeepEMDError(f"unknown distance '{cfg.distance}'", fix="use cosine or deepemd")
    net = TrainNet(backbone, local_sets, tuple(cfg.pyramid), info.image_size).to(device)
    distance = DeepEMDSimilarity(net.num_nodes, weights=cfg.node_weights, solver=cfg.solver) if local_sets else None
    label_root = resolve_data(cfg)[1] if cfg.hierarchy == "folders" else None
    label_loss = build_label_loss(
        cfg.label_loss, cfg.hierarchy, images.classes, label_root, cfg.emd_rho, cfg.ce_weight, reduction="none"
    )
    bundle = build_loss(cfg.loss, num_classes, backbone.out_channels, distance, label_loss)
    loss_fn, miner = bundle.loss.to(device), bundle.miner

    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    model_opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_opt = torch.optim.Adam(loss_fn.parameters(), lr=cfg.loss_lr) if bundle.has_parameters else None
    start_epoch, history = 0, []
    if cfg.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        check_resumable(ckpt.get("config", {}), cfg, FROZEN, ckpt_path)
        load_state_dict_checked(net.backbone, ckpt["model"], ckpt_path)
        load_state_dict_checked(loss_fn, ckpt["loss"], ckpt_path)
        model_opt.load_state_dict(ckpt["optimizer"])
        if loss_opt is not None:
            loss_opt.load_state_dict(ckpt["loss_optimizer"])
        start_epoch, history = int(ckpt["epoch"]) + 1, list(ckpt.get("history", []))
        restore_rng(ckpt["rng"])

    model = nn.parallel.DistributedDataParallel(net) if world > 1 else net
    if world > 1:
        from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper

        criterion = DistributedLossWrapper(loss_fn)
        miner = DistributedMinerWrapper(miner) if miner is not None else None
    else:
        criterion = loss_fn

    tf_cfg = {**backbone.default_cfg, "input_size": info.image_size}
    dataset = ImageDataset(images, build_transform(tf_cfg, train=cfg.augment))
    steps = cfg.steps_per_epoch or max(1, len(images) // (cfg.batch_size * world))
    sampler = DistributedMPerClassSampler(images.labels, cfg.m_per_class, cfg.batch_size, steps, cfg.seed, rank, world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers, drop_last=True
    )
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(derive_seed(cfg.seed, "epoch", epoch, "rank", rank))
        sampler.set_epoch(epoch)
        batchnorm.train_mode(model, cfg.bn)
        total, count, start = 0.0, 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress or rank != 0, leave=False)
        for batch, labels in bar:
            batch, labels = batch.to(device), labels.to(device)
            emb = model(batch)
            pairs = miner(emb, labels) if miner is not None else None
            loss = criterion(emb, labels, pairs)
            model_opt.zero_grad(set_to_none=True)
            if loss_opt is not None:
                loss_opt.zero_grad(set_to_none=True)
            loss.backward()
            if loss_opt is not None and world > 1:
                distributed.average_loss_gradients(loss_fn, place)
            model_opt.step()
            if loss_opt is not None:
                loss_opt.step()
            value = float(loss.detach()) / world
            total, count = total + value, count + 1
            bar.set_postfix(loss=f"{value:.4f}")
        distributed.sync_buffers(net, place)
        row = {"epoch": epoch + 1, "loss": total / max(count, 1), "seconds": round(time.perf_counter() - start, 2)}
        history.append(row)
        if rank == 0:
            save_checkpoint(
                {
                    "model": net.backbone.state_dict(),
                    "loss": loss_fn.state_dict(),
                    "optimizer": model_opt.state_dict(),
                    "loss_optimizer": loss_opt.state_dict() if loss_opt is not None else {},
                    "epoch": epoch,
                    "rng": rng_state(),
                    "history": history,
                    "config": asdict(cfg),
                    "model_info": {
                        "backbone": info.backbone,
                        "embed_dim": info.embed_dim,
                        "image_size": info.image_size,
                        **info.extra,
                    },
                },
                ckpt_path,
            )
            append_log(out / LOG, row)
            if progress:
                print(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']:.4f} ({row['seconds']} s)", flush=True)
        distributed.barrier(place)
    distributed.barrier(place)
    return {"history": history, "checkpoint": ckpt_path, "model": net, "rank": rank, "world": world}
