"""Retrieval with a label hierarchy: the severity of each query's first wrong result."""

from __future__ import annotations

import math

import numpy as np

from deepemd.eval.labels import first_result_severity
from deepemd.eval.retrieval import retrieval_metrics
from deepemd.labels import LabelTree


def test_first_result_severity_by_hand():
    # classes a, b under x; c under y: d(a,b) = 2, d(a,c) = d(b,c) = 4
    tree = LabelTree.from_parents({"a": "x", "b": "x", "c": "y", "x": "r", "y": "r"})
    d = tree.distance_matrix().numpy()
    assert d[0, 1] == 2 and d[0, 2] == 4
    assert first_result_severity([1, 2, 0, 2], [0, 0, 0, 2], d) == (2 + 4) / 2
    assert math.isnan(first_result_severity([0, 1], [0, 1], d))


def test_retrieval_metrics_report_severity_of_the_first_wrong_result():
    tree = LabelTree.from_parents({"a": "x", "b": "x", "c": "y", "x": "r", "y": "r"})
    # four 2-d embeddings: 0,1 of class a; 2 of class b next to query 0; 3 of class c next to query 1
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.99, 0.14], [0.14, 0.99]], dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.array([0, 0, 1, 2])
    row = retrieval_metrics(emb, labels, distance=tree.distance_matrix().numpy())
    # first results: 0 -> 2 (b, wrong, d 2), 1 -> 3 (c, wrong, d 4), 2 -> 0 (a, wrong, d 2), 3 -> 1 (a, wrong, d 4)
    assert row["P@1"] == 0.0 and row["severity"] == 3.0
    assert "severity" not in retrieval_metrics(emb, labels)
