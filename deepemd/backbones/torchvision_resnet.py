"""torchvision's ResNet-18/50 without pooling and classifier: the layer4 map is the output.

Parameter names are torchvision's, so an ImageNet ``.pth`` from torchvision (which the user
downloads themselves; nothing is fetched here) loads with ``pretrained=<file>``; its ``fc.*``
keys are ignored.
"""

from __future__ import annotations

from torch import Tensor
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

_IMAGENET = {"input_size": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


class ResNetFeatures(ResNet):
    def __init__(self, depth: int, input_size: int = 224):
        block, layers = {18: (BasicBlock, [2, 2, 2, 2]), 50: (Bottleneck, [3, 4, 6, 3])}[depth]
        super().__init__(block, layers)
        del self.fc, self.avgpool  # a feature network: global pooling happens downstream
        self.out_channels = 512 * block.expansion
        self.default_cfg = dict(_IMAGENET, input_size=input_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
