"""A compressed-sparse-row copy of a set store, for the rerank's node dot products.

CNN local features come out of a ReLU: EfficientNet-Lite0's FCN map cells of the demo images
are 92% zeros at 224 px (84% at 96 px); its Grid and Sampling nodes, averages over whole crops,
about 69%. The rerank's dots of one query against a shortlist are a dense ``(m, d) @ (d, K*n)``
matmul over the gathered candidates; over a CSR copy of the store they are a sparse-dense
product (torch's MKL ``csrmm``) after a gather of only the nonzeros. One query against 100 sets
of 49 x 1280, 2 threads (``benchmarks/rerank_speed.py --density-sweep``): 3.3x faster at 8%
nonzeros, 1.6x at 16%, even at 27%, slower above.

The copy costs one pass over the store (~0.55 ms per 63 x 1280 set), which pays back after
about five shortlist entries per stored set: :func:`worth_indexing` is that rule.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

#: Above this share of nonzeros the dense matmul is as fast (``--density-sweep``: even at ~27%).
MAX_DENSITY = 0.25
#: Shortlist entries scored per stored set beyond which the index's one pass pays back.
PAYBACK_ENTRIES_PER_SET = 5
#: Items converted per step while building (bounds the float32 working copy).
BUILD_CHUNK = 256


def density(sets: torch.Tensor, sample: int = 64) -> float:
    """Share of nonzero entries over the first ``sample`` sets (an estimate, one cheap pass)."""
    head = sets[:sample]
    return float(torch.count_nonzero(head)) / max(1, head.numel())


def worth_indexing(sets: torch.Tensor, entries: int) -> bool:
    """Whether scoring ``entries`` shortlist entries against ``sets (N, n, d)`` is faster with
    a :class:`SparseSets` copy: sparse enough, and enough entries to pay for the copy."""
    return entries >= PAYBACK_ENTRIES_PER_SET * len(sets) and density(sets) <= MAX_DENSITY


@contextmanager
def _quiet_beta() -> Iterator[None]:
    """torch warns that sparse CSR is beta on every CSR tensor it makes; this is a known use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        yield


class SparseSets:
    """``sets (N, n, d)`` (any float dtype) as one CSR matrix of ``N*n`` rows, float32 values.

    >>> sets = torch.relu(torch.randn(6, 4, 8))
    >>> sparse = SparseSets(sets)
    >>> query = torch.rand(3, 8)
    >>> ids = np.array([4, 1])
    >>> dense = torch.einsum("md,knd->kmn", query, sets[ids])
    >>> bool(torch.allclose(sparse.dots(query, ids), dense, atol=1e-6))
    True
    """

    def __init__(self, sets: torch.Tensor):
        self.items, self.nodes, self.channels = sets.shape
        crows, cols, values, offset = [torch.zeros(1, dtype=torch.int64)], [], [], 0
        for start in range(0, self.items, BUILD_CHUNK):
            with _quiet_beta():
                part = sets[start : start + BUILD_CHUNK].reshape(-1, self.channels).float().to_sparse_csr()
            crows.append(part.crow_indices()[1:] + offset)
            offset += part.values().numel()
            cols.append(part.col_indices())
            values.append(part.values())
        # int32 indices (MKL takes both the same width) gather and multiply faster than int64
        index_dtype = torch.int32 if offset < 2**31 else torch.int64
        self.crow = torch.cat(crows).numpy()
        self.cols = torch.cat(cols).to(index_dtype).numpy()
        self.values = torch.cat(values).numpy()

    def dots(self, query: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        """``(K, m, n)`` float32 dot products of every node of ``query (m, d)`` with every node of
        the sets ``ids (K,)``, as the dense ``query @ set.T`` per set would give them (up to the
        order of float32 sums)."""
        n = self.nodes
        rows = ids[:, None] * n + np.arange(n + 1)  # (K, n + 1): each set's row pointers
        starts, ends = self.crow[rows[:, 0]], self.crow[rows[:, -1]]
        placed = np.concatenate([[0], np.cumsum(ends - starts)])  # where each set's entries go
        crow = (self.crow[rows[:, :-1]] - starts[:, None] + placed[:-1, None]).ravel()
        crow = np.append(crow, placed[-1])
        pieces = list(zip(starts.tolist(), ends.tolist()))
        cols = np.concatenate([self.cols[a:b] for a, b in pieces]) if pieces else self.cols[:0]
        values = np.concatenate([self.values[a:b] for a, b in pieces]) if pieces else self.values[:0]
        with _quiet_beta():
            matrix = torch.sparse_csr_tensor(
                torch.from_numpy(crow.astype(self.cols.dtype)),
                torch.from_numpy(cols),
                torch.from_numpy(values),
                size=(len(ids) * n, self.channels),
                check_invariants=False,  # row pointers and columns come from a valid CSR, cut whole
            )
        product = matrix @ query.float().T.contiguous()  # (K*n, m)
        return product.reshape(len(ids), n, query.shape[0]).transpose(1, 2)


__all__ = ["SparseSets", "density", "worth_indexing"]
