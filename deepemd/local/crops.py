"""Cropping many boxes out of a batch of images in one call, then one backbone pass on them all.

``torchvision.ops.roi_align`` crops and resizes every box at once (bilinear, averaging
``ceil(box/out)`` samples per output pixel, so shrinking a big box does not alias); boxes are in
pixel coordinates ``(x0, y0, x1, y1)``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align


def crop_and_resize(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """``images (B,3,H,W)``, ``boxes (B, n, 4)`` -> crops ``(B*n, 3, size, size)`` (image-major)."""
    b, n = boxes.shape[:2]
    index = torch.arange(b, device=images.device, dtype=images.dtype).repeat_interleave(n)[:, None]
    rois = torch.cat([index, boxes.reshape(b * n, 4).to(images)], dim=1)
    return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def embed_crops(backbone: nn.Module, images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """One backbone forward on all crops of the batch; each crop average-pooled to one node."""
    b, n = boxes.shape[:2]
    fmap = backbone(crop_and_resize(images, boxes, size))
    return fmap.mean(dim=(2, 3)).reshape(b, n, -1)
