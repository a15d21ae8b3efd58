"""Every few-shot method runs on a tiny episode, returns (queries, way) scores, and gets a
clearly separable episode right; the k-shot EMD rules agree with their definitions."""

import numpy as np
import pytest
import torch

from deepemd.emd import pairwise_similarity
from deepemd.emd.sfc import SFCFit
from deepemd.errors import DeepEMDError
from deepemd.fewshot.features import FeatureCache
from deepemd.fewshot.methods import METHODS, Episode, MethodOptions, default_methods, select

WAY, SHOT, QUERY, NODES, DIM = 3, 2, 2, 4, 6


def _cache(labels, centres, noise, gen):
    cells = centres[labels] + noise * torch.randn(len(labels), NODES, DIM, generator=gen)
    return FeatureCache(cells.mean(1), cells, cells, np.asarray(labels))


def _episode(noise=0.1, seed=0, shot=SHOT):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(WAY, NODES, DIM, generator=gen).abs() + torch.eye(WAY, DIM)[:, None, :] * 3
    s_labels = torch.arange(WAY).repeat_interleave(shot)
    q_labels = torch.arange(WAY).repeat_interleave(QUERY)
    return Episode(
        WAY, shot, _cache(s_labels, centres, noise, gen), _cache(q_labels, centres, noise, gen), s_labels, q_labels
    )


OPTS = MethodOptions(sfc=SFCFit(steps=10, batch_size=3), finetune_steps=30)


@pytest.mark.parametrize("key", list(METHODS))
def test_each_method_scores_a_separable_episode_correctly(key):
    ep = _episode()
    scores = METHODS[key].build(OPTS)(ep)
    assert scores.shape == (WAY * QUERY, WAY)
    assert torch.isfinite(scores).all()
    assert torch.equal(scores.argmax(1), ep.query_labels), key


def test_one_shot_deepemd_is_the_emd_to_each_support():
    ep = _episode(shot=1)
    expected = pairwise_similarity(ep.query.local, ep.support.local, temperature=12.5, center=True)
    torch.testing.assert_close(METHODS["emd"].build(OPTS)(ep), expected)


def test_nn_and_fusion_reduce_the_per_support_scores():
    ep = _episode(noise=1.0, seed=3)
    full = pairwise_similarity(ep.query.local, ep.support.local, temperature=12.5, center=True)
    per_class = full.reshape(-1, WAY, SHOT)
    torch.testing.assert_close(METHODS["emd_nn"].build(OPTS)(ep), per_class.amax(2))
    torch.testing.assert_close(METHODS["emd_fusion"].build(OPTS)(ep), per_class.mean(2))


def test_merge_compares_with_the_union_of_a_class_support_sets():
    ep = _episode(noise=1.0, seed=4)
    merged = torch.cat([ep.support.local[0], ep.support.local[1]])[None]  # class 0: 2*NODES nodes
    expected = pairwise_similarity(ep.query.local, merged, temperature=12.5, center=True)[:, 0]
    torch.testing.assert_close(METHODS["emd_merge"].build(OPTS)(ep)[:, 0], expected)


def test_protonet_is_negative_squared_distance_to_the_class_mean():
    ep = _episode(noise=1.0, seed=5)
    means = ep.support.global_.reshape(WAY, SHOT, -1).mean(1)
    expected = -((ep.query.global_[:, None, :] - means[None]) ** 2).sum(-1)
    torch.testing.assert_close(METHODS["protonet"].build(OPTS)(ep), expected, rtol=1e-4, atol=1e-4)


def test_method_selection_follows_the_shot_count():
    assert "emd_nn" not in default_methods(1) and "emd_nn" in default_methods(5)
    assert select(["emd", "emd_merge"], 1) == ["emd"]
    with pytest.raises(DeepEMDError, match="unknown few-shot method"):
        select(["emd", "protonett"], 1)
