"""Seeded episodes, per-rank sharding, and the 95% CI of the results table."""

import math

import numpy as np
import pytest
import torch

from deepemd.errors import DeepEMDError
from deepemd.fewshot.episodes import episode_indices, episode_labels, evaluate, summarise
from deepemd.fewshot.features import FeatureCache

LABELS = np.repeat(np.arange(8), 6)


def _episodes(seed, rank=0, world=1, n=6):
    return [tuple(i) for i in episode_indices(LABELS, 4, 2, 3, n, seed, rank, world)]


def test_identical_seeds_give_identical_episodes_and_other_seeds_differ():
    assert _episodes(3) == _episodes(3)
    assert _episodes(3) != _episodes(4)


def test_ranks_split_the_single_process_sequence_without_overlap():
    single = _episodes(7, n=6)
    r0, r1 = _episodes(7, 0, 2), _episodes(7, 1, 2)
    assert r0 == single[0::2] and r1 == single[1::2]


def test_episode_labels_are_class_major():
    idx = next(episode_indices(LABELS, 4, 2, 3, 1, 0))
    support, query = episode_labels(LABELS, idx, 4, 2)
    assert support.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert query.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # the labels name the same original classes as the support
    classes = LABELS[idx[:8:2]]
    assert (classes[query.numpy()] == LABELS[idx[8:]]).all()


def test_ci95_matches_a_hand_computation():
    accs = {"m": np.array([1.0, 0.5, 0.75, 0.25])}
    row = summarise(accs, 5, 1)[0]
    # mean 0.625; population std sqrt(mean([.375,.125,.125,.375]^2)) = sqrt(0.078125)
    assert row["accuracy"] == pytest.approx(62.5)
    assert row["ci95"] == pytest.approx(100 * 1.96 * math.sqrt(0.078125) / 2)
    assert set(row) >= {"method", "way", "shot", "accuracy", "ci95"}


def test_all_methods_see_the_same_episodes():
    cache = FeatureCache(torch.randn(48, 4), torch.randn(48, 2, 4), torch.randn(48, 2, 4), LABELS)
    seen = {"a": [], "b": []}

    def recorder(name):
        def run(ep):
            seen[name].append(ep.query.global_.sum().item())
            return torch.randn(ep.query.global_.shape[0], ep.way, generator=torch.Generator().manual_seed(0))

        return run

    evaluate(cache, {"a": recorder("a"), "b": recorder("b")}, 4, 2, 3, 5, seed=1, progress=False)
    assert seen["a"] == seen["b"] and len(seen["a"]) == 5


def test_too_small_split_is_one_clear_error():
    cache = FeatureCache(torch.randn(12, 4), torch.randn(12, 2, 4), torch.randn(12, 2, 4), np.repeat(np.arange(3), 4))
    with pytest.raises(DeepEMDError, match="5-way"):
        evaluate(cache, {}, 5, 1, 3, 2, 0, progress=False)
