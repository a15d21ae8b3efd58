"""The differentiable exact EMD layer.

Forward solves the transport LP exactly (float64, on CPU); backward uses LP sensitivity instead
of differentiating the KKT system as qpth does: the optimal value ``D(c, a, b)`` is piecewise
linear in the cost with slope the optimal flow, and its slope in the masses is the optimal dual
pair. So ``dD/dc = x``, ``dD/da = alpha``, ``dD/db = beta``. This is the exact gradient wherever
the LP is non-degenerate and a valid subgradient (of the convex ``D(., a, b)``) elsewhere.

Dual gauge: duals are defined up to ``(alpha + t, beta - t)``. We return the centred pair with
``a . alpha = b . beta = D / 2``; this is exactly the gradient of ``D`` when both mass vectors
are first rescaled to their mean total (what :func:`deepemd.emd.solve` does), so the gradient
is unique (up to degeneracy) and deterministic even for unbalanced perturbations.
"""
from __future__ import annotations

import numpy as np
import torch

from deepemd.emd.exact import solve_batch


def exact_numpy(cost: np.ndarray, a: np.ndarray, b: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """float64 arrays in, ``(distance, flow, alpha, beta)`` out, duals centred."""
    solution = solve_batch(cost, a, b)
    return solution.distance, solution.flow, solution.alpha, solution.beta


class ExactEMD(torch.autograd.Function):
    """``(cost (B,m,n), wu (B,m), wv (B,n)) -> (distance (B,), flow (B,m,n))``; masses balanced.

    CUDA tensors are copied to the CPU for the compiled solver and the results copied back:
    the LP is tiny and branchy, a poor fit for a GPU (use ``solver="sinkhorn"`` to stay there).
    The flow output is piecewise constant in the inputs, so it carries no gradient.
    """

    @staticmethod
    def forward(ctx, cost: torch.Tensor, wu: torch.Tensor, wv: torch.Tensor):
        c64 = cost.detach().to("cpu", torch.float64).numpy()
        a64 = wu.detach().to("cpu", torch.float64).numpy()
        b64 = wv.detach().to("cpu", torch.float64).numpy()
        dist, flow, alpha, beta = exact_numpy(c64, a64, b64)

        def back(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(x).to(device=cost.device, dtype=cost.dtype)

        flow_t = back(flow)
        ctx.save_for_backward(flow_t, back(alpha), back(beta))
        ctx.mark_non_differentiable(flow_t)
        return back(dist), flow_t

    @staticmethod
    def backward(ctx, grad_dist: torch.Tensor, _grad_flow: torch.Tensor):
        flow, alpha, beta = ctx.saved_tensors
        g = grad_dist.to(flow.dtype)
        return g[:, None, None] * flow, g[:, None] * alpha, g[:, None] * beta
