"""The rerank's view of a store of local sets: node dots of a query against candidates by id.

A store is an in-memory ``(N, n, d)`` array or tensor (row = id), an object with
``get_stored(ids)`` (a :class:`~deepemd.retrieval.store.LocalFeatureStore`: rows as stored and
their scales), an object with ``get(ids)`` or a ``fetch(ids)`` function. Two facts
about CNN sets make the dots cheaper than one dense matmul over the gathered candidates:

* they are mostly zeros (ReLU), so an in-memory store can keep a CSR copy
  (:class:`~deepemd.retrieval.sparse_sets.SparseSets`) and multiply only the nonzeros;
* an FCN set with a feature pyramid carries ``sum s^2`` nodes that are averages of its map
  cells (:func:`~deepemd.local.fcn.pyramid_pooling`), so their dots are the cells' dots
  averaged: the product runs over the cells only (49 of 63 nodes at 224 px) and the pooled
  columns cost a ``(49, 14)`` matmul. Those nodes are then recomputed in float32 from the stored
  cells on both sides (query and candidates, norms included), not read back from float16.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from deepemd.emd.features import NORM_EPS, pair_dots
from deepemd.errors import DeepEMDError
from deepemd.local.fcn import pyramid_pooling
from deepemd.retrieval.sparse_sets import SparseSets, worth_indexing

#: ``fetch(ids (k,) int64) -> (k, n, d)`` local sets of those database ids.
FetchSets = Callable[[np.ndarray], np.ndarray]
#: An ``(N, n, d)`` array or tensor, an object with ``get(ids)``, or a :data:`FetchSets`.
SetStore = Any
#: Stored pyramid nodes (float16) may differ from the cells' float32 averages by this much,
#: relative to the set's largest entry, before the store is said not to hold that pyramid.
PYRAMID_TOLERANCE = 4e-3
#: Sets whose pyramid nodes are checked against their cells when a store is opened.
PYRAMID_CHECKED_SETS = 8


def stored_pyramid(fingerprint: dict[str, Any] | None) -> tuple[int, ...]:
    """The FCN feature pyramid a store's fingerprint says its sets carry (``()`` for other sets
    or no fingerprint): what a gallery search hands the rerank, since the store, not the
    search's options, knows how its sets were cut.

    >>> stored_pyramid({"local": {"kind": "fcn", "pyramid": [3, 2, 1]}})
    (3, 2, 1)
    >>> stored_pyramid({"local": {"kind": "grid", "grid_levels": [3, 2]}}), stored_pyramid(None)
    ((), ())
    """
    local = (fingerprint or {}).get("local") or {}
    return tuple(int(s) for s in local.get("pyramid", ())) if local.get("kind") == "fcn" else ()


def node_stats(
    sets: torch.Tensor, center: bool, scales: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Norms ``(k, n)`` of each node (centred over channels when ``center``), floored as the
    EMD head floors them, and each node's channel mean, float32; of ``sets * scales[:, None,
    None]`` when ``scales`` (a store's per-row scales) are given, without that product."""
    x = sets.float()
    means = x.mean(dim=-1)
    if center:
        x = x - means[..., None]
    norms = torch.linalg.vector_norm(x, dim=-1)
    if scales is not None:
        norms, means = norms * scales[:, None], means * scales[:, None]
    return norms.clamp_min(NORM_EPS), means


class CandidateSets:
    """Candidate sets by id: their node dots with a query, node norms and channel means (cached
    once for an in-memory store). ``pyramid``: the FCN feature pyramid the sets carry (checked
    on the store's first sets: an array's when it is opened, a fetched store's first fetch),
    ``()`` for any other sets."""

    def __init__(self, store: SetStore, center: bool, pyramid: tuple[int, ...] = ()):
        self.center = center
        self.array: torch.Tensor | None = None
        self.fetch: FetchSets | None = None
        self.stored: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
        self.sparse: SparseSets | None = None
        self.pyramid = tuple(pyramid)
        self._pooling: torch.Tensor | None = None
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pyramid_checked = not self.pyramid
        if isinstance(store, (np.ndarray, torch.Tensor)):
            self.array = torch.as_tensor(store)
            if self.array.ndim != 3:
                raise DeepEMDError(f"the set store must be (items, nodes, channels), got {tuple(self.array.shape)}")
            self._check_pyramid(self.array)
        elif hasattr(store, "get_stored"):
            self.stored = store.get_stored
        elif hasattr(store, "get"):
            self.fetch = store.get
        elif callable(store):
            self.fetch = store
        else:
            raise DeepEMDError(
                f"cannot read local sets from a {type(store).__name__}",
                fix="give an (N, n, d) array, a LocalFeatureStore or a fetch(ids) function",
            )

    def pooling(self, num_nodes: int) -> torch.Tensor | None:
        """The pyramid's ``(p, cells)`` averaging weights for sets of ``num_nodes`` (None: no pyramid)."""
        if not self.pyramid:
            return None
        if self._pooling is None or self._pooling.shape[0] + self._pooling.shape[1] != num_nodes:
            self._pooling = pyramid_pooling(self.pyramid, num_nodes)
        return self._pooling

    def expand(self, sets: torch.Tensor) -> torch.Tensor:
        """Float32 sets ``(k, n, d)`` with their pyramid nodes recomputed from their cells."""
        sets = sets.float()
        pooling = self.pooling(sets.shape[1])
        if pooling is None:
            return sets
        cells = sets[:, pooling.shape[0] :]
        return torch.cat([pooling @ cells, cells], dim=1)

    def index_for(self, entries: int, sparse: bool | None) -> None:
        """Build the CSR copy of an in-memory store when ``sparse`` says so, or (``None``) when
        scoring ``entries`` shortlist entries pays for it (:func:`worth_indexing`)."""
        if self.array is None or self.sparse is not None or sparse is False:
            return
        cells = self._cells(self.array)
        if sparse or worth_indexing(cells, entries):
            self.sparse = SparseSets(cells)

    def dots(self, query: torch.Tensor, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dots (k,m,n) float32, norms (k,n), means (k,n))`` of the float32 ``query (m, d)``
        (pyramid nodes already :meth:`expand`-ed) against the sets ``ids``; norms are those the
        cost uses (centred nodes when centring)."""
        if self.array is None:
            return self._fetched_dots(query, ids)
        sets = self.array
        norms, means = (stat[torch.from_numpy(ids)] for stat in self._array_stats())
        self._check_channels(query, sets.shape[-1])
        if self.sparse is not None:
            cell_dots = self.sparse.dots(query, ids)
        else:
            # index_select gathers on torch's threads; ``array[rows]`` copies on one (2.6-3.0
            # vs 4.2-4.8 ms for 100 node-major sets of 63 x 1280 float16; a channel-major store
            # is slower both ways: 8.4-9.7 ms, which is why eval stores node-major rows)
            cells = self._cells(sets).index_select(0, torch.from_numpy(ids))
            cell_dots = pair_dots(query[None], cells.float())
        return self._with_pooled_columns(cell_dots, sets.shape[1]), norms, means

    def _fetched_dots(self, query: torch.Tensor, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`dots` of sets read by id. Only the cells are converted to float32 (one pass,
        straight to a contiguous block the matmul reads: a strided view would be copied again
        inside it); the pooled nodes, needed only for their norms and means, are averaged from
        those cells, and a store's per-row scales multiply the small dot and norm blocks, not
        every stored value. For a gallery's 100 float16 sets of 63 x 1280 that is about half
        the memory traffic of decoding the whole sets to float32 first
        (``benchmarks/rerank_speed.py --gallery``)."""
        stored, scales = self._read(ids)
        self._check_pyramid(stored)
        self._check_channels(query, stored.shape[-1])
        cells = self._cells(stored).float().contiguous()
        pooling = self.pooling(stored.shape[1])
        norms, means = node_stats(cells, self.center, scales)
        if pooling is not None:
            pooled_norms, pooled_means = node_stats(pooling @ cells, self.center, scales)
            norms, means = torch.cat([pooled_norms, norms], dim=1), torch.cat([pooled_means, means], dim=1)
        cell_dots = pair_dots(query[None], cells)
        if scales is not None:
            cell_dots *= scales[:, None, None]
        return self._with_pooled_columns(cell_dots, stored.shape[1]), norms, means

    def _read(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sets ``ids`` as the store keeps them and their per-row scales (None: already scaled)."""
        if self.stored is not None:
            rows, scales = self.stored(ids)
            return torch.from_numpy(rows), torch.from_numpy(scales)
        return torch.as_tensor(np.asarray(self.fetch(ids))), None

    def _cells(self, sets: torch.Tensor) -> torch.Tensor:
        pooling = self.pooling(sets.shape[1])
        return sets if pooling is None else sets[:, pooling.shape[0] :]

    def _with_pooled_columns(self, cell_dots: torch.Tensor, num_nodes: int) -> torch.Tensor:
        """``(k, m, cells)`` dots with the candidates' cells -> ``(k, m, n)`` with all their nodes."""
        pooling = self.pooling(num_nodes)
        if pooling is None:
            return cell_dots
        return torch.cat([cell_dots @ pooling.T, cell_dots], dim=2)

    def _array_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stats is None:
            parts = [
                node_stats(self.expand(self.array[s : s + 256]), self.center) for s in range(0, len(self.array), 256)
            ]
            self._stats = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        return self._stats

    def _check_pyramid(self, sets: torch.Tensor) -> None:
        """Once per store, on its first sets: the stored pyramid nodes are their cells' averages."""
        if self._pyramid_checked or len(sets) == 0:
            return
        self._pyramid_checked = True
        sets = sets[:PYRAMID_CHECKED_SETS].float()
        expanded = self.expand(sets)
        gap = (expanded - sets).abs().amax(dim=(1, 2))
        scale = sets.abs().amax(dim=(1, 2)).clamp_min(NORM_EPS)
        if bool((gap > PYRAMID_TOLERANCE * scale).any()):
            raise DeepEMDError(
                f"the sets' first {self.pooling(sets.shape[1]).shape[0]} nodes are not the feature "
                f"pyramid {self.pyramid} of their map cells",
                fix="give the pyramid the FCN sets were extracted with (none for Grid or Sampling sets)",
            )

    @staticmethod
    def _check_channels(query: torch.Tensor, channels: int) -> None:
        if query.ndim != 2 or query.shape[1] != channels:
            raise DeepEMDError(f"query set {tuple(query.shape)} and candidate sets of {channels} channels differ")


__all__ = ["CandidateSets", "FetchSets", "SetStore", "node_stats", "stored_pyramid"]
