"""Cheap bounds on the optimal transport cost, for exact reranking with pruning.

A rerank only needs the exact EMD of the candidates that can still reach the top k. These
lower bounds on the optimal cost ``D`` (an upper bound on the DeepEMD score ``(T - D) / T``)
cost far less than the LP and never exceed it, so a candidate whose score bound falls below the
k-th best exact score found so far can be skipped without changing the top k:

- :func:`relaxed_bound` (the relaxed word mover's distance of Kusner et al., 2015): drop the
  column marginals and every row sends all its mass to its cheapest column, or drop the row
  marginals likewise; either relaxation's optimum is below ``D``, and their maximum is the bound.
  O(m n) per problem given the cost matrix.
- :func:`centroid_bound` (their word centroid distance, for cosine costs): with unit nodes
  ``1 - cos(u, v) >= |u - v|^2 / 2``, and the squared norm is convex, so
  ``D >= T/2 |sum_i wu_i u_i / T - sum_j wv_j v_j / T|^2``. O((m + n) d) per problem, no cost
  matrix needed.

All functions are batched over a leading dimension and run in the inputs' dtype.
"""

from __future__ import annotations

import torch


def relaxed_bound(cost: torch.Tensor, wu: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
    """``(B,m,n), (B,m), (B,n) -> (B,)``: ``max(sum_i wu_i min_j c_ij, sum_j wv_j min_i c_ij)``,
    a lower bound on the optimal cost of every balanced problem (masses equal per side)."""
    rows = (wu * cost.amin(dim=2)).sum(dim=1)
    cols = (wv * cost.amin(dim=1)).sum(dim=1)
    return torch.maximum(rows, cols)


def centroid_bound(unit_u: torch.Tensor, unit_v: torch.Tensor, wu: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
    """``(B,m,d), (B,n,d)`` nodes of norm at most 1 (the cosine cost's unit nodes; zero nodes
    allowed) with balanced masses ``(B,m), (B,n)`` -> ``(B,)`` lower bound on the optimal cost
    for the cost ``1 - u_i . v_j``: ``T/2 |mean_wu(u) - mean_wv(v)|^2``."""
    total = wu.sum(dim=1)
    cu = torch.einsum("bm,bmd->bd", wu, unit_u)
    cv = torch.einsum("bn,bnd->bd", wv, unit_v)
    return 0.5 * ((cu - cv) ** 2).sum(dim=1) / total


def score_upper_bound(lower: torch.Tensor, wu: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
    """DeepEMD score ``(T - D) / T`` (temperature 1) from a lower bound on ``D``: an upper
    bound on the score, ``T`` the transported mass ``(sum wu + sum wv) / 2``."""
    total = 0.5 * (wu.sum(dim=-1) + wv.sum(dim=-1))
    return (total - lower) / total


__all__ = ["centroid_bound", "relaxed_bound", "score_upper_bound"]
