"""Metrics for structured labels: how often a classifier is right, and how wrong when it is not.

Accuracy alone hides *which* mistakes are made; severity alone can be gamed by being wrong
less often but badly. Hierarchical-classification papers report them together:

- ``top-k``: share of samples whose true class is among the k highest scores.
- mean ground distance: mean ``d(argmax, truth)`` over all samples (``= HD@1``).
- mistake severity: mean ``d(argmax, truth)`` over the *wrong* top-1 predictions only, so
  ``HD@1 = (1 - top1) x severity``.
- ``HD@k``: mean over samples of the mean distance of the k top-scored classes to the truth.
- chains (ordered classes): MAE in class steps, accuracy within +-1 step, and the ranked
  probability score ``RPS = 1/(K-1) sum_i (CDF_p(i) - CDF_truth(i))^2`` over ``i < K``.

``d`` is a ``(K, K)`` matrix, e.g. ``tree.distance_matrix()`` of a :class:`deepemd.labels.LabelTree`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from deepemd.errors import DeepEMDError


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _checked(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s, y = _np(scores).astype(np.float64), _np(labels).astype(np.int64)
    if s.ndim != 2 or y.shape != (s.shape[0],):
        raise DeepEMDError(f"scores must be (N, K) and labels (N,), got {s.shape} and {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= s.shape[1]):
        raise DeepEMDError(f"label outside 0..{s.shape[1] - 1}")
    return s, y


def _topk(s: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores per row, best first (ties: lower index first)."""
    order = np.argsort(-s, axis=1, kind="stable")
    return order[:, :k]


def topk_accuracy(scores, labels, k: int = 1) -> float:
    """Share of rows whose label is among the ``k`` highest scores."""
    s, y = _checked(scores, labels)
    k = min(k, s.shape[1])
    return float((_topk(s, k) == y[:, None]).any(1).mean())


def mean_ground_distance(scores, labels, distance) -> float:
    """Mean ``d(top-1 prediction, truth)`` over all rows (correct rows count 0)."""
    s, y = _checked(scores, labels)
    d = _np(distance)
    return float(d[s.argmax(1), y].mean())


def mistake_severity(scores, labels, distance) -> float:
    """Mean ``d(top-1 prediction, truth)`` over the wrong top-1 predictions only (nan if none)."""
    s, y = _checked(scores, labels)
    d = _np(distance)
    pred = s.argmax(1)
    wrong = pred != y
    return float(d[pred[wrong], y[wrong]].mean()) if wrong.any() else math.nan


def first_result_severity(first_labels, query_labels, distance) -> float:
    """Retrieval's mistake severity: mean ``d(class of the first result, class of the query)``
    over the queries whose first result is of another class (nan if none is)."""
    first, truth = _np(first_labels).astype(np.int64), _np(query_labels).astype(np.int64)
    wrong = first != truth
    return float(_np(distance)[first[wrong], truth[wrong]].mean()) if wrong.any() else math.nan


def hierarchical_distance_at_k(scores, labels, distance, k: int) -> float:
    """Mean over rows of the mean distance of the ``k`` top-scored classes to the truth."""
    s, y = _checked(scores, labels)
    d = _np(distance)
    top = _topk(s, min(k, s.shape[1]))
    return float(d[top, y[:, None]].mean())


def chain_mae(scores, labels) -> float:
    """Mean absolute error of the top-1 class, in class steps."""
    s, y = _checked(scores, labels)
    return float(np.abs(s.argmax(1) - y).mean())


def accuracy_within(scores, labels, steps: int = 1) -> float:
    """Share of rows whose top-1 class is at most ``steps`` classes from the truth."""
    s, y = _checked(scores, labels)
    return float((np.abs(s.argmax(1) - y) <= steps).mean())


def ranked_probability_score(probs, labels) -> float:
    """Mean RPS ``1/(K-1) sum_{i<K} (CDF_p(i) - 1[i >= y])^2``; ``probs`` rows are distributions."""
    p, y = _checked(probs, labels)
    K = p.shape[1]
    cdf = np.cumsum(p, axis=1)[:, :-1]
    truth = (np.arange(K - 1)[None, :] >= y[:, None]).astype(np.float64)
    return float(((cdf - truth) ** 2).sum(1).mean() / (K - 1))


def label_metrics(scores, labels, distance, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Every tree metric in one dict: ``top1``, ``top5``, ``mean_distance``, ``severity``, ``hd@k``."""
    out = {f"top{k}": topk_accuracy(scores, labels, k) for k in ks}
    out["mean_distance"] = mean_ground_distance(scores, labels, distance)
    out["severity"] = mistake_severity(scores, labels, distance)
    for k in ks:
        out[f"hd@{k}"] = hierarchical_distance_at_k(scores, labels, distance, k)
    return out


def chain_metrics(probs, labels) -> dict[str, float]:
    """``top1``, ``mae``, ``within1``, ``rps`` for ordered classes (``probs``: distributions)."""
    return {
        "top1": topk_accuracy(probs, labels, 1),
        "mae": chain_mae(probs, labels),
        "within1": accuracy_within(probs, labels, 1),
        "rps": ranked_probability_score(probs, labels),
    }
