"""The structured fully connected layer (SFC, paper section 4.5, Algorithm 1).

A standard FC layer scores a vector against one learnable vector per class. The SFC scores a
local feature *set* against one learnable prototype *set* per class, with the EMD as the metric,
so a k-shot support set can be summarised by a "dummy image" per class that is fitted to the
support through the differentiable EMD layer. The backbone stays frozen; only the prototypes move.

Initialisation is the per-class mean of the support sets (node by node), which is what the
authors do; the SGD settings (momentum 0.9, dampening 0.9, lr 0.1) are theirs too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from deepemd.emd.api import pairwise_similarity
from deepemd.errors import DeepEMDError


@dataclass(frozen=True)
class SFCFit:
    """How the SFC is fitted: ``steps`` SGD steps, each on ``batch_size`` support sets."""

    steps: int = 100
    batch_size: int = 5
    lr: float = 0.1
    momentum: float = 0.9
    dampening: float = 0.9


#: ``scorer(a (P,m,d), b (Q,n,d), weights=, solver=, temperature=, center=) -> (P,Q)``
Scorer = Callable[..., torch.Tensor]


class SFC(nn.Module):
    """``forward(x (B,m,d)) -> logits (B, num_classes)``: EMD similarity to each prototype set.

    ``scorer`` computes the set-to-set scores: :func:`deepemd.emd.pairwise_similarity` by
    default; a caller with a faster batched equivalent (deepemd.fewshot) passes its own.
    """

    def __init__(
        self,
        prototypes: torch.Tensor,
        weights: str = "cross",
        solver: str = "exact",
        temperature: float = 12.5,
        center: bool = False,
        scorer: Scorer = pairwise_similarity,
    ):
        super().__init__()
        if prototypes.dim() != 3:
            raise DeepEMDError(f"SFC prototypes must be (classes, nodes, channels), got {tuple(prototypes.shape)}")
        self.prototypes = nn.Parameter(prototypes.detach().clone())
        self.weights, self.solver = weights, solver
        self.temperature, self.center = float(temperature), center
        self.scorer = scorer

    @classmethod
    def from_support(cls, support: torch.Tensor, labels: torch.Tensor, num_classes: int, **kw) -> "SFC":
        """Prototype of class c = node-wise mean of the support sets labelled c."""
        if support.shape[0] != labels.shape[0]:
            raise DeepEMDError(f"{support.shape[0]} support sets but {labels.shape[0]} labels")
        onehot = F.one_hot(labels.long(), num_classes).to(support.dtype)  # (S, C)
        counts = onehot.sum(0)
        if bool((counts == 0).any()):
            raise DeepEMDError("every class needs at least one support set to initialise the SFC")
        protos = torch.einsum("sc,smd->cmd", onehot, support.detach()) / counts[:, None, None]
        return cls(protos, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scorer(
            x,
            self.prototypes,
            weights=self.weights,
            solver=self.solver,
            temperature=self.temperature,
            center=self.center,
        )

    def fit(
        self,
        support: torch.Tensor,
        labels: torch.Tensor,
        fit: SFCFit = SFCFit(),
        generator: torch.Generator | None = None,
    ) -> list[float]:
        """Algorithm 1, lines 2-7: SGD on cross-entropy over support mini-batches.

        Mini-batches walk through random permutations of the support (so every set is seen
        equally often); the features are constants here. Returns the loss of every step.
        """
        support, labels = support.detach(), labels.long().to(support.device)
        opt = torch.optim.SGD(self.parameters(), lr=fit.lr, momentum=fit.momentum, dampening=fit.dampening)
        losses: list[float] = []
        with torch.enable_grad():
            for idx in minibatches(support.shape[0], fit, generator):
                idx = idx.to(support.device)
                loss = F.cross_entropy(self(support[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        return losses


def minibatches(n: int, fit: SFCFit, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """The ``fit.steps`` mini-batches of support indices ``SFC.fit`` walks through: consecutive
    random permutations of ``range(n)``, so every set is seen equally often. A batched fit of
    many episodes (deepemd.fewshot) draws the same order from the same generator."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(fit.steps):
        if order.numel() < fit.batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        idx, order = order[: fit.batch_size], order[fit.batch_size :]
        yield idx


def fit_sfc(
    support: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    fit: SFCFit = SFCFit(),
    generator: torch.Generator | None = None,
    **kw,
) -> SFC:
    """Initialise an :class:`SFC` from the support mean and fit it to the support (k-shot)."""
    layer = SFC.from_support(support, labels, num_classes, **kw)
    layer.fit(support, labels, fit, generator)
    return layer
