"""From options to objects: dataset splits, the backbone and its local-feature extractor.

All three commands build their data and network here, so a checkpoint written by ``pretrain``
or ``train`` is read back by ``test`` with exactly the same architecture.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from torch import nn

from deepemd import backbones, data, local
from deepemd import build as core
from deepemd.errors import DeepEMDError
from deepemd.fewshot.config import FewShotOptions


def read_split(opts: FewShotOptions, split: str) -> data.ImageList:
    """A split's images (``deepemd.build.read_images``, seeded by the run's seed)."""
    return core.read_images(opts, split, opts.seed)


def keep_classes(images: data.ImageList, keep: np.ndarray) -> data.ImageList:
    """Images whose class index is in ``keep``, with labels renumbered 0..len(keep)-1."""
    keep = np.asarray(sorted(set(int(k) for k in keep)))
    mask = np.isin(images.labels, keep)
    remap = {int(old): new for new, old in enumerate(keep)}
    labels = np.array([remap[int(label)] for label in images.labels[mask]], dtype=np.int64)
    paths = [p for p, m in zip(images.paths, mask) if m]
    classes = [images.classes[k] for k in keep]
    return replace(images, paths=paths, labels=labels, classes=classes)


def train_val_splits(
    opts: FewShotOptions, val_split: str, val_fraction: float, min_val_classes: int = 2, validate: bool = True
) -> tuple[data.ImageList, data.ImageList | None]:
    """The train split and a validation split of *other* classes.

    Layouts with a val split (miniImageNet, tiered, CIFAR-FS, FC100, CUB) use it. The generic
    folder layout has none, so the last ``val_fraction`` of the train classes is held out: the
    checkpoint is never chosen on test classes (at least ``min_val_classes`` are held out, so
    that a validation episode fits). ``validate=False`` (``val_episodes: 0``): all train
    classes train and no validation split is made (for sets with very few classes).
    """
    train = read_split(opts, "train")
    if not validate:
        return train, None
    try:
        val = read_split(opts, val_split)
        if set(val.classes) & set(train.classes):
            raise DeepEMDError("val split shares classes with train")
        return train, val
    except DeepEMDError:
        pass
    n_classes = len(train.classes)
    n_val = max(min_val_classes, int(round(n_classes * val_fraction)))
    if n_classes - n_val < 2:
        raise DeepEMDError(
            f"only {n_classes} train classes: too few to hold out validation classes",
            core.resolve_data(opts)[1],
            "add classes or give the layout a val split",
        )
    order = np.arange(n_classes)
    return keep_classes(train, order[: n_classes - n_val]), keep_classes(train, order[n_classes - n_val :])


def five_by_five_size(backbone: str) -> int:
    """Input side that gives the paper's 5x5 feature map (25 nodes per image): ResNet-12 halves
    the image four times (84 -> 5), the other backbones have stride 32 (160 -> 5)."""
    return 84 if backbone == "resnet12" else 160


def create_backbone(opts: FewShotOptions, checkpoint: str | None = None) -> nn.Module:
    """The backbone with ``checkpoint`` (ours: its ``backbone`` entry) or else the ``weights`` option.

    A fewshot checkpoint stores the backbone's state under ``backbone``, which the backbone
    registry's loader finds by itself, so pre-train, meta-train and test agree on one format.
    """
    kw = core.backbone_kwargs(opts, five_by_five_size(opts.backbone))
    return backbones.create(
        opts.backbone, pretrained=checkpoint or backbones.pretrained_from_option(opts.backbone, opts.weights), **kw
    )


def input_size(opts: FewShotOptions, net: nn.Module) -> int:
    return int(opts.image_size or net.default_cfg["input_size"])  # create_backbone set the default


def create_extractor(opts: FewShotOptions, net: nn.Module) -> nn.Module:
    """The local feature set the EMD compares: FCN cells (+ pyramid), grid crops or samples."""
    return core.create_extractor(opts.local, net, opts, opts.seed)


def method_label(opts: FewShotOptions) -> str:
    """The paper's name of the DeepEMD variant these options describe."""
    return "DeepEMD-" + local.KINDS.info(opts.local)["label"]


def dataset(images: data.ImageList, opts: FewShotOptions, net: nn.Module, train: bool) -> data.ImageDataset:
    cfg = dict(net.default_cfg)
    cfg["input_size"] = input_size(opts, net)
    return data.ImageDataset(images, data.build_transform(cfg, train=train))
