"""The BatchNorm policy of every training command (``--bn``, ``--bn-affine``).

A pretrained backbone's running statistics were estimated on large batches of its own training
data. Updating them in train mode on small few-shot episodes (30 images of 5 classes) or on
class-balanced metric-learning batches replaces them with noisy, task-specific estimates: on a
100-class character folder one epoch of meta-training at a learning rate of 1e-12 (no weight
change at all) cost 5.6 validation points through the statistics alone. So a backbone that starts
from pretrained weights keeps its statistics (``frozen``: every BatchNorm layer stays in eval mode
whatever ``model.train()`` says); one trained from scratch (the paper's ResNet-12 pre-training)
must estimate them (``train``). The affine scale and shift are ordinary weights and train unless
``--bn-affine frozen``.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from deepemd.backbones import pretrained_from_option
from deepemd.errors import DeepEMDError

BN_POLICIES = ("auto", "frozen", "train")
AFFINE_POLICIES = ("train", "frozen")


def resolve_bn(policy: str, backbone: str, weights: str, init: str = "") -> str:
    """``auto`` -> ``frozen`` when the backbone starts from pretrained weights (``init``, a
    checkpoint to start from, or a ``--weights`` option meaning ImageNet or a file), ``train``
    when it starts from random init; ``frozen`` / ``train`` pass through."""
    key = str(policy).strip().lower()
    if key not in BN_POLICIES:
        raise DeepEMDError(
            f"unknown BatchNorm policy '{policy}'",
            None,
            "use --bn auto (frozen for pretrained weights, train from scratch), frozen or train",
        )
    if key == "auto":
        return "frozen" if init or pretrained_from_option(backbone, weights) else "train"
    return key


def check_affine(policy: str) -> str:
    key = str(policy).strip().lower()
    if key not in AFFINE_POLICIES:
        raise DeepEMDError(f"unknown BatchNorm affine policy '{policy}'", None, "use --bn-affine train or frozen")
    return key


def batchnorm_layers(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


def freeze_affine(module: nn.Module) -> list[_BatchNorm]:
    """Stop gradients to every BatchNorm scale and shift (optimisers skip parameters without a
    gradient, weight decay included); returns the layers."""
    layers = batchnorm_layers(module)
    for bn in layers:
        for p in (bn.weight, bn.bias):
            if p is not None:
                p.requires_grad_(False)
    return layers


def train_mode(module: nn.Module, bn: str) -> nn.Module:
    """``module.train()`` under the policy: with ``bn='frozen'`` every BatchNorm layer is put back
    in eval mode, so its forward normalises with (and never updates) the running statistics.
    Call it wherever a training loop would call ``model.train()``."""
    module.train()
    if bn == "frozen":
        for layer in batchnorm_layers(module):
            layer.eval()
    return module


def prepare(module: nn.Module, cfg: Any, init: str = "") -> tuple[str, str]:
    """One training command's policy from its options (``bn``, ``bn_affine``, ``backbone``,
    ``weights``; ``init`` = a checkpoint it starts from): freezes the affine parameters of
    ``module`` if asked and returns the resolved ``bn`` (to record in the checkpoint's config)
    and the line to print at the start of training."""
    bn = resolve_bn(cfg.bn, cfg.backbone, cfg.weights, init)
    affine = check_affine(cfg.bn_affine)
    n = len(freeze_affine(module) if affine == "frozen" else batchnorm_layers(module))
    stats = (
        "running statistics frozen (eval mode)"
        if bn == "frozen"
        else "running statistics updated by every training batch (train mode)"
    )
    why = (
        " (asked)"
        if str(cfg.bn).strip().lower() != "auto"
        else (" (auto: pretrained start)" if bn == "frozen" else " (auto: random start)")
    )
    return bn, f"batchnorm {bn}{why}: {stats}, scale/shift {affine}; {n} layers"
