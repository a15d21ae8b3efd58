"""DeepEMD as a pytorch-metric-learning distance, so pair losses train through the EMD layer.

Paper 5.8 "replaces the metric with DeepEMD". pml losses and miners take 2-D embeddings, so a
batch of local sets ``(B, m, d)`` is passed **flattened** as ``(B, m*d)`` (``flatten_sets``) and
:class:`DeepEMDSimilarity` reshapes it back with its ``num_nodes``. The score is
``deepemd.emd.similarity`` (cross-reference weights, the exact differentiable layer): a
similarity in [-1, 1], hence ``is_inverted=True`` as for pml's ``CosineSimilarity``.
Works with pair losses (ContrastiveLoss, MultiSimilarityLoss, their miners). Proxy losses
(NormalizedSoftmax, SoftTriple, ArcFace) compare with single proxy vectors, not sets: use them
with the global embedding.
"""

from __future__ import annotations

import torch
from pytorch_metric_learning.distances import BaseDistance

from deepemd.emd import pairwise_similarity, similarity
from deepemd.errors import DeepEMDError


def flatten_sets(sets: torch.Tensor) -> torch.Tensor:
    """``(B, m, d) -> (B, m*d)``: the 2-D form pml needs; undone by :class:`DeepEMDSimilarity`."""
    return sets.reshape(sets.shape[0], -1)


class DeepEMDSimilarity(BaseDistance):
    """pml distance scoring flattened local sets ``(B, num_nodes*d)`` with DeepEMD."""

    def __init__(
        self,
        num_nodes: int,
        weights: str = "cross",
        solver: str = "exact",
        temperature: float = 1.0,
        chunk: int = 4096,
        **kwargs,
    ):
        kwargs.setdefault("normalize_embeddings", False)  # the cosine cost is scale-free already
        super().__init__(is_inverted=True, **kwargs)
        if num_nodes < 1:
            raise DeepEMDError(f"num_nodes must be >= 1, got {num_nodes}")
        self.num_nodes, self.weights, self.solver = int(num_nodes), weights, solver
        self.temperature, self.chunk = float(temperature), int(chunk)

    def to_sets(self, flat: torch.Tensor) -> torch.Tensor:
        if flat.shape[1] % self.num_nodes:
            raise DeepEMDError(
                f"embedding width {flat.shape[1]} is not num_nodes={self.num_nodes} x channels",
                fix="pass local sets flattened with flatten_sets((B, m, d)) and num_nodes=m",
            )
        return flat.reshape(flat.shape[0], self.num_nodes, -1)

    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        return pairwise_similarity(
            self.to_sets(query_emb),
            self.to_sets(ref_emb),
            weights=self.weights,
            solver=self.solver,
            temperature=self.temperature,
            chunk=self.chunk,
        )

    def pairwise_distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        return similarity(
            self.to_sets(query_emb),
            self.to_sets(ref_emb),
            weights=self.weights,
            solver=self.solver,
            temperature=self.temperature,
        )
