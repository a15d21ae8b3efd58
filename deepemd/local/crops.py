"""Cropping many boxes out of a batch of images in one call, then the backbone on all of them.

``torchvision.ops.roi_align`` crops and resizes every box at once (bilinear, averaging
``ceil(box/out)`` samples per output pixel, so shrinking a big box does not alias); boxes are in
pixel coordinates ``(x0, y0, x1, y1)``.

The backbone then runs over the crops in pieces of at most :data:`CHUNK_PIXELS` input pixels
(:func:`forward_chunks`), in channels-last layout: one forward over all 13-25 crops of a batch
of 32 images (416-800 crops) allocates activations so large that the allocator returns them to
the OS after every call and page faults eat the time (measured on EfficientNet-Lite0 at 96 px:
90 crops/s at 64 crops per forward, 53 at 416, with 40-45% system time); channels-last is the
layout oneDNN's CPU convolutions run fastest in (120 vs 90 crops/s at 64).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from deepemd.timing import stage

#: Input pixels per backbone forward: 64 crops of 96 px, or 11 images of 224 px.
CHUNK_PIXELS = 64 * 96 * 96


def forward_chunks(backbone: nn.Module, x: Tensor, pixels: int = CHUNK_PIXELS) -> Tensor:
    """``backbone(x)`` computed over pieces of the batch of at most ``pixels`` input pixels each
    (at least one image), each in channels-last layout; the same maps as one call, in ``x``'s
    dtype (under a bfloat16 autocast, pooling and pyramids then still run in float32)."""
    step = max(1, pixels // (x.shape[-1] * x.shape[-2]))
    x = x.contiguous(memory_format=torch.channels_last)
    if len(x) <= step:
        return backbone(x).to(x.dtype)
    return torch.cat([backbone(x[i : i + step]).to(x.dtype) for i in range(0, len(x), step)])


def crop_and_resize(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """``images (B,3,H,W)``, ``boxes (B, n, 4)`` -> crops ``(B*n, 3, size, size)`` (image-major)."""
    b, n = boxes.shape[:2]
    index = torch.arange(b, device=images.device, dtype=images.dtype).repeat_interleave(n)[:, None]
    rois = torch.cat([index, boxes.reshape(b * n, 4).to(images)], dim=1)
    return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def embed_crops(backbone: nn.Module, images: Tensor, boxes: Tensor, size: int, name: str = "crops") -> Tensor:
    """The backbone on all crops of the batch (:func:`forward_chunks`); each crop average-pooled
    to one node. ``name``: the stage name the timings are recorded under."""
    b, n = boxes.shape[:2]
    with stage(f"crops: {name}"):
        crops = crop_and_resize(images, boxes, size)
    with stage(f"backbone: {name} crops"):
        fmap = forward_chunks(backbone, crops)
    return fmap.mean(dim=(2, 3)).reshape(b, n, -1)
