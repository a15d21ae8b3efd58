"""Reference solvers: cv2.EMD (what the authors deploy) and qpth (what they train with).

Both exist to check and to time our exact layer against, not to be used in training:
cv2.EMD gives no gradient, and qpth is an interior-point QP solver whose batched CPU path fails
at DeepEMD sizes (measured in ``deepemd bench emd``; see docs/emd.md).
"""

from __future__ import annotations

import numpy as np
import torch

from deepemd.errors import DeepEMDError

#: The authors' L2 term for the qpth QP form.
QPTH_L2 = 1e-6


def solve_opencv(cost: torch.Tensor, wu: torch.Tensor, wv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cv2.EMD with a user cost matrix, one problem per call (float32 inside, forward only)."""
    import cv2

    if torch.is_grad_enabled() and any(t.requires_grad for t in (cost, wu, wv)):
        raise DeepEMDError(
            "solver='opencv' has no gradient (cv2.EMD returns numbers only)",
            fix="wrap the call in torch.no_grad(), or use solver='exact' to train",
        )
    c = cost.detach().to("cpu", torch.float32).numpy()
    a = wu.detach().to("cpu", torch.float32).numpy()
    b = wv.detach().to("cpu", torch.float32).numpy()
    dist = np.zeros(c.shape[0], dtype=np.float64)
    flow = np.zeros(c.shape, dtype=np.float32)
    for k in range(c.shape[0]):
        work_per_flow, _, flow[k] = cv2.EMD(
            a[k][:, None], b[k][:, None], cv2.DIST_USER, cost=np.ascontiguousarray(c[k])
        )
        dist[k] = work_per_flow * float(flow[k].sum(dtype=np.float64))
    return (torch.from_numpy(dist).to(cost.device, cost.dtype), torch.from_numpy(flow).to(cost.device, cost.dtype))


def qpth_matrices(m: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Equality matrix of Eq. 5 (row sums, then column sums) without its one redundant row:
    qpth factorises the KKT system and needs full row rank."""
    rows = torch.kron(torch.eye(m, dtype=dtype), torch.ones(1, n, dtype=dtype))
    cols = torch.kron(torch.ones(1, m, dtype=dtype), torch.eye(n, dtype=dtype))
    return torch.cat([rows, cols[:-1]]), torch.eye(m * n, dtype=dtype)


def solve_qpth(
    cost: torch.Tensor, wu: torch.Tensor, wv: torch.Tensor, l2: float = QPTH_L2, max_iter: int = 30, eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's training route: ``min c.x + l2/2 |x|^2`` s.t. Eq. 5 and ``x >= 0``, solved
    by qpth's batched interior point one problem at a time on the CPU (batch >= 2 fails there
    at 25x25), float64; gradients through qpth's own autograd (KKT differentiation)."""
    from qpth.qp import QPFunction, QPSolvers

    device, dtype = cost.device, cost.dtype
    c, a, b = (t.to("cpu", torch.float64) for t in (cost, wu, wv))
    bsz, m, n = c.shape
    A, eye = qpth_matrices(m, n, torch.float64)
    Q = l2 * eye
    qp = QPFunction(verbose=-1, eps=eps, maxIter=max_iter, check_Q_spd=False, solver=QPSolvers.PDIPM_BATCHED)
    dists, flows = [], []
    for k in range(bsz):
        rhs = torch.cat([a[k], b[k, :-1]])
        x = qp(Q, c[k].reshape(-1), -eye, torch.zeros(m * n, dtype=torch.float64), A, rhs)
        x = x.reshape(m, n)
        flows.append(x)
        dists.append((c[k] * x).sum())
    dist = torch.stack(dists) if dists else c.new_zeros(0)
    flow = torch.stack(flows) if flows else c.new_zeros(0, m, n)
    return dist.to(device, dtype), flow.to(device, dtype)
