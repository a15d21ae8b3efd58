"""Exact batched transport solver (temporary backend: POT's network simplex per problem)."""
from __future__ import annotations

import numpy as np
import ot


def solve_batch(cost: np.ndarray, a: np.ndarray, b: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optimal ``(flow (B,m,n), alpha (B,m), beta (B,n))`` of every problem, float64."""
    bsz, m, n = cost.shape
    flow = np.zeros((bsz, m, n))
    alpha = np.zeros((bsz, m))
    beta = np.zeros((bsz, n))
    for k in range(bsz):
        bk = b[k] * (a[k].sum() / b[k].sum())
        flow[k], log = ot.emd(a[k], bk, np.ascontiguousarray(cost[k]), log=True, numItermax=10**7)
        alpha[k], beta[k] = log["u"], log["v"]
    return flow, alpha, beta
