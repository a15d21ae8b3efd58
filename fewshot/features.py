"""Run the network over a split ONCE and keep every image's features, so that thousands of test
episodes (and every method) are sampled over cached tensors instead of re-running the CNN.

Each image keeps three views: the global vector (average-pooled map: ProtoNet, MatchingNet,
FC classifiers), the raw map cells (KNN and prediction fusion on local features) and the local
set the DeepEMD variant compares (FCN cells + pyramid, grid crops, or sampled patches).
Sampling draws its random crops once per image here, under the job's seed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from deepemd import local
from deepemd.backbones import evaluating
from deepemd.data import ImageDataset
from deepemd.device import inference_autocast
from deepemd.io import load_checkpoint, save_checkpoint


@dataclass
class FeatureCache:
    """Features of every image of a split, row ``i`` = image ``i`` (``labels[i]``)."""

    global_: torch.Tensor  # (N, C)
    cells: torch.Tensor  # (N, h*w, C)
    local: torch.Tensor  # (N, m, d): the DeepEMD local set
    labels: np.ndarray  # (N,) int64

    def take(self, idx: np.ndarray | torch.Tensor) -> "FeatureCache":
        """Rows ``idx`` (any shape: ``(E, n)`` gives ``(E, n, ...)`` tensors); when the local set
        is the cells, one copy serves as both (methods test ``local is cells`` to share work)."""
        idx_t = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        cells = self.cells[idx_t]
        local = cells if self.local is self.cells else self.local[idx_t]
        return FeatureCache(self.global_[idx_t], cells, local, self.labels[np.asarray(idx)])


def cells_of(feature_map: torch.Tensor) -> torch.Tensor:
    """``(B,C,h,w) -> (B, h*w, C)``: every location of the map as one local vector."""
    return feature_map.flatten(2).transpose(1, 2)


@torch.no_grad()
def extract(
    dataset: ImageDataset,
    backbone: nn.Module,
    extractor: nn.Module,
    kind: str,
    batch_size: int = 64,
    workers: int = 0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
    inference_dtype: str = "float32",
) -> FeatureCache:
    """Features of every image of ``dataset`` (eval mode, no gradients, in dataset order; the
    backbone under :func:`deepemd.device.inference_autocast` of ``inference_dtype``).

    For ``kind == "fcn"`` the local set comes from the same backbone pass
    (``from_feature_map``); grid and sampling need their own pass over the crops.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    globals_, cells, locals_, labels = [], [], [], []
    local_is_cells = True  # plain FCN: the local set IS the cells; keep one copy in memory
    if hasattr(extractor, "reseed"):  # sampling: the same crops for the same seed
        extractor.reseed(seed)
    with evaluating(backbone, extractor), inference_autocast(device, inference_dtype):
        for images, targets in tqdm(loader, desc="features", disable=not progress, leave=False):
            images = images.to(device)
            fmap = backbone(images).float()
            globals_.append(local.global_features(fmap).cpu())
            cells.append(cells_of(fmap).cpu())
            sets = (extractor.from_feature_map(fmap) if kind == "fcn" else extractor(images)).float().cpu()
            local_is_cells = local_is_cells and sets.shape == cells[-1].shape and torch.equal(sets, cells[-1])
            locals_.append(sets)
            labels.append(np.asarray(targets, dtype=np.int64))
    all_cells = torch.cat(cells)
    sets = all_cells if local_is_cells else torch.cat(locals_)
    return FeatureCache(torch.cat(globals_), all_cells, sets, np.concatenate(labels))


def cached(folder: str | Path, key: dict[str, Any], make: Callable[[], FeatureCache]) -> FeatureCache:
    """``make()``'s features, stored once in ``folder`` under a hash of ``key`` (every option
    that changes them); a later run with the same key loads them instead of running the CNN."""
    if not folder:
        return make()
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(folder) / f"features-{digest}.pt"
    if path.is_file():
        state = load_checkpoint(path)
        return FeatureCache(state["global"], state["cells"], state["local"], state["labels"].numpy())
    cache = make()
    save_checkpoint(
        {
            "global": cache.global_,
            "cells": cache.cells,
            "key": json.dumps(key, default=str),
            "local": cache.local if cache.local is not cache.cells else cache.cells,
            "labels": torch.from_numpy(cache.labels),
        },
        path,
    )
    return cache
