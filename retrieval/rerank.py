"""Rescore FAISS shortlists with DeepEMD between local sets (paper 5.8, used as a reranker).

A shortlist is the top-K ids of one query from the global index; the first ``depth`` of them
are rescored with the EMD similarity between the query's local set and each candidate's, the
rest keep their global order behind them. Fusion: ``(1 - alpha) * emd + alpha * global``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from deepemd.emd import pairwise_similarity
from deepemd.errors import DeepEMDError

#: ``fetch(ids (k,) int64) -> (k, n, d)`` local sets of those database ids.
FetchSets = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class RerankSettings:
    """How a shortlist is rescored; see ``deepemd.emd.similarity`` for weights and solvers."""

    depth: int = 100
    weights: str = "cross"
    solver: str = "exact"
    alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise DeepEMDError(f"rerank depth must be >= 1, got {self.depth}", fix="set --rerank-k to 1 or more")
        if not 0.0 <= self.alpha <= 1.0:
            raise DeepEMDError(f"alpha must lie in [0, 1], got {self.alpha}",
                               fix="alpha is the weight of the global score in the fused score")


def rescore(query_set: torch.Tensor, candidate_sets: torch.Tensor, global_scores: torch.Tensor | None,
            settings: RerankSettings) -> torch.Tensor:
    """Scores ``(K,)`` of one query set ``(m, d)`` against ``K`` candidate sets ``(K, n, d)``."""
    with torch.no_grad():
        emd = pairwise_similarity(query_set[None].float(), candidate_sets.float(),
                                  weights=settings.weights, solver=settings.solver)[0]
    if settings.alpha > 0.0 and global_scores is not None:
        emd = (1.0 - settings.alpha) * emd + settings.alpha * global_scores.to(emd.dtype)
    return emd


def rerank(scores: np.ndarray, ids: np.ndarray, query_sets: Callable[[int], np.ndarray],
           fetch: FetchSets, settings: RerankSettings, skip_ids: np.ndarray | None = None,
           progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Reorder each row of a shortlist ``(Q, K)`` by DeepEMD within its first ``depth`` ids.

    ``query_sets(i)`` gives query i's local set. ``skip_ids[i]`` (e.g. the query itself in a
    leave-one-out run) is kept in place with score +inf rather than scored against itself.
    ``-1`` ids (FAISS had fewer results) stay at the end. Returns float32 scores and int64 ids.
    """
    scores = np.asarray(scores, dtype=np.float32).copy()
    ids = np.asarray(ids, dtype=np.int64).copy()
    if scores.shape != ids.shape or ids.ndim != 2:
        raise DeepEMDError(f"shortlist scores {scores.shape} and ids {ids.shape} must both be (queries, K)")
    depth = min(settings.depth, ids.shape[1])
    for i in tqdm(range(ids.shape[0]), desc="DeepEMD rerank", disable=not progress, leave=False):
        head = ids[i, :depth]
        score_row = scores[i, :depth]
        mask = head >= 0
        if skip_ids is not None:
            mask &= head != skip_ids[i]
        if mask.any():
            cand = torch.from_numpy(np.asarray(fetch(head[mask]), dtype=np.float32))
            query = torch.from_numpy(np.asarray(query_sets(i), dtype=np.float32))
            glob = torch.from_numpy(score_row[mask])
            score_row[mask] = rescore(query, cand, glob, settings).numpy()
        score_row[~mask & (head >= 0)] = np.inf
        score_row[head < 0] = -np.inf
        order = np.argsort(-score_row, kind="stable")
        ids[i, :depth] = head[order]
        scores[i, :depth] = score_row[order]
    return scores, ids
