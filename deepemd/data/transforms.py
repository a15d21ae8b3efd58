"""Image transforms (torchvision.transforms.v2) matched to a backbone's ``default_cfg``.

Test: ``Resize(round(size * 92 / 84))`` then ``CenterCrop(size)``: the authors' Resize(92) /
CenterCrop(84) at 84 px, scaled to any input size (224 px -> Resize(245), CenterCrop(224)).
Train: ``RandomResizedCrop(size)`` + horizontal flip. Both end with float conversion and the
backbone's mean/std normalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torchvision.transforms import v2

from deepemd.data.images import load_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 92 / 84


def test_geometry(size: int) -> v2.Compose:
    """The test-time geometry alone: ``Resize(round(size * 92 / 84))`` + ``CenterCrop(size)``."""
    return v2.Compose([v2.Resize(round(size * RESIZE_RATIO), antialias=True), v2.CenterCrop(size)])


def seen_image(path: str | Path, size: int) -> np.ndarray:
    """The image as the network saw it at test time, uint8 RGB ``(size, size, 3)``: the same
    decode and geometry as :func:`build_transform`, so boxes drawn on it sit on the regions the
    network's nodes came from, whatever the image's aspect ratio."""
    image = v2.ToImage()(load_image(path))
    return test_geometry(size)(image).permute(1, 2, 0).numpy()


def build_transform(backbone_cfg_or_size: Mapping[str, Any] | int, train: bool = False) -> v2.Compose:
    """``backbone_cfg_or_size``: a backbone's ``default_cfg`` or an int size (ImageNet mean/std)."""
    if isinstance(backbone_cfg_or_size, int):
        size, mean, std = backbone_cfg_or_size, IMAGENET_MEAN, IMAGENET_STD
    else:
        cfg = backbone_cfg_or_size
        size = int(cfg["input_size"])
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    if train:
        geometry = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        geometry = list(test_geometry(size).transforms)
    return v2.Compose([v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
