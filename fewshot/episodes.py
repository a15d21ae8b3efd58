"""Seeded N-way K-shot episodes over cached features, and the accuracy of every method on them.

Episode indices come from :class:`deepemd.data.EpisodeSampler` (identical for identical seeds);
all methods see the same episodes, so their differences are paired, not sampling noise.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import time

import numpy as np
import torch
from tqdm import tqdm

from deepemd.data import EpisodeSampler
from deepemd.errors import DeepEMDError
from deepemd.eval import mean_ci95
from deepemd.fewshot.features import FeatureCache
from deepemd.fewshot.methods import Episode, Method


def check_episode_size(labels: np.ndarray, way: int, shot: int, query: int, where: str = "") -> None:
    """Explain, instead of failing inside the sampler, when a split is too small for the task."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    usable = int((counts >= shot + query).sum())
    if usable < way:
        raise DeepEMDError(
            f"only {usable} classes have {shot + query} images ({shot} shots + {query} queries); "
            f"a {way}-way episode needs {way}", where or None,
            "lower --way, --shot or --query, or use a split with more classes/images")


def episode_indices(labels: np.ndarray, way: int, shot: int, query: int, episodes: int, seed: int,
                    rank: int = 0, world: int = 1) -> Iterator[np.ndarray]:
    """Index arrays (``way*shot`` supports, class-major, then ``way*query`` queries).

    With ``world > 1`` rank ``r`` takes episodes ``r, r+world, ...`` of the one seeded sequence:
    ranks never repeat each other's episodes, and the union is the single-process run.
    """
    sampler = EpisodeSampler(labels, way, shot, query, episodes, seed)
    for i, idx in enumerate(sampler):
        if i % world == rank:
            yield np.asarray(idx, dtype=np.int64)


def episode_labels(labels: np.ndarray, idx: np.ndarray, way: int, shot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Episode-local labels 0..way-1 in the support's class-major order."""
    n_support = way * shot
    classes = labels[idx[:n_support:shot]]
    lookup = {int(c): i for i, c in enumerate(classes)}
    support = torch.tensor([lookup[int(c)] for c in labels[idx[:n_support]]], dtype=torch.long)
    query = torch.tensor([lookup[int(c)] for c in labels[idx[n_support:]]], dtype=torch.long)
    if not torch.equal(support, torch.arange(way).repeat_interleave(shot)):
        raise RuntimeError("episode sampler did not return a class-major support set")
    return support, query


def make_episode(cache: FeatureCache, idx: np.ndarray, way: int, shot: int) -> Episode:
    support_labels, query_labels = episode_labels(cache.labels, idx, way, shot)
    n_support = way * shot
    return Episode(way, shot, cache.take(idx[:n_support]), cache.take(idx[n_support:]),
                   support_labels, query_labels)


@torch.no_grad()
def evaluate(cache: FeatureCache, methods: Mapping[str, Method], way: int, shot: int, query: int,
             episodes: int, seed: int, progress: bool = True,
             seconds: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Per-episode accuracy (fraction) of each method, all on the same seeded episodes.

    ``seconds``, when given, receives each method's total time over the episodes.
    """
    check_episode_size(cache.labels, way, shot, query)
    accs: dict[str, list[float]] = {name: [] for name in methods}
    timing = {name: 0.0 for name in methods}
    for idx in tqdm(episode_indices(cache.labels, way, shot, query, episodes, seed), total=episodes,
                    desc=f"{way}-way {shot}-shot episodes", disable=not progress, leave=False):
        ep = make_episode(cache, idx, way, shot)
        for name, method in methods.items():
            start = time.perf_counter()
            pred = method(ep).argmax(dim=1)
            timing[name] += time.perf_counter() - start
            accs[name].append(float((pred == ep.query_labels).float().mean()))
    if seconds is not None:
        seconds.update(timing)
    return {name: np.asarray(v) for name, v in accs.items()}


def summarise(accs: Mapping[str, np.ndarray], way: int, shot: int) -> list[dict[str, object]]:
    """One results row per method: mean accuracy and 95% CI half-width, in percent."""
    rows = []
    for name, values in accs.items():
        mean, ci = mean_ci95(values)
        rows.append({"method": name, "way": way, "shot": shot, "accuracy": 100 * mean, "ci95": 100 * ci,
                     "episodes": len(values)})
    return rows
