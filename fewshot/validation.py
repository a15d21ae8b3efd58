"""Features and episode accuracy of the network in hand, with a config's settings: the calls
that both trainers' per-epoch validation and the ``test`` command share (a stage module, so
that the trainers need not import the command module)."""

from __future__ import annotations

import torch
from torch import nn

from deepemd.data import ImageDataset
from deepemd.fewshot.config import FewShotOptions, PretrainConfig, TrainConfig
from deepemd.fewshot.episodes import evaluate
from deepemd.fewshot.features import FeatureCache, extract
from deepemd.fewshot.methods import Method, MethodOptions


def extract_with(
    cfg: FewShotOptions,
    dataset: ImageDataset,
    net: nn.Module,
    extractor: nn.Module,
    kind: str,
    device: torch.device,
    progress: bool,
    inference_dtype: str = "float32",
) -> FeatureCache:
    """:func:`extract` with ``cfg``'s batch size, workers and seed: the one call that the test
    command and both trainers' validation make."""
    return extract(
        dataset,
        net,
        extractor,
        kind,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        device=device,
        seed=cfg.seed,
        progress=progress,
        inference_dtype=inference_dtype,
    )


@torch.no_grad()
def validation_accuracy(
    cfg: PretrainConfig | TrainConfig,
    val_set: ImageDataset,
    net: nn.Module,
    extractor: nn.Module,
    kind: str,
    method: Method,
    episode: tuple[int, int, int],
    device: torch.device,
    progress: bool,
) -> float:
    """Mean accuracy (percent) of ``method`` over ``cfg.val_episodes`` seeded ``(way, shot,
    query)`` episodes of ``val_set``, on features extracted afresh in float32 (the network
    changes every epoch, so there is no cache; validation keeps the precision of training)."""
    cache = extract_with(cfg, val_set, net, extractor, kind, device, progress)
    accs = evaluate(cache, {"val": method}, *episode, cfg.val_episodes, cfg.seed, progress=progress)
    return 100.0 * float(accs["val"].mean())


def emd_options(cfg: FewShotOptions) -> MethodOptions:
    """The EMD head's options of ``cfg`` (node weights, solver, temperature, centring): the
    part of :func:`method_options` that validation shares with the test command."""
    return MethodOptions(weights=cfg.node_weights, solver=cfg.solver, temperature=cfg.temperature, center=cfg.center)
