"""Retrieval metrics, computed by pytorch-metric-learning's own ``AccuracyCalculator``.

P@1, R-Precision and MAP@R (powerful-benchmarker protocol): leave-one-out, every image a query
against all the others. The raw row uses pml's default FAISS k-NN; a reranked row passes a
``knn_func`` (:class:`ShortlistKNN`) that takes a shortlist from any index and reorders its head,
so the metric code stays pml's and only the neighbour order differs between rows.
This module knows no job: the retrieval job hands in the shortlist and reorder functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import FaissKNN, return_results

from deepemd.errors import DeepEMDError
from deepemd.eval.labels import first_result_severity
from deepemd.eval.shortlist import Shortlist
from deepemd.timing import record

METRICS = {"precision_at_1": "P@1", "r_precision": "RP", "mean_average_precision_at_r": "MAP@R"}

#: ``search(query (Q,d), reference (N,d), n) -> Shortlist`` of n entries per query, best first.
Search = Callable[[np.ndarray, np.ndarray, int], Shortlist]
#: ``reorder(shortlist, k, skip_ids or None) -> Shortlist``: the best ``k`` of each row after
#: rescoring its head (``skip_ids[i]``, the query itself, kept first).
Reorder = Callable[[Shortlist, int, np.ndarray | None], Shortlist]


class TimedKNN:
    """Wraps any pml ``knn_func``, counts the seconds spent finding neighbours and keeps each
    query's first neighbour (for the severity of the first wrong result)."""

    def __init__(self, knn_func: Callable) -> None:
        self.knn_func = knn_func
        self.seconds = 0.0
        self.queries = 0
        self.first: np.ndarray | None = None

    def __call__(self, query, k, reference, ref_includes_query):
        start = time.perf_counter()
        result = self.knn_func(query, k, reference, ref_includes_query)
        self.seconds += time.perf_counter() - start
        self.queries += len(query)
        self.first = result[1][:, 0].detach().cpu().numpy().astype(np.int64)
        return result

    @property
    def queries_per_second(self) -> float:
        return self.queries / self.seconds if self.seconds > 0 else float("nan")


class ShortlistKNN:
    """A pml ``knn_func``: shortlist ``max(k, depth)`` ids, reorder the head, return the top k.

    With ``ref_includes_query`` (leave-one-out) the query's own id is passed to ``reorder`` as
    ``skip_ids`` and removed by pml's ``return_results``, exactly as pml's FaissKNN does.
    ``last`` keeps the reordered :class:`Shortlist` of the latest call (for figures).
    """

    def __init__(self, search: Search, reorder: Reorder, depth: int) -> None:
        self.search, self.reorder, self.depth = search, reorder, depth
        self.last: Shortlist | None = None

    def __call__(self, query, k, reference, ref_includes_query):
        self_count = int(bool(ref_includes_query))
        n = min(len(reference), max(k, self.depth) + self_count)
        q = query.detach().cpu().numpy().astype(np.float32)
        r = reference.detach().cpu().numpy().astype(np.float32)
        skip = np.arange(len(q), dtype=np.int64) if ref_includes_query else None
        self.last = self.reorder(self.search(q, r, n), k + self_count, skip)
        distances = torch.from_numpy(np.array(self.last.scores[:, : k + self_count]))
        indices = torch.from_numpy(np.array(self.last.ids[:, : k + self_count]))
        return return_results(distances.to(query.device), indices.to(query.device), ref_includes_query)


def retrieval_metrics(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    knn_func: Callable | None = None,
    distance: np.ndarray | None = None,
) -> dict[str, float]:
    """Leave-one-out P@1, RP, MAP@R (in percent) and ``queries/s`` of the k-NN step.

    ``knn_func=None`` is pml's default FAISS k-NN on the embeddings (the "raw" row). With a
    ``distance`` between classes (a label hierarchy's, ``(K, K)``), the row also holds the
    ``severity`` of the first wrong result: its mean distance to the query's class.
    """
    emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    lab = torch.as_tensor(np.asarray(labels)).long()
    if emb.ndim != 2 or len(emb) == 0:
        raise DeepEMDError(
            f"no query embeddings to evaluate (got shape {tuple(emb.shape)})",
            fix="check the data root and split: the eval classes hold no images",
        )
    if len(emb) != len(lab):
        raise DeepEMDError(f"{len(emb)} embeddings but {len(lab)} labels")
    timed = TimedKNN(knn_func if knn_func is not None else FaissKNN())
    calc = AccuracyCalculator(include=tuple(METRICS), k="max_bin_count", knn_func=timed, device=torch.device("cpu"))
    start = time.perf_counter()
    raw = calc.get_accuracy(emb, lab)
    record("metrics", time.perf_counter() - start - timed.seconds)
    row = {name: 100.0 * float(raw[key]) for key, name in METRICS.items()}
    if distance is not None and timed.first is not None:
        row["severity"] = first_result_severity(np.asarray(labels)[timed.first], labels, distance)
    row["queries/s"] = timed.queries_per_second
    return row


def depth_note(labels: np.ndarray, depth: int) -> str | None:
    """Say when a rerank of depth ``depth`` cannot reach R (the largest class size - 1)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    r_max = int(counts.max()) - 1 if counts.size else 0
    if depth < r_max:
        return (
            f"rerank depth K={depth} is below R={r_max} (largest class size - 1): the rerank "
            f"changes RP and MAP@R only within the first {depth} results."
        )
    return None
