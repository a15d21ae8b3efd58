"""Episode and class-balanced batch samplers.

``EpisodeSampler`` is a DataLoader ``batch_sampler``: each batch is one N-way K-shot episode,
``way*shot`` support indices (class-major: all shots of episode class 0, then class 1, ...)
followed by ``way*query`` query indices in the same class-major order, so the episode label of
support/query item j is ``j // shot`` / ``j // query``. Episodes depend only on
``(seed, epoch)``: identical seeds give identical episodes; ``set_epoch`` draws fresh ones.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from deepemd.errors import DeepEMDError


class EpisodeSampler:
    def __init__(self, labels, way: int, shot: int, query: int, episodes: int, seed: int = 0,
                 class_names: Sequence[str] | None = None):
        """``labels``: int array (or an ImageList / ImageDataset, whose class names then appear
        in errors). Every sampled class needs ``shot + query`` images."""
        if class_names is None and hasattr(labels, "classes"):
            class_names = labels.classes
        labels = np.asarray(getattr(labels, "labels", labels), dtype=np.int64)
        if way < 1 or shot < 1 or query < 0 or episodes < 1:
            raise DeepEMDError(f"bad episode settings way={way} shot={shot} query={query} episodes={episodes}",
                               fix="use way >= 1, shot >= 1, query >= 0, episodes >= 1")
        self.way, self.shot, self.query, self.episodes, self.seed = way, shot, query, episodes, seed
        self.epoch = 0
        classes, counts = np.unique(labels, return_counts=True)
        need = shot + query
        small = classes[counts < need]
        if len(small):
            c = int(small[0])
            name = class_names[c] if class_names is not None else f"label {c}"
            raise DeepEMDError(f"class '{name}' has {int(counts[classes == c][0])} images, fewer than "
                               f"shot + query = {need} ({len(small)} classes are this small)",
                               fix="lower --shot/--query, add images, or remove the small classes")
        if len(classes) < way:
            raise DeepEMDError(f"{way}-way episodes need {way} classes, the data has {len(classes)}",
                               fix="lower --way or use a split with more classes")
        self.classes = classes
        self.members = [np.flatnonzero(labels == c) for c in classes]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.episodes

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        for _ in range(self.episodes):
            chosen = rng.choice(len(self.classes), self.way, replace=False)
            picks = [rng.choice(self.members[c], self.shot + self.query, replace=False) for c in chosen]
            support = [int(i) for p in picks for i in p[: self.shot]]
            query = [int(i) for p in picks for i in p[self.shot:]]
            yield support + query


def class_balanced_sampler(labels, m: int, batch_size: int, length_before_new_iter: int | None = None):
    """pml's ``MPerClassSampler``: batches of ``batch_size`` holding ``m`` images per class."""
    from pytorch_metric_learning.samplers import MPerClassSampler

    labels = np.asarray(getattr(labels, "labels", labels), dtype=np.int64)
    n_classes = len(np.unique(labels))
    if batch_size % m or m * n_classes < batch_size:
        raise DeepEMDError(f"batch_size {batch_size} must be a multiple of m={m} and at most m x classes "
                           f"= {m * n_classes}", fix="change --batch-size or m")
    return MPerClassSampler(labels, m, batch_size=batch_size,
                            length_before_new_iter=length_before_new_iter or max(len(labels), batch_size))
