"""Seeded N-way K-shot episodes over cached features, and the accuracy of every method on them.

Episode indices come from :class:`deepemd.data.EpisodeSampler` (identical for identical seeds);
all methods see the same episodes, so their differences are paired, not sampling noise.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from tqdm import tqdm

from deepemd.data import EpisodeSampler
from deepemd.errors import DeepEMDError
from deepemd.eval import mean_ci95
from deepemd.fewshot.features import FeatureCache
from deepemd.fewshot.methods import Episode, EpisodeBatch, Method


def check_episode_size(labels: np.ndarray, way: int, shot: int, query: int, where: str = "") -> None:
    """Explain, instead of failing inside the sampler, when a split is too small for the task."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    usable = int((counts >= shot + query).sum())
    if usable < way:
        raise DeepEMDError(
            f"only {usable} classes have {shot + query} images ({shot} shots + {query} queries); "
            f"a {way}-way episode needs {way}",
            where or None,
            "lower --way, --shot or --query, or use a split with more classes/images",
        )


def episode_indices(
    labels: np.ndarray, way: int, shot: int, query: int, episodes: int, seed: int, rank: int = 0, world: int = 1
) -> Iterator[np.ndarray]:
    """Index arrays (``way*shot`` supports, class-major, then ``way*query`` queries).

    With ``world > 1`` rank ``r`` takes episodes ``r, r+world, ...`` of the one seeded sequence:
    ranks never repeat each other's episodes, and the union is the single-process run.
    """
    sampler = EpisodeSampler(labels, way, shot, query, episodes, seed)
    for i, idx in enumerate(sampler):
        if i % world == rank:
            yield np.asarray(idx, dtype=np.int64)


def episode_labels(labels: np.ndarray, idx: np.ndarray, way: int, shot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Episode-local labels 0..way-1 in the support's class-major order: ``idx (n,)`` gives
    ``(way*shot,), (Q,)``; a stack of episodes ``idx (E, n)`` gives ``(way*shot,), (E, Q)`` (the
    support labels are the same in every episode)."""
    idx = np.asarray(idx)
    rows = np.atleast_2d(idx)
    n_support = way * shot
    ep_labels = labels[rows]  # (E, n)
    classes = ep_labels[:, :n_support:shot]  # (E, way)
    match = ep_labels[:, :, None] == classes[:, None, :]  # (E, n, way)
    expected = np.repeat(np.arange(way), shot)
    if not match.any(axis=2).all() or not (match[:, :n_support].argmax(axis=2) == expected).all():
        raise RuntimeError("episode sampler did not return a class-major support set")
    query = torch.from_numpy(match[:, n_support:].argmax(axis=2).astype(np.int64))
    return torch.from_numpy(expected.astype(np.int64)), (query if idx.ndim == 2 else query[0])


def make_episode(cache: FeatureCache, idx: np.ndarray, way: int, shot: int) -> Episode:
    support_labels, query_labels = episode_labels(cache.labels, idx, way, shot)
    n_support = way * shot
    return Episode(way, shot, cache.take(idx[:n_support]), cache.take(idx[n_support:]), support_labels, query_labels)


def make_batch(
    cache: FeatureCache, idx: np.ndarray, way: int, shot: int, per_image: dict | None = None
) -> EpisodeBatch:
    """The episodes of the rows of ``idx (E, way*shot + Q)``; ``per_image``: the run's
    once-per-image work, shared by all its batches."""
    _, query_labels = episode_labels(cache.labels, idx, way, shot)
    n_support = way * shot
    idx_t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    return EpisodeBatch(
        way,
        shot,
        cache,
        idx_t[:, :n_support],
        idx_t[:, n_support:],
        query_labels,
        {} if per_image is None else per_image,
    )


#: Episodes scored together: large enough that per-call overhead is shared, small enough that
#: the stacked local sets of a batch (E x 80 sets at 5-way 1-shot) stay ~100 MB at 25 x 1280.
BATCH_EPISODES = 8


def _batches(indices: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    chunk: list[np.ndarray] = []
    for idx in indices:
        chunk.append(idx)
        if len(chunk) == size:
            yield np.stack(chunk)
            chunk = []
    if chunk:
        yield np.stack(chunk)


@torch.no_grad()
def evaluate(
    cache: FeatureCache,
    methods: Mapping[str, Method | Callable[[Episode], torch.Tensor]],
    way: int,
    shot: int,
    query: int,
    episodes: int,
    seed: int,
    progress: bool = True,
    seconds: dict[str, float] | None = None,
    batch: int = BATCH_EPISODES,
) -> dict[str, np.ndarray]:
    """Per-episode accuracy (fraction) of each method, all on the same seeded episodes.

    Episodes are scored ``batch`` at a time (:class:`Method` scores a stack at once; a plain
    ``callable(episode)`` is called per episode). ``seconds``, when given, receives each
    method's total time over the episodes; work methods share within a batch (node dot
    products, EMD to each support) is counted for the first method that needs it.
    """
    check_episode_size(cache.labels, way, shot, query)
    accs: dict[str, list[np.ndarray]] = {name: [] for name in methods}
    timing = {name: 0.0 for name in methods}
    with tqdm(total=episodes, desc=f"{way}-way {shot}-shot episodes", disable=not progress, leave=False) as bar:
        per_image: dict = {}
        for idx in _batches(episode_indices(cache.labels, way, shot, query, episodes, seed), batch):
            eb = make_batch(cache, idx, way, shot, per_image)
            for name, method in methods.items():
                start = time.perf_counter()
                if isinstance(method, Method):
                    scores = method.batch(eb)
                else:
                    scores = torch.stack([method(make_episode(cache, row, way, shot)) for row in idx])
                correct = scores.argmax(dim=2) == eb.query_labels
                timing[name] += time.perf_counter() - start
                accs[name].append(correct.double().mean(dim=1).numpy())
            bar.update(len(idx))
    if seconds is not None:
        seconds.update(timing)
    return {name: np.concatenate(v) if v else np.zeros(0) for name, v in accs.items()}


def summarise(accs: Mapping[str, np.ndarray], way: int, shot: int) -> list[dict[str, object]]:
    """One results row per method: mean accuracy and 95% CI half-width, in percent."""
    rows = []
    for name, values in accs.items():
        mean, ci = mean_ci95(values)
        rows.append(
            {
                "method": name,
                "way": way,
                "shot": shot,
                "accuracy": 100 * mean,
                "ci95": 100 * ci,
                "episodes": len(values),
            }
        )
    return rows
