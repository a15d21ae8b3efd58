"""The retrieval network: a backbone whose map gives a global vector and local sets.

``images -> backbone -> feature map -> (global vector for FAISS, local set for DeepEMD)``.
A trained checkpoint records how to rebuild its backbone, so ``index``/``search``/``eval`` need
only ``--checkpoint``. The fingerprint ties an index and a feature store to the exact network
and local settings that produced them, so a mismatch is caught at load time, not as bad results.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepemd import backbones, local
from deepemd.build import local_kwargs
from deepemd.device import inference_autocast
from deepemd.errors import DeepEMDError
from deepemd.io import load_checkpoint, load_state_dict_checked
from deepemd.local.crops import forward_chunks
from deepemd.timing import JobClock, stage


@dataclass(frozen=True)
class LocalSpec:
    """One way to cut an image into a local set (paper 4.4)."""

    kind: str
    pyramid: tuple[int, ...] = (3, 2, 1)
    grid_levels: tuple[int, ...] = (3, 2)
    grid_ratio: float = 1.0
    num_patches: int = 25
    patch_size: int | None = None
    seed: int = 0

    def kwargs(self) -> dict[str, Any]:
        return local_kwargs(self.kind, self, self.seed)  # type: ignore[arg-type]  # a LocalSpec reads as LocalOptions

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.kwargs().items()}}


@dataclass
class ModelInfo:
    """How to rebuild the backbone (saved in checkpoints, part of every fingerprint)."""

    backbone: str
    embed_dim: int | None
    image_size: int
    source: str  # "imagenet", "random", a weights path, or a deepemd checkpoint path
    extra: dict[str, Any] = field(default_factory=dict)


def build_backbone(
    name: str, weights: str, embed_dim: int | None, image_size: int | None, seed: int = 0, widths: tuple[int, ...] = ()
) -> tuple[nn.Module, ModelInfo]:
    """Create the backbone (``weights="auto"`` falls back to random init where no packaged
    ImageNet weights exist, e.g. ResNet-50 here) and record how it was made."""
    pretrained = backbones.pretrained_from_option(name, weights)
    source = "random" if weights == "auto" and pretrained is False else weights
    # Randomly initialised parts (a whole random backbone, or the embed_dim head on top of
    # pretrained weights) come from ``seed`` alone, so `index` and a later `search` with the same
    # --seed build the same network and its fingerprint matches the gallery's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = backbones.create(
            name, pretrained=pretrained, embed_dim=embed_dim, **({"channels": tuple(widths)} if widths else {})
        )
    size = int(image_size or net.default_cfg["input_size"])
    return net, ModelInfo(name, embed_dim, size, str(source), {"widths": list(widths)} if widths else {})


def load_trained(path: str) -> tuple[nn.Module, ModelInfo]:
    """Rebuild a network from a ``deepemd retrieval train`` checkpoint."""
    ckpt = load_checkpoint(path)
    meta = ckpt.get("model_info")
    if not isinstance(meta, dict) or "model" not in ckpt:
        raise DeepEMDError(
            "not a deepemd retrieval checkpoint (no model_info / model)",
            path,
            "give a checkpoint written by `deepemd retrieval train`",
        )
    widths = tuple(meta.get("widths", ()))
    net, _ = build_backbone(meta["backbone"], "none", meta.get("embed_dim"), meta.get("image_size"), widths=widths)
    load_state_dict_checked(net, ckpt["model"], path)
    info = ModelInfo(
        meta["backbone"],
        meta.get("embed_dim"),
        int(meta["image_size"]),
        str(path),
        {"widths": list(widths)} if widths else {},
    )
    return net, info


def weights_hash(net: nn.Module) -> str:
    """sha256 over all parameters and buffers: two indexes match only if made by equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class Embedder(nn.Module):
    """Backbone + local extractors. ``forward(images) -> (global (B,C) L2-normalised, {kind: (B,m,C)})``.

    FCN sets reuse the one feature map; grid/sampling run the backbone on their crops. In eval
    mode the backbone runs under :func:`deepemd.device.inference_autocast` of ``inference_dtype``
    (``--inference-dtype``); training forwards always run in float32.
    """

    def __init__(
        self,
        backbone: nn.Module,
        info: ModelInfo,
        specs: tuple[LocalSpec, ...] = (),
        inference_dtype: str = "float32",
    ):
        super().__init__()
        self.backbone, self.info, self.inference_dtype = backbone, info, inference_dtype
        self.specs = {spec.kind: spec for spec in specs}
        self.extractors = nn.ModuleDict({s.kind: local.create(s.kind, backbone, **s.kwargs()) for s in specs})

    @property
    def dim(self) -> int:
        return int(self.backbone.out_channels)

    def num_nodes(self, kind: str) -> int:
        return int(self.extractors[kind].num_nodes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        precision = (
            contextlib.nullcontext() if self.training else inference_autocast(images.device, self.inference_dtype)
        )
        with precision:
            return self._features(images)

    def _features(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with stage("backbone: image maps"):
            fmap = forward_chunks(self.backbone, images)
        glob = F.normalize(local.global_features(fmap), dim=1)
        sets = {}
        for kind, extractor in self.extractors.items():
            if kind == "fcn":
                with stage("fcn: pyramid"):
                    sets[kind] = extractor.from_feature_map(fmap)
            else:
                sets[kind] = extractor(images)
        return glob, sets

    def for_inference(self, device: torch.device) -> Embedder:
        """Eval mode on ``device`` in channels-last layout (what :func:`forward_chunks` feeds)."""
        return self.eval().to(device=device, memory_format=torch.channels_last)

    def fingerprint(self, kind: str | None) -> dict[str, Any]:
        fp = {
            "backbone": self.info.backbone,
            "embed_dim": self.dim,
            "image_size": self.info.image_size,
            "weights": weights_hash(self.backbone),
        }
        if self.inference_dtype != "float32":  # float32 galleries keep the fingerprint they had
            fp["inference_dtype"] = self.inference_dtype
        if kind is not None:
            fp["local"] = self.specs[kind].describe()
        return fp


def embed_loader(
    model: Embedder,
    loader,
    device: torch.device,
    progress: bool = True,
    desc: str = "features",
    clock: JobClock | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Run ``model`` over a loader: global vectors (float32), local sets (float16), labels.

    Every image is decoded once and passes the backbone once for all local kinds; ``clock``
    (planned stage ``"features"`` in images) gets the progress, and the bar shows its job ETA."""
    from tqdm.auto import tqdm

    model.for_inference(device)
    globs, labels, sets = [], [], {k: [] for k in model.extractors}
    bar = tqdm(total=len(loader.dataset), desc=desc, disable=not progress, leave=False, unit="img")
    batches = iter(loader)
    with torch.inference_mode(), bar:
        while True:
            start = time.perf_counter()
            with stage("decode + transform"):
                batch = next(batches, None)
            if batch is None:
                break
            images, targets = batch
            g, s = model(images.to(device))
            globs.append(g.float().cpu().numpy())
            labels.append(np.asarray(targets))
            for k, v in s.items():
                # torch converts ~10x faster than numpy; node-major rows (the FCN map's sets are
                # channel-major views): the rerank gathers and converts them 2-3x faster
                sets[k].append(v.to(torch.float16, memory_format=torch.contiguous_format).cpu().numpy())
            bar.update(len(images))
            if clock is not None:
                clock.advance("features", len(images), time.perf_counter() - start)
                bar.set_postfix_str(clock.describe(), refresh=False)
    if not globs:
        raise DeepEMDError("no images to embed", fix="check --data-root, --layout and --split")
    return (np.concatenate(globs), {k: np.concatenate(v) for k, v in sets.items()}, np.concatenate(labels))
