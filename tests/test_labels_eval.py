"""deepemd.eval.labels on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deepemd.errors import DeepEMDError
from deepemd.eval.labels import (
    accuracy_within,
    chain_mae,
    chain_metrics,
    hierarchical_distance_at_k,
    label_metrics,
    mean_ground_distance,
    mistake_severity,
    ranked_probability_score,
    topk_accuracy,
)
from deepemd.labels import LabelTree, chain

# leaves: a, b (under g), c (under h), d (under h); d(a,b)=2, d(a,c)=4
TREE = LabelTree.from_parents({"a": "g", "b": "g", "c": "h", "d": "h", "g": "r", "h": "r"})
D = TREE.distance_matrix()
SCORES = torch.tensor(
    [
        [0.9, 0.05, 0.03, 0.02],  # truth a, top-1 a (right)
        [0.1, 0.2, 0.6, 0.1],  # truth b, top-1 c (wrong, d=4), top-2 c,b
        [0.05, 0.1, 0.15, 0.7],  # truth c, top-1 d (wrong, d=2), top-2 d,c
        [0.1, 0.5, 0.3, 0.1],
    ]
)  # truth d, top-1 b (wrong, d=4), top-2 b,c
LABELS = torch.tensor([0, 1, 2, 3])


def test_tree_metrics_hand_computed():
    assert topk_accuracy(SCORES, LABELS, 1) == 0.25
    assert topk_accuracy(SCORES, LABELS, 2) == 0.75  # rows 2 and 3 have the truth second
    assert topk_accuracy(SCORES, LABELS, 5) == 1.0  # k beyond K: every class
    assert mean_ground_distance(SCORES, LABELS, D) == (0 + 4 + 2 + 4) / 4
    assert mistake_severity(SCORES, LABELS, D) == (4 + 2 + 4) / 3
    # HD@2 per row: a:(0+2)/2, b:(4+0)/2, c:(2+0)/2, d:(4+2)/2
    assert hierarchical_distance_at_k(SCORES, LABELS, D, 2) == pytest.approx((1 + 2 + 1 + 3) / 4)
    m = label_metrics(SCORES, LABELS, D, ks=(1, 2))
    assert m["hd@1"] == pytest.approx((1 - m["top1"]) * m["severity"])
    assert math.isnan(mistake_severity(SCORES[:1], LABELS[:1], D))  # no mistakes: undefined


def test_hd1_identity_on_random_scores():
    rng = np.random.default_rng(0)
    scores, labels = rng.random((200, 4)), rng.integers(4, size=200)
    m = label_metrics(scores, labels, D.numpy(), ks=(1,))
    assert m["hd@1"] == pytest.approx((1 - m["top1"]) * m["severity"])


def test_chain_metrics_hand_computed():
    probs = np.array(
        [
            [0.7, 0.2, 0.1, 0.0],  # truth 0, pred 0
            [0.1, 0.1, 0.2, 0.6],  # truth 1, pred 3 (error 2)
            [0.0, 0.6, 0.4, 0.0],
        ]
    )  # truth 2, pred 1 (error 1)
    y = np.array([0, 1, 2])
    assert chain_mae(probs, y) == 1.0
    assert accuracy_within(probs, y, 1) == pytest.approx(2 / 3)
    # RPS row 0: CDF (.7,.9,1.0) vs (1,1,1): .09+.01+0 ; row 1: (.1,.2,.4) vs (0,1,1): .01+.64+.36 ;
    # row 2: (0,.6,1) vs (0,0,1): .36 ; divided by K-1 = 3
    want = ((0.09 + 0.01) + (0.01 + 0.64 + 0.36) + 0.36) / 3 / 3
    assert ranked_probability_score(probs, y) == pytest.approx(want)
    m = chain_metrics(probs, y)
    assert m["top1"] == pytest.approx(1 / 3) and m["mae"] == 1.0
    # a unit chain's squared-CDF EMD is (K-1) x RPS
    from deepemd.labels import tree_emd

    emd2 = tree_emd(torch.tensor(probs), torch.tensor(y), chain(4), rho=2).mean()
    assert float(emd2) == pytest.approx(3 * want)


def test_metric_inputs_are_checked():
    with pytest.raises(DeepEMDError, match="label outside"):
        topk_accuracy(SCORES, torch.tensor([0, 1, 2, 9]))
    with pytest.raises(DeepEMDError, match="must be"):
        topk_accuracy(SCORES[0], LABELS)
