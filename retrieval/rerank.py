"""Rescore FAISS shortlists with DeepEMD between local sets (paper 5.8, used as a reranker).

:class:`Reranker` is the public API (Open-Metric-Learning's pairwise postprocessor is the
model): ``Reranker(store, local="fcn", k=10).rerank(query_sets, shortlist) -> Shortlist``. The
first ``depth`` entries of each row are rescored with the DeepEMD similarity between the
query's local set and each candidate's, the rest keep their global order behind them, and the
best ``k`` are returned. Fusion: ``(1 - alpha) * emd + alpha * global``.

Exact with pruning: the costs and weights of a whole row come from one matmul; the relaxed
bound (``deepemd.emd.bounds``) then caps every candidate's score, and the LP is solved only for
candidates whose cap can still reach the row's k-th best exact score. Pruned candidates score
strictly below every returned one, so the top k and its scores are those of the full rerank.

Where the time goes (EfficientNet FCN + pyramid sets, 63 nodes x 1280-d, top-100, 2 threads):
the node dots (:mod:`~deepemd.retrieval.candidates`: over the map cells only and their
nonzeros when the store allows; ~18 ms as one dense float32 matmul over the gathered sets),
costs and weights (~2.5 ms), the bounds (~1 ms) and the solves (17-29 ms for all 100,
depending on the VM; about a third of them after pruning at k = 10).
``benchmarks/pipeline_speed.py --fcn224`` prints the row's speed beside those floors. Tried and
dropped: dots over the query's non-zero channels only (a query touches ~40% of the channels)
-- the column gather cost more than the multiply-adds it saved (43 vs 26 ms).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from deepemd.emd import solve
from deepemd.emd.bounds import relaxed_bound, score_upper_bound
from deepemd.emd.features import (
    cross_weights_from_dots,
    pair_costs,
    uniform_weights_from_dots,
)
from deepemd.errors import DeepEMDError
from deepemd.eval.shortlist import Shortlist
from deepemd.retrieval.candidates import CandidateSets, FetchSets, SetStore, node_stats
from deepemd.timing import JobClock, stage

#: A score cap below the k-th exact score by more than this prunes (float64 bounds vs LP).
PRUNE_TOLERANCE = 1e-9
#: Node weights of a pair from its raw node dots (the rerank always has them).
WEIGHTS_FROM_DOTS = {"cross": cross_weights_from_dots, "uniform": uniform_weights_from_dots}


@dataclass(frozen=True)
class RerankSettings:
    """How a shortlist is rescored; see ``deepemd.emd.similarity`` for weights and solvers."""

    depth: int = 100
    weights: str = "cross"
    solver: str = "exact"
    alpha: float = 0.0
    center: bool = False
    #: The FCN feature pyramid the sets carry (``()`` for other sets); see ``Reranker``.
    pyramid: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise DeepEMDError(f"rerank depth must be >= 1, got {self.depth}", fix="set --rerank-k to 1 or more")
        if not 0.0 <= self.alpha <= 1.0:
            raise DeepEMDError(
                f"alpha must lie in [0, 1], got {self.alpha}",
                fix="alpha is the weight of the global score in the fused score",
            )
        if self.weights not in ("cross", "uniform"):
            raise DeepEMDError(f"unknown node weights {self.weights!r}", fix="use cross or uniform")


@dataclass
class RerankStats:
    """LPs solved against candidates scored, over every row reranked so far."""

    candidates: int = 0
    solved: int = 0

    @property
    def skipped_fraction(self) -> float:
        return 1.0 - self.solved / self.candidates if self.candidates else 0.0


class Reranker:
    """Exact DeepEMD rerank of shortlists against a store of local sets.

    ``store``: the candidates' local sets by id (see :data:`SetStore`). ``local``: the kind
    those sets are (checked against a store's fingerprint when it has one). ``k``: results
    returned per query; ``depth``: entries of each shortlist rescored (default all of them);
    ``prune``: skip the LPs that cannot reach the top k (exact solver only; the result is the
    same). ``pyramid``: the feature pyramid of FCN sets (e.g. ``(3, 2, 1)``): their pooled
    nodes' dots then come from the map cells' (checked against the store's first sets).
    ``sparse``: take the node dots from a CSR copy of an in-memory store
    (:mod:`~deepemd.retrieval.sparse_sets`; ``None``: when the store is mostly zeros and the
    shortlists are long enough to pay for the copy). ``stats`` counts the LPs solved.
    """

    def __init__(
        self,
        store: SetStore,
        local: str | None = None,
        k: int = 10,
        depth: int | None = None,
        weights: str = "cross",
        solver: str = "exact",
        center: bool = False,
        alpha: float = 0.0,
        pyramid: tuple[int, ...] = (),
        prune: bool = True,
        sparse: bool | None = None,
        progress: bool = False,
        clock: JobClock | None = None,
        clock_stage: str = "rerank",
    ):
        if k < 1:
            raise DeepEMDError(f"k must be >= 1, got {k}")
        kind = (getattr(store, "fingerprint", None) or {}).get("local", {}).get("kind")
        if local is not None and kind is not None and kind != local:
            raise DeepEMDError(
                f"the store holds {kind} local sets, not {local}",
                fix=f"rerank with local={kind!r} or open the store built for {local}",
            )
        self.local = local or kind
        self.settings = RerankSettings(depth or 1 << 30, weights, solver, alpha, center, tuple(pyramid))
        self.k, self.prune, self.sparse, self.progress = int(k), bool(prune), sparse, progress
        self.clock, self.clock_stage = clock, clock_stage
        self.sets = CandidateSets(store, center, pyramid)
        self.stats = RerankStats()

    @classmethod
    def from_settings(cls, store: SetStore, settings: RerankSettings, k: int, **kw) -> Reranker:
        return cls(
            store,
            k=k,
            depth=settings.depth,
            weights=settings.weights,
            solver=settings.solver,
            center=settings.center,
            alpha=settings.alpha,
            pyramid=settings.pyramid,
            **kw,
        )

    def rerank(
        self,
        query_sets: np.ndarray | torch.Tensor | Callable[[int], np.ndarray],
        shortlist: Shortlist,
        skip_ids: np.ndarray | None = None,
    ) -> Shortlist:
        """The best ``k`` of each row after the rerank, as a new :class:`Shortlist`.

        ``query_sets``: ``(Q, m, d)`` or ``query_sets(i) -> (m, d)``. ``skip_ids[i]`` (the
        query itself in a leave-one-out run) is kept first with score +inf, not scored.
        """
        if not isinstance(shortlist, Shortlist):
            raise DeepEMDError(
                f"rerank takes a Shortlist, got {type(shortlist).__name__}",
                fix="wrap FAISS output as Shortlist(ids, scores)",
            )
        width = min(self.k, shortlist.width)
        out_ids = np.full((shortlist.queries, width), -1, dtype=np.int64)
        out_scores = np.full((shortlist.queries, width), -np.inf, dtype=np.float32)
        query = query_sets if callable(query_sets) else (lambda i: query_sets[i])
        self.sets.index_for(shortlist.queries * min(self.settings.depth, shortlist.width), self.sparse)
        bar = tqdm(range(shortlist.queries), desc="DeepEMD rerank", disable=not self.progress, leave=False)
        for i in bar:
            start = time.perf_counter()
            skip = None if skip_ids is None else int(skip_ids[i])
            ids, scores = self._row(query(i), shortlist.ids[i], shortlist.scores[i], skip, width)
            out_ids[i, : len(ids)], out_scores[i, : len(ids)] = ids, scores
            if self.clock is not None and self.clock_stage in self.clock.plans:
                self.clock.advance(self.clock_stage, 1, time.perf_counter() - start)
                bar.set_postfix_str(self.clock.describe(), refresh=False)
        return Shortlist(out_ids, out_scores)

    def _row(
        self, query, ids: np.ndarray, scores: np.ndarray, skip: int | None, width: int
    ) -> tuple[np.ndarray, np.ndarray]:
        depth = min(self.settings.depth, len(ids))
        head, tail = ids[:depth], ids[depth:]
        valid = head >= 0
        first = valid & (head == skip) if skip is not None else np.zeros_like(valid)
        cand = np.flatnonzero(valid & ~first)
        need = max(0, min(width, depth) - int(first.sum()))
        emd = self._scores(torch.as_tensor(np.asarray(query)), head[cand], scores[:depth][cand], need)
        solved = np.isfinite(emd)
        order = np.argsort(-emd[solved], kind="stable")  # ties keep the shortlist order
        pos = np.concatenate([np.flatnonzero(first), cand[solved][order]])
        row_ids = np.concatenate([head[pos], tail[tail >= 0]])[:width]
        row_scores = np.concatenate(
            [np.full(int(first.sum()), np.inf, np.float32), emd[solved][order], scores[depth:][tail >= 0]]
        ).astype(np.float32)[:width]
        # entries behind the rerank depth keep their global order; their global scores are capped
        # at the last reranked score so the row stays best first
        return row_ids, np.minimum.accumulate(row_scores)

    def _scores(self, query: torch.Tensor, cand_ids: np.ndarray, global_scores: np.ndarray, need: int) -> np.ndarray:
        """Fused scores of the candidates (float64); NaN for candidates pruned unsolved."""
        out = np.full(len(cand_ids), np.nan)
        if len(cand_ids) == 0 or need == 0:
            return out
        with stage("rerank: node dots"):
            query = self.sets.expand(query[None])[0]
            dots, norms, means = self.sets.dots(query, cand_ids.astype(np.int64))
        with stage("rerank: costs + weights"):
            cost, wu, wv = self._problem(query, dots, norms, means)
        alpha = self.settings.alpha
        glob = torch.from_numpy(global_scores.astype(np.float64))
        todo = torch.arange(len(cand_ids))
        self.stats.candidates += len(cand_ids)
        if self.prune and self.settings.solver == "exact" and need < len(cand_ids):
            with stage("rerank: bounds"):
                cap = score_upper_bound(relaxed_bound(cost, wu, wv), wu, wv)
                cap = (1.0 - alpha) * cap + alpha * glob
                by_cap = torch.argsort(cap, descending=True, stable=True)
            first = by_cap[: min(len(by_cap), math.ceil(1.25 * need) + 2)]
            self._solve(cost, wu, wv, glob, first, out)
            kth = np.sort(out[first.numpy()])[::-1][need - 1]
            rest = by_cap[len(first) :]
            todo = rest[cap[rest] >= kth - PRUNE_TOLERANCE]
        self._solve(cost, wu, wv, glob, todo, out)
        return out

    def _problem(self, query: torch.Tensor, dots: torch.Tensor, norms: torch.Tensor, means: torch.Tensor):
        """Costs (float64) and weights from the query's raw node dots with every candidate."""
        wu, wv = WEIGHTS_FROM_DOTS[self.settings.weights](dots)
        q_norms, q_means = node_stats(query[None], self.settings.center)
        if self.settings.center:  # (u - mu) . (v - mv) = u . v - d mu mv
            dots = dots - query.shape[1] * q_means[0][None, :, None] * means[:, None, :]
        cost = pair_costs(dots, q_norms, norms)
        return cost.double(), wu.double(), wv.double()

    def _solve(self, cost, wu, wv, glob, todo: torch.Tensor, out: np.ndarray) -> None:
        if len(todo) == 0:
            return
        with stage("rerank: solve"):
            dist, _ = solve(cost[todo], wu[todo], wv[todo], solver=self.settings.solver)
        total = 0.5 * (wu[todo].sum(dim=1) + wv[todo].sum(dim=1))
        emd = (total - dist) / total
        alpha = self.settings.alpha
        fused = emd if alpha == 0.0 else (1.0 - alpha) * emd + alpha * glob[todo]
        out[todo.numpy()] = fused.numpy()
        self.stats.solved += len(todo)


def rescore(
    query_set: torch.Tensor, candidate_sets: torch.Tensor, global_scores: torch.Tensor | None, settings: RerankSettings
) -> torch.Tensor:
    """Scores ``(K,)`` of one query set ``(m, d)`` against ``K`` candidate sets ``(K, n, d)``
    (every candidate solved, in the candidates' order; no global scores: no fusion)."""
    if global_scores is None:
        settings = replace(settings, alpha=0.0)
    reranker = Reranker.from_settings(candidate_sets, settings, k=len(candidate_sets), prune=False)
    glob = np.zeros(len(candidate_sets)) if global_scores is None else np.asarray(global_scores, np.float64)
    with torch.no_grad():
        scores = reranker._scores(torch.as_tensor(query_set), np.arange(len(candidate_sets)), glob, len(candidate_sets))
    return torch.from_numpy(scores).float()


def rerank(
    scores: np.ndarray,
    ids: np.ndarray,
    query_sets: Callable[[int], np.ndarray],
    fetch: FetchSets,
    settings: RerankSettings,
    skip_ids: np.ndarray | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The older array form of :class:`Reranker` (kept for the gallery and figure code):
    reorder each row of a best-first shortlist ``(Q, K)`` by DeepEMD within its first
    ``depth`` ids and return the whole width as ``(scores float32, ids int64)``."""
    shortlist = Shortlist(ids, scores)
    reranker = Reranker.from_settings(fetch, settings, k=shortlist.width, prune=False, progress=progress)
    out = reranker.rerank(query_sets, shortlist, skip_ids)
    return np.array(out.scores), np.array(out.ids)


__all__ = ["RerankSettings", "RerankStats", "Reranker", "rerank", "rescore"]
