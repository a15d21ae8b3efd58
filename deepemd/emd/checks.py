"""Input validation for the EMD head: one clear :class:`DeepEMDError` instead of a NaN that
surfaces three layers later (or a solver that loops on garbage)."""
from __future__ import annotations

import torch

from deepemd.errors import DeepEMDError


def _require_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise DeepEMDError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise DeepEMDError(f"{name} must be a floating-point tensor, got {t.dtype}",
                           fix=f"convert with {name}.float()")


def _require_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise DeepEMDError(f"{name} contains NaN or inf values",
                           fix="check the network output (diverged training, bad input image)")


def check_features(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two node sets ``(B,m,d)`` and ``(B,n,d)``: same batch, same channels, finite, m, n >= 1."""
    for name, t in (("u", u), ("v", v)):
        _require_float(name, t)
        if t.dim() != 3:
            raise DeepEMDError(f"{name} must have shape (B, nodes, channels), got {tuple(t.shape)}",
                               fix="add a batch dimension with .unsqueeze(0)")
        if t.shape[1] == 0 or t.shape[2] == 0:
            raise DeepEMDError(f"{name} has no nodes or no channels: shape {tuple(t.shape)}")
    if u.shape[0] != v.shape[0] or u.shape[2] != v.shape[2]:
        raise DeepEMDError(f"u {tuple(u.shape)} and v {tuple(v.shape)} must agree in batch size "
                           "and channel count")
    if u.device != v.device:
        raise DeepEMDError(f"u is on {u.device} but v is on {v.device}", fix="move both to one device")
    _require_finite("u", u)
    _require_finite("v", v)
    return u, v


def check_problem(cost: torch.Tensor, wu: torch.Tensor, wv: torch.Tensor) -> None:
    """A batch of transport problems: shapes agree, values finite, weights >= 0 with mass on
    both sides of every problem."""
    for name, t in (("cost", cost), ("wu", wu), ("wv", wv)):
        _require_float(name, t)
    if cost.dim() != 3 or wu.dim() != 2 or wv.dim() != 2:
        raise DeepEMDError(f"expected cost (B,m,n), wu (B,m), wv (B,n); got {tuple(cost.shape)}, "
                           f"{tuple(wu.shape)}, {tuple(wv.shape)}")
    b, m, n = cost.shape
    if tuple(wu.shape) != (b, m) or tuple(wv.shape) != (b, n):
        raise DeepEMDError(f"weights {tuple(wu.shape)}, {tuple(wv.shape)} do not match cost "
                           f"{tuple(cost.shape)}: need wu (B,m) and wv (B,n)")
    if m == 0 or n == 0:
        raise DeepEMDError(f"cost {tuple(cost.shape)} has an empty side: every set needs a node")
    for name, t in (("cost", cost), ("wu", wu), ("wv", wv)):
        _require_finite(name, t)
    if b == 0:
        return
    for name, w in (("wu", wu), ("wv", wv)):
        if bool((w < 0).any()):
            raise DeepEMDError(f"{name} has negative weights", fix="weights are masses: clamp at 0")
        empty = (w.sum(dim=-1) <= 0).nonzero()
        if len(empty):
            raise DeepEMDError(f"{name} is all zero in problem {int(empty[0, 0])}: that side has "
                               "no mass to transport",
                               fix="give at least one node a positive weight (cross_reference_"
                                   "weights adds 1e-3 to every node for this reason)")
