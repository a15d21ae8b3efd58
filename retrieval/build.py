"""The retrieval job's builder: options -> images, the embedding network and its loader.

Every stage (``train``, ``index``, ``search``, ``eval``) builds here on top of the core builder
(``deepemd.build``), so no stage imports another stage's module to get its network or data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

import torch

from deepemd import build as core
from deepemd.data import ImageList
from deepemd.options import LocalKindOption
from deepemd.retrieval.config import (
    EvalConfig,
    IndexConfig,
    RetrievalLocalOptions,
    RetrievalModelOptions,
    SearchConfig,
    TrainConfig,
)
from deepemd.retrieval.model import Embedder, LocalSpec, build_backbone, load_trained


def dataset_images(cfg: EvalConfig | IndexConfig | TrainConfig) -> ImageList:
    """The images a command works on (``deepemd.build.read_images`` of its split)."""
    return core.read_images(cfg, cfg.split, cfg.seed)


def local_specs(cfg: EvalConfig | IndexConfig | SearchConfig, kinds: Iterable[str]) -> tuple[LocalSpec, ...]:
    """One :class:`LocalSpec` per distinct local kind, from the shared local options."""
    return tuple(
        LocalSpec(
            kind, tuple(cfg.pyramid), tuple(cfg.grid_levels), cfg.grid_ratio, cfg.num_patches, cfg.patch_size, cfg.seed
        )
        for kind in dict.fromkeys(kinds)
    )


#: The options that rebuild an embedding network and its local sets (a gallery records them).
RECIPE_GROUPS = (RetrievalModelOptions, RetrievalLocalOptions, LocalKindOption)


#: The options that decide the network and its local sets (what a gallery's fingerprint checks);
#: the rest of a recipe (rerank depth, node weights, solver, fusion) is chosen per search.
NETWORK_OPTIONS = (
    "checkpoint",
    "backbone",
    "backbone_widths",
    "weights",
    "embed_dim",
    "image_size",
    "inference_dtype",
    "seed",
    "local",
    "pyramid",
    "grid_levels",
    "grid_ratio",
    "num_patches",
    "patch_size",
)


def make_embedder(cfg: EvalConfig | IndexConfig | SearchConfig, specs: tuple[LocalSpec, ...]) -> Embedder:
    """The network named by ``--checkpoint`` (a trained model) or ``--backbone/--weights``.

    ``model.recipe`` keeps the options that made it (files as absolute paths), so a gallery can
    record them and :meth:`Gallery.open` can rebuild the same network from the folder alone."""
    if cfg.checkpoint:
        net, info = load_trained(cfg.checkpoint)
        if cfg.image_size:
            info.image_size = int(cfg.image_size)
    else:
        net, info = build_backbone(
            cfg.backbone, cfg.weights, cfg.embed_dim, cfg.image_size, cfg.seed, widths=tuple(cfg.backbone_widths)
        )
    model = Embedder(net, info, specs, inference_dtype=cfg.inference_dtype)
    model.recipe = recipe(cfg)
    return model


def recipe(cfg: EvalConfig | IndexConfig | SearchConfig) -> dict[str, Any]:
    """The network and local-set options of ``cfg`` as plain values, files made absolute."""
    names = {f.name for group in RECIPE_GROUPS for f in dataclasses.fields(group)} - {"device", "batch_size", "workers"}
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k in names}
    for key in ("checkpoint", "weights"):
        value = values.get(key)
        if value and Path(str(value)).expanduser().exists():
            values[key] = str(Path(str(value)).expanduser().resolve())
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def make_loader(
    images: ImageList, model: Embedder, batch_size: int, workers: int, train: bool = False
) -> torch.utils.data.DataLoader:
    """Images at the model's size with its backbone's mean/std (test: resize + centre crop)."""
    return core.image_loader(images, model.backbone, model.info.image_size, batch_size, workers, train)


__all__ = ["NETWORK_OPTIONS", "dataset_images", "local_specs", "make_embedder", "make_loader", "recipe"]
