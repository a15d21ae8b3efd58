"""Entropic transport (Sinkhorn), batched and log-domain: the GPU-friendly approximation.

Iterations run without autograd; the gradient is the envelope-theorem gradient of the entropic
objective at convergence (``d/dc = plan``, ``d/dmass = potentials``), so memory does not grow
with the iteration count. As ``eps -> 0`` the result tends to the exact EMD.
"""

from __future__ import annotations

import torch


def solve_sinkhorn(
    cost: torch.Tensor, wu: torch.Tensor, wv: torch.Tensor, eps: float = 1e-2, n_iter: int = 2000, tol: float = 1e-7
) -> tuple[torch.Tensor, torch.Tensor]:
    """``eps`` is absolute, in cost units (cosine costs live in [0, 2]); stops when the column
    marginals are within ``tol`` (relative, L1) or after ``n_iter`` iterations."""
    total = wu.sum(dim=-1, keepdim=True)
    with torch.no_grad():
        c = cost.detach()
        tiny = torch.finfo(c.dtype).tiny
        log_p = torch.log((wu.detach() / total).clamp_min(tiny))
        log_q = torch.log((wv.detach() / total).clamp_min(tiny))
        f = torch.zeros_like(log_p)
        g = torch.zeros_like(log_q)
        for it in range(n_iter):
            f = eps * (log_p - torch.logsumexp((g[:, None, :] - c) / eps, dim=2))
            g = eps * (log_q - torch.logsumexp((f[:, :, None] - c) / eps, dim=1))
            if it % 20 == 19 or it == n_iter - 1:
                plan = torch.exp((f[:, :, None] + g[:, None, :] - c) / eps)
                err = (plan.sum(dim=2) - log_p.exp()).abs().sum(dim=1)
                if c.shape[0] == 0 or bool(err.max() < tol):
                    break
        plan = torch.exp((f[:, :, None] + g[:, None, :] - c) / eps)
        flow = plan * total[:, :, None]
        shift = 0.5 * ((g * log_q.exp()).sum(-1) - (f * log_p.exp()).sum(-1))
        f, g = f + shift[:, None], g - shift[:, None]
    dist = (cost * flow).sum(dim=(1, 2))
    dist = dist + ((wu - wu.detach()) * f).sum(-1) + ((wv - wv.detach()) * g).sum(-1)
    return dist, flow
