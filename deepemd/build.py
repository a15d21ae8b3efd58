"""From options to objects, once for both jobs: data root -> image list, local-set extractor, loader.

Both jobs read the same option groups (``deepemd.options``) and build their data and networks
here, so a folder, a layout, ``--data-root demo``, a subsample or a Grid setting mean the same
images and the same local sets in retrieval and few-shot alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepemd import backbones, data, local
from deepemd.errors import DeepEMDError
from deepemd.options import BUILTIN_ROOTS, DataOptions, LocalOptions, ModelOptions


def resolve_data(opts: DataOptions) -> tuple[str, Path]:
    """``(layout, root)`` of ``data_root``: a folder as given, or a built-in set written out once
    in the folder layout (``demo``: the bundled Omniglot drawings; ``fashion-mnist``: Debian's files)."""
    if opts.data_root == "demo":
        return "folder", data.demo_root()
    if opts.data_root == "fashion-mnist":
        return "folder", data.export_fashion_mnist(
            Path.home() / ".cache" / "deepemd" / "fashion-mnist-200", per_class=200
        )
    if not opts.data_root:
        raise DeepEMDError(
            "no dataset given", None, f"pass --data-root DIR (or one of {', '.join(BUILTIN_ROOTS)}) with --layout"
        )
    root = Path(opts.data_root).expanduser()
    if not root.is_dir():
        raise DeepEMDError("dataset folder not found", root, "check --data-root")
    return opts.layout, root


def subsample(images: data.ImageList, max_classes: int | None, per_class: int | None, seed: int) -> data.ImageList:
    """At most ``max_classes`` classes and ``per_class`` images each, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    classes = np.unique(images.labels)
    if max_classes is not None and max_classes < len(classes):
        classes = np.sort(rng.choice(classes, size=max_classes, replace=False))
    keep = []
    for c in classes:
        idx = np.flatnonzero(images.labels == c)
        if per_class is not None and per_class < len(idx):
            idx = np.sort(rng.choice(idx, size=per_class, replace=False))
        keep.append(idx)
    return images.subset(np.concatenate(keep)) if keep else images.subset([])


def read_images(opts: DataOptions, split: str, seed: int) -> data.ImageList:
    """The images a command works on: the layout's ``split``, the seeded subsample, and with
    ``--skip-bad`` unreadable files dropped before any label, sampler or episode is built.
    The command's own ``--out`` is never listed, should it lie inside the data root."""
    layout, root = resolve_data(opts)
    listed = data.read_layout(layout, root, split, exclude=[getattr(opts, "out", None)])
    images = subsample(listed, opts.max_classes, opts.per_class, seed)
    return data.drop_unreadable(images)[0] if opts.skip_bad else images


def backbone_kwargs(opts: ModelOptions, default_size: int | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`deepemd.backbones.create` that the network options set."""
    kw: dict[str, Any] = {}
    size = opts.image_size or default_size
    if size:
        kw["input_size"] = int(size)
    if opts.backbone_widths:
        if opts.backbone != "resnet12":
            raise DeepEMDError(
                "backbone_widths applies to resnet12 only", None, "drop backbone_widths or use --backbone resnet12"
            )
        kw["channels"] = tuple(opts.backbone_widths)
    return kw


def local_kwargs(kind: str, opts: LocalOptions, seed: int) -> dict[str, Any]:
    """The extractor arguments of local kind ``kind`` (paper 4.4) from the shared local options."""
    local.KINDS.key(kind)  # one clear error for an unknown kind
    if kind == "fcn":
        return {"pyramid": tuple(opts.pyramid)}
    if kind == "grid":
        return {"levels": tuple(opts.grid_levels), "ratio": float(opts.grid_ratio), "patch_size": opts.patch_size}
    return {"num_patches": int(opts.num_patches), "patch_size": opts.patch_size, "seed": int(seed)}


def create_extractor(kind: str, backbone: nn.Module, opts: LocalOptions, seed: int) -> nn.Module:
    """The local-set extractor of ``kind`` over ``backbone``: FCN cells, Grid crops or samples."""
    return local.create(kind, backbone, **local_kwargs(kind, opts, seed))


def image_loader(
    images: data.ImageList, backbone: nn.Module, size: int, batch_size: int, workers: int, train: bool = False
) -> torch.utils.data.DataLoader:
    """Images at ``size`` with the backbone's mean/std (test: resize + centre crop, in order)."""
    cfg = {**backbones.default_cfg(backbone), "input_size": int(size)}
    dataset = data.ImageDataset(images, data.build_transform(cfg, train=train))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


__all__ = [
    "resolve_data",
    "subsample",
    "read_images",
    "backbone_kwargs",
    "local_kwargs",
    "create_extractor",
    "image_loader",
]
