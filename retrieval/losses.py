"""The metric-learning losses of paper Table 8, as pytorch-metric-learning builds them.

Hyper-parameters follow common published settings for CUB (pml / powerful-benchmarker
defaults where they exist). Proxy losses (normsoftmax, softtriple, arcface) hold parameters and
get their own optimizer; pair losses (contrastive, multisimilarity, snr) accept any pml
distance, DeepEMD included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from pytorch_metric_learning import distances, losses, miners

from deepemd.errors import DeepEMDError

PAIR_LOSSES = ("contrastive", "multisimilarity")
PROXY_LOSSES = ("normsoftmax", "softtriple", "arcface")


@dataclass
class LossBundle:
    loss: torch.nn.Module
    miner: Optional[torch.nn.Module]

    @property
    def has_parameters(self) -> bool:
        return any(True for _ in self.loss.parameters())


def build_loss(name: str, num_classes: int, embed_dim: int,
               distance: Optional[distances.BaseDistance] = None) -> LossBundle:
    """Loss ``name`` (+ its miner) for ``num_classes`` train classes and ``embed_dim`` embeddings.

    ``distance`` replaces the loss's default metric (only pair losses accept one).
    """
    if distance is not None and name not in PAIR_LOSSES:
        raise DeepEMDError(f"loss '{name}' cannot use a custom distance such as DeepEMD",
                           fix=f"use --distance cosine, or a pair loss: {', '.join(PAIR_LOSSES)}")
    sim = distance if distance is not None else distances.CosineSimilarity()
    if name == "contrastive":
        return LossBundle(losses.ContrastiveLoss(pos_margin=0.9, neg_margin=0.4, distance=sim), None)
    if name == "multisimilarity":
        return LossBundle(losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5, distance=sim),
                          miners.MultiSimilarityMiner(epsilon=0.1, distance=sim))
    if name == "snr":
        return LossBundle(losses.SignalToNoiseRatioContrastiveLoss(pos_margin=0.0, neg_margin=1.0),
                          None)
    if name == "normsoftmax":
        return LossBundle(losses.NormalizedSoftmaxLoss(num_classes, embed_dim, temperature=0.05), None)
    if name == "softtriple":
        return LossBundle(losses.SoftTripleLoss(num_classes, embed_dim, centers_per_class=10,
                                                la=20, gamma=0.1, margin=0.01), None)
    if name == "arcface":
        return LossBundle(losses.ArcFaceLoss(num_classes, embed_dim, margin=28.6, scale=64), None)
    known = ", ".join(PAIR_LOSSES + PROXY_LOSSES + ("snr",))
    raise DeepEMDError(f"unknown loss '{name}'", fix=f"choose one of: {known}")
