"""``deepemd fewshot test``: features once, seeded episodes, every method on the same episodes.

Writes ``OUT/results.csv`` / ``results.md`` (one row per method: accuracy and 95% CI in
percent), ``OUT/episodes.csv`` (per-episode accuracy of every method, for paired comparisons)
and ``OUT/flows.png`` (one episode's query-support matching flows).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from deepemd.backbones import pretrained_from_option, with_packaged_weights
from deepemd.data import ImageList
from deepemd.device import default_device
from deepemd.emd.sfc import SFCFit
from deepemd.errors import DeepEMDError
from deepemd.eval import write_results
from deepemd.eval.flows import node_boxes
from deepemd.fewshot import build
from deepemd.fewshot.config import EvalConfig
from deepemd.fewshot.episodes import check_episode_size, episode_indices, evaluate, summarise
from deepemd.fewshot.features import FeatureCache, cached
from deepemd.fewshot.figures import episode_flow_figure
from deepemd.fewshot.methods import METHODS, MethodOptions, select
from deepemd.fewshot.validation import emd_options, extract_with
from deepemd.io import atomic_path
from deepemd.seeding import seed_everything

#: Options that change the extracted features (the feature cache key).
FEATURE_OPTIONS = (
    "layout",
    "data_root",
    "split",
    "image_size",
    "backbone",
    "backbone_widths",
    "weights",
    "checkpoint",
    "local",
    "pyramid",
    "grid_levels",
    "grid_ratio",
    "num_patches",
    "inference_dtype",
)


def feature_key(cfg: EvalConfig, images) -> dict:
    """What the cached features depend on, including the checkpoint file's identity (a retrained
    model at the same path must not reuse stale features) and, for sampling, the crop seed."""
    key = {name: getattr(cfg, name) for name in FEATURE_OPTIONS}
    key.update(images=len(images.paths), first=str(images.paths[0]), last=str(images.paths[-1]))
    for name in ("checkpoint", "weights"):
        path = Path(str(getattr(cfg, name)))
        if path.is_file():
            key[name + "_stat"] = (path.stat().st_size, path.stat().st_mtime_ns)
    if cfg.local == "sampling":
        key["seed"] = cfg.seed
    return key


def method_options(cfg: EvalConfig) -> MethodOptions:
    return dataclasses.replace(
        emd_options(cfg),
        label=build.method_label(cfg),
        sfc=SFCFit(steps=cfg.sfc_steps, batch_size=cfg.sfc_batch_size, lr=cfg.sfc_lr),
        finetune_steps=cfg.finetune_steps,
        knn_k=cfg.knn_k,
        seed=cfg.seed,
    )


def run_methods(cfg: EvalConfig, cache: FeatureCache, progress: bool = True) -> tuple[list[dict], dict]:
    """Score every selected method on ``cfg``'s seeded episodes over ``cache``."""
    opts = method_options(cfg)
    keys = select(cfg.methods, cfg.shot)
    methods = {METHODS[k].label(k, opts, cfg.shot): METHODS[k].build(opts) for k in keys}
    seconds: dict[str, float] = {}
    accs = evaluate(
        cache, methods, cfg.way, cfg.shot, cfg.query, cfg.num_episodes(), cfg.seed, progress=progress, seconds=seconds
    )
    rows = summarise(accs, cfg.way, cfg.shot)
    for row in rows:
        row["seconds"] = seconds[row["method"]]
    return rows, accs


def draw_episode(
    cfg: EvalConfig, cache: FeatureCache, paths: list[Path], classes: list[str], size: int, map_side: int, out: Path
) -> Path | None:
    """Flows of the first episode's first query against each class's first support."""
    idx = next(episode_indices(cache.labels, cfg.way, cfg.shot, cfg.query, 1, cfg.seed))
    n_support = cfg.way * cfg.shot
    supports = idx[: n_support : cfg.shot]
    boxes = node_boxes(cfg.local, size, map_side, tuple(cfg.pyramid), tuple(cfg.grid_levels), cfg.grid_ratio)
    sets = cache.local
    if boxes is None:  # sampled crops are not kept: show the backbone's cells instead
        boxes, sets = node_boxes("fcn", size, map_side, (), (), 1.0), cache.cells
    names = [classes[int(cache.labels[i])] for i in supports]
    return episode_flow_figure(
        [paths[int(i)] for i in [idx[n_support], *supports]],
        sets[idx[n_support]],
        sets[supports],
        boxes,
        size,
        names,
        cfg.node_weights,
        cfg.solver,
        cfg.center,
        out,
    )


def refuse_untrained(cfg: EvalConfig) -> None:
    """A random backbone's accuracies look like results but measure nothing, so the default
    (``weights: auto`` on a backbone without packaged weights, no checkpoint) is refused, after
    the data checks so that a bad folder is reported first; ``weights: none`` is the explicit
    request for a random network (a floor, a timing)."""
    untrained = not cfg.checkpoint and pretrained_from_option(cfg.backbone, cfg.weights) is False
    if untrained and str(cfg.weights).strip().lower() == "auto":
        raise DeepEMDError(
            f"backbone '{cfg.backbone}' has no pretrained weights and no --checkpoint was given: "
            "the accuracies would be those of a randomly initialised network",
            None,
            "pass --checkpoint OUT/best.pt from `deepemd fewshot pretrain` or `fewshot train` (checkpoint: in "
            "YAML), or pick a backbone with packaged ImageNet weights (--backbone "
            f"{' or '.join(with_packaged_weights())}); --weights none evaluates the random network on purpose",
        )


def test_features(
    cfg: EvalConfig, images: ImageList, net: nn.Module, extractor: nn.Module, device: torch.device, progress: bool
) -> FeatureCache:
    """The features ``test`` runs its episodes on: read from ``cfg.feature_cache`` when its key
    (:func:`feature_key`) matches, else extracted with ``cfg``'s options and stored there."""
    dataset = build.dataset(images, cfg, net, train=False)
    return cached(
        cfg.feature_cache,
        feature_key(cfg, images),
        lambda: extract_with(cfg, dataset, net, extractor, cfg.local, device, progress, cfg.inference_dtype),
    )


def run_test(cfg: EvalConfig, progress: bool = True) -> pd.DataFrame:
    """The whole ``test`` command; returns the results table it wrote."""
    start = time.perf_counter()
    device = default_device(cfg.device)
    seed_everything(cfg.seed)
    images = build.read_split(cfg, cfg.split)
    check_episode_size(images.labels, cfg.way, cfg.shot, cfg.query, f"{cfg.data_root} ({cfg.split} split)")
    refuse_untrained(cfg)
    net = build.create_backbone(cfg, cfg.checkpoint).to(device)
    extractor = build.create_extractor(cfg, net).to(device)
    size = build.input_size(cfg, net)
    cache = test_features(cfg, images, net, extractor, device, progress)
    extract_seconds = time.perf_counter() - start
    rows, accs = run_methods(cfg, cache, progress)
    for row in rows:
        row.update(backbone=cfg.backbone, local=cfg.local, solver=cfg.solver)
    out = Path(cfg.out)
    frame = write_results(rows, out)
    with atomic_path(out / "episodes.csv") as tmp:
        pd.DataFrame({k: np.round(100 * v, 4) for k, v in accs.items()}).to_csv(tmp, index_label="episode")
    with atomic_path(out / "run.json") as tmp:
        tmp.write_text(
            json.dumps(
                {
                    "config": dataclasses.asdict(cfg),
                    "images": len(images.paths),
                    "classes": len(images.classes),
                    "feature_seconds": extract_seconds,
                    "total_seconds": time.perf_counter() - start,
                },
                indent=2,
                default=str,
            )
        )
    if cfg.flow_picture:
        map_side = int(round(cache.cells.shape[1] ** 0.5))
        draw_episode(cfg, cache, list(images.paths), list(images.classes), size, map_side, out / "flows.png")
    return frame
