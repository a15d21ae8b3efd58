"""DeepEMD-Sampling: M random resized crops per image (like ``RandomResizedCrop``), each
embedded as one node, all crops of the batch in one backbone pass.

Boxes come from a ``torch.Generator`` seeded at construction: the same seed and the same
sequence of calls give the same patches (call :meth:`reseed` to replay). Area fraction is
uniform in ``scale``, log aspect ratio uniform in ``log(ratio)``; like torchvision, ten draws
are tried per crop and a crop that never fits falls back to the central crop with the aspect
ratio clamped to ``ratio``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from deepemd.backbones import default_cfg
from deepemd.local.crops import embed_crops

_TRIES = 10


def sample_boxes(
    b: int,
    m: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> Tensor:
    """``(b, m, 4)`` boxes ``(x0, y0, x1, y1)`` in pixels."""
    area = height * width
    shape = (b, m, _TRIES)
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(shape, generator=generator))
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(shape, generator=generator)
    aspect = torch.exp(log_r)
    cw = torch.sqrt(target * aspect).round()
    ch = torch.sqrt(target / aspect).round()
    ok = (cw > 0) & (ch > 0) & (cw <= width) & (ch <= height)
    first = torch.where(ok.any(-1), ok.float().argmax(-1), torch.full((b, m), -1))
    # fallback (no draw fits): central crop, aspect clamped to the ratio range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    pick = first.clamp(min=0)[..., None]
    cw = torch.where(first >= 0, cw.gather(-1, pick)[..., 0], torch.tensor(float(fw)))
    ch = torch.where(first >= 0, ch.gather(-1, pick)[..., 0], torch.tensor(float(fh)))
    u = torch.rand((b, m, 2), generator=generator)
    x0 = torch.where(first >= 0, (u[..., 0] * (width - cw + 1)).floor(), torch.tensor(float((width - fw) // 2)))
    y0 = torch.where(first >= 0, (u[..., 1] * (height - ch + 1)).floor(), torch.tensor(float((height - fh) // 2)))
    return torch.stack([x0, y0, x0 + cw, y0 + ch], dim=-1)


class Sampling(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        num_patches: int = 25,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        patch_size: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if num_patches < 1 or not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"bad sampling settings: num_patches={num_patches}, scale={scale}, ratio={ratio}")
        self.backbone = backbone
        self.num_nodes = int(num_patches)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.patch_size = int(patch_size or default_cfg(backbone)["input_size"])
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def forward(self, images: Tensor) -> Tensor:
        b, _, h, w = images.shape
        boxes = sample_boxes(b, self.num_nodes, h, w, self.scale, self.ratio, self.generator)
        return embed_crops(self.backbone, images, boxes.to(images.device), self.patch_size, "sampling")
