"""From options to objects: dataset splits, the backbone and its local-feature extractor.

All three commands build their data and network here, so a checkpoint written by ``pretrain``
or ``train`` is read back by ``test`` with exactly the same architecture.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepemd import backbones, data, local
from deepemd.errors import DeepEMDError
from deepemd.fewshot.config import BUILTIN_ROOTS, DataOptions, ModelOptions

#: Checkpoint key holding the backbone's weights (pre-train and meta-train both write it).
BACKBONE_KEY = "backbone"


def resolve_root(opts: DataOptions) -> Path:
    """``data_root`` as a folder; the built-in names are materialised once into a cache."""
    if opts.data_root == "demo":
        return data.demo_root()
    if opts.data_root == "fashion-mnist":
        return data.export_fashion_mnist(Path.home() / ".cache" / "deepemd" / "fashion-mnist-200",
                                         per_class=200)
    if not opts.data_root:
        raise DeepEMDError("no dataset given", None,
                           f"pass --data-root DIR (or one of {', '.join(BUILTIN_ROOTS)}) with --layout")
    root = Path(opts.data_root).expanduser()
    if not root.is_dir():
        raise DeepEMDError("dataset folder not found", root, "check --data-root")
    return root


def layout_of(opts: DataOptions) -> str:
    """The built-in data sets are written in the generic folder layout."""
    return "folder" if opts.data_root in BUILTIN_ROOTS else opts.layout


def read_split(opts: DataOptions, split: str) -> data.ImageList:
    """A split's images; with ``--skip-bad`` unreadable files are dropped (counted in a warning)
    before any episode or label is built from the list."""
    images = data.read_layout(layout_of(opts), resolve_root(opts), split)
    return data.drop_unreadable(images)[0] if opts.skip_bad else images


def keep_classes(images: data.ImageList, keep: np.ndarray) -> data.ImageList:
    """Images whose class index is in ``keep``, with labels renumbered 0..len(keep)-1."""
    keep = np.asarray(sorted(set(int(k) for k in keep)))
    mask = np.isin(images.labels, keep)
    remap = {int(old): new for new, old in enumerate(keep)}
    labels = np.array([remap[int(l)] for l in images.labels[mask]], dtype=np.int64)
    paths = [p for p, m in zip(images.paths, mask) if m]
    classes = [images.classes[k] for k in keep]
    return replace(images, paths=paths, labels=labels, classes=classes)


def train_val_splits(opts: DataOptions, val_split: str, val_fraction: float, min_val_classes: int = 2,
                     validate: bool = True) -> tuple[data.ImageList, data.ImageList | None]:
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
        raise DeepEMDError(f"only {n_classes} train classes: too few to hold out validation classes",
                           resolve_root(opts), "add classes or give the layout a val split")
    order = np.arange(n_classes)
    return keep_classes(train, order[: n_classes - n_val]), keep_classes(train, order[n_classes - n_val:])


def five_by_five_size(backbone: str) -> int:
    """Input side that gives the paper's 5x5 feature map (25 nodes per image): ResNet-12 halves
    the image four times (84 -> 5), the other backbones have stride 32 (160 -> 5)."""
    return 84 if backbone == "resnet12" else 160


def create_backbone(opts: ModelOptions, checkpoint: str = "") -> nn.Module:
    """The backbone with ``checkpoint`` (ours: its ``backbone`` entry) or else the ``weights`` option.

    A fewshot checkpoint stores the backbone's state under ``backbone``, which the backbone
    registry's loader finds by itself, so pre-train, meta-train and test agree on one format.
    """
    kw: dict = {"input_size": int(opts.image_size or five_by_five_size(opts.backbone))}
    if opts.backbone_widths:
        if opts.backbone != "resnet12":
            raise DeepEMDError("backbone_widths applies to resnet12 only", None,
                               "drop backbone_widths or use --backbone resnet12")
        kw["channels"] = tuple(opts.backbone_widths)
    return backbones.create(opts.backbone, pretrained=checkpoint or backbones.pretrained_from_option(opts.backbone, opts.weights), **kw)


def input_size(opts: DataOptions, net: nn.Module) -> int:
    return int(opts.image_size or net.default_cfg["input_size"])  # create_backbone set the default


def create_extractor(opts: ModelOptions, net: nn.Module) -> nn.Module:
    """The local feature set the EMD compares: FCN cells (+ pyramid), grid crops or samples."""
    kind = opts.local
    if kind == "fcn":
        return local.create("fcn", net, pyramid=tuple(opts.pyramid))
    if kind == "grid":
        return local.create("grid", net, levels=tuple(opts.grid_levels), ratio=opts.grid_ratio)
    if kind == "sampling":
        return local.create("sampling", net, num_patches=opts.num_patches, seed=opts.seed)
    raise DeepEMDError(f"unknown local feature set '{kind}'", None, "use --local fcn, grid or sampling")


def method_label(opts: ModelOptions) -> str:
    """The paper's name of the DeepEMD variant these options describe."""
    return {"fcn": "DeepEMD-FCN", "grid": "DeepEMD-Grid", "sampling": "DeepEMD-Sampling"}[opts.local]


def dataset(images: data.ImageList, opts: DataOptions, net: nn.Module, train: bool) -> data.ImageDataset:
    cfg = dict(net.default_cfg)
    cfg["input_size"] = input_size(opts, net)
    return data.ImageDataset(images, data.build_transform(cfg, train=train))


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and numpy; return a generator for the job's own draws."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)
