"""The metric-learning losses of paper Table 8, as pytorch-metric-learning builds them.

Hyper-parameters follow common published settings for CUB (pml / powerful-benchmarker
defaults where they exist). Proxy losses (normsoftmax, softtriple, arcface) hold parameters and
get their own optimizer; pair losses (contrastive, multisimilarity) accept any pml distance,
DeepEMD included. Every loss is an entry of :data:`LOSSES`: ``builder(num_classes, embed_dim,
distance) -> LossBundle``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from pytorch_metric_learning import distances, losses, miners

from deepemd.errors import DeepEMDError
from deepemd.registry import Registry


@dataclass
class LossBundle:
    loss: torch.nn.Module
    miner: Optional[torch.nn.Module]

    @property
    def has_parameters(self) -> bool:
        return any(True for _ in self.loss.parameters())


Builder = Callable[[int, int, distances.BaseDistance], LossBundle]

#: Every retrieval training loss by name; ``info["distance"]``: it accepts a custom distance.
LOSSES: Registry[Builder] = Registry("loss")


@LOSSES.register("normsoftmax", distance=False)
def _normsoftmax(num_classes: int, embed_dim: int, sim: distances.BaseDistance) -> LossBundle:
    return LossBundle(losses.NormalizedSoftmaxLoss(num_classes, embed_dim, temperature=0.05), None)


@LOSSES.register("contrastive", distance=True)
def _contrastive(num_classes: int, embed_dim: int, sim: distances.BaseDistance) -> LossBundle:
    return LossBundle(losses.ContrastiveLoss(pos_margin=0.9, neg_margin=0.4, distance=sim), None)


@LOSSES.register("softtriple", distance=False)
def _softtriple(num_classes: int, embed_dim: int, sim: distances.BaseDistance) -> LossBundle:
    return LossBundle(
        losses.SoftTripleLoss(num_classes, embed_dim, centers_per_class=10, la=20, gamma=0.1, margin=0.01), None
    )


@LOSSES.register("arcface", distance=False)
def _arcface(num_classes: int, embed_dim: int, sim: distances.BaseDistance) -> LossBundle:
    return LossBundle(losses.ArcFaceLoss(num_classes, embed_dim, margin=28.6, scale=64), None)


@LOSSES.register("multisimilarity", distance=True)
def _multisimilarity(num_classes: int, embed_dim: int, sim: distances.BaseDistance) -> LossBundle:
    return LossBundle(
        losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5, distance=sim),
        miners.MultiSimilarityMiner(epsilon=0.1, distance=sim),
    )


@LOSSES.register("snr", distance=False)
def _snr(num_classes: int, embed_dim: int, sim: distances.BaseDistance) -> LossBundle:
    return LossBundle(losses.SignalToNoiseRatioContrastiveLoss(pos_margin=0.0, neg_margin=1.0), None)


def build_loss(
    name: str,
    num_classes: int,
    embed_dim: int,
    distance: Optional[distances.BaseDistance] = None,
    label_loss: Optional[torch.nn.Module] = None,
) -> LossBundle:
    """Loss ``name`` (+ its miner) for ``num_classes`` train classes and ``embed_dim`` embeddings.

    ``distance`` replaces the loss's default metric (only pair losses accept one).
    ``label_loss`` (a per-row ``deepemd.labels.TreeEMDLoss``, ``--label-loss``) replaces
    NormSoftmax's cross-entropy on its proxy logits, which are a distribution over the classes.
    """
    builder = LOSSES.get(name)
    if label_loss is not None and name != "normsoftmax":
        raise DeepEMDError(
            f"--label-loss applies to normsoftmax (its proxy logits are a class distribution), not to loss '{name}'",
            fix="use --loss normsoftmax, or --label-loss ce",
        )
    if distance is not None and not LOSSES.info(name)["distance"]:
        pair = [n for n in LOSSES if LOSSES.info(n)["distance"]]
        raise DeepEMDError(
            f"loss '{name}' cannot use a custom distance such as DeepEMD",
            fix=f"use --distance cosine, or a pair loss: {', '.join(pair)}",
        )
    bundle = builder(num_classes, embed_dim, distance if distance is not None else distances.CosineSimilarity())
    if label_loss is not None:
        bundle.loss.cross_entropy = label_loss  # pml calls it as (logits, labels) -> per-row losses
    return bundle


__all__ = ["LOSSES", "LossBundle", "build_loss"]
