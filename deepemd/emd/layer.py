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


def exact_numpy(
    cost: np.ndarray, a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """float32 or float64 arrays in, ``(distance, flow, alpha, beta)`` out, duals centred
    (the flow in the costs' dtype, the rest float64)."""
    solution = solve_batch(cost, a, b)
    return solution.distance, solution.flow, solution.alpha, solution.beta


#: The dtypes ``solve`` hands the layer (half precision is computed in float32).
NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


class ExactEMD(torch.autograd.Function):
    """``(cost (B,m,n), wu (B,m), wv (B,n)) -> (distance (B,), flow (B,m,n))``; masses balanced.

    CUDA tensors are copied to the CPU for the compiled solver and the results copied back:
    the LP is tiny and branchy, a poor fit for a GPU (use ``solver="sinkhorn"`` to stay there).
    The flow output is piecewise constant in the inputs, so it carries no gradient.
    """

    @staticmethod
    def forward(ctx, cost: torch.Tensor, wu: torch.Tensor, wv: torch.Tensor):
        dist, flow, alpha, beta = exact_numpy(_host_array(cost), _host_array(wu), _host_array(wv))
        flow_t = _tensor_like(flow, cost)
        ctx.save_for_backward(flow_t, _tensor_like(alpha, cost), _tensor_like(beta, cost))
        ctx.mark_non_differentiable(flow_t)
        return _tensor_like(dist, cost), flow_t

    @staticmethod
    def backward(ctx, grad_dist: torch.Tensor, _grad_flow: torch.Tensor):
        flow, alpha, beta = ctx.saved_tensors
        g = grad_dist.to(flow.dtype)
        return g[:, None, None] * flow, g[:, None] * alpha, g[:, None] * beta


def _host_array(t: torch.Tensor) -> np.ndarray:
    """``t`` as a numpy array on the host in its own dtype (float32 or float64: ``solve`` hands
    nothing else), a view where it already is one: the kernel reads float32 costs directly, so
    a float32 batch is not copied (a 5 MB float64 copy of 1,000 25x25 problems cost as much as
    a tenth of the solve, most of it page faults on the fresh block)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.numpy()


def _tensor_like(x: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``x`` as a tensor of ``like``'s dtype and device (numpy converts on the CPU: a torch
    conversion of a large block opens an OpenMP region whose idle worker spins for
    milliseconds)."""
    if like.device.type == "cpu":
        return torch.from_numpy(x.astype(NUMPY_DTYPES[like.dtype], copy=False))
    return torch.from_numpy(x).to(device=like.device, dtype=like.dtype)
