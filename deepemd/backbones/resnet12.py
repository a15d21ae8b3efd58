"""The few-shot ResNet-12 (64-160-320-640, LeakyReLU 0.1): a 5x5x640 map from an 84 px image.

Four residual stages of three 3x3 convolutions, each stage ending in a 2x2 max-pool, so 84 px
gives 42, 21, 10, 5. Parameter names follow the DeepEMD authors' encoder (``layerN.0.convK``,
``downsample.0/1``) so their released checkpoints load with ``pretrained=<file>`` unchanged.
DropBlock is left out: the authors' runs do not use it in practice.
"""

from __future__ import annotations

from torch import Tensor, nn


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False)


class ResidualStage(nn.Module):
    """conv-bn-act x3 plus a 1x1 projected shortcut, then 2x2 max-pool (halves the map)."""

    def __init__(self, cin: int, cout: int, slope: float):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.conv3, self.bn3 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.act = nn.LeakyReLU(slope)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, bias=False), nn.BatchNorm2d(cout))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.act(out + self.downsample(x)))


class ResNet12(nn.Module):
    """Feature-map network: ``forward(x (B,3,H,W)) -> (B, 640, H/16, W/16)`` (floor at each pool)."""

    def __init__(self, channels: tuple[int, ...] = (64, 160, 320, 640), slope: float = 0.1, input_size: int = 84):
        super().__init__()
        widths = (3, *channels)
        for i in range(len(channels)):
            self.add_module(f"layer{i + 1}", nn.Sequential(ResidualStage(widths[i], widths[i + 1], slope)))
        self.num_stages = len(channels)
        self.out_channels = channels[-1]
        self.default_cfg = {"input_size": input_size, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu", a=slope)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x
