"""Episode and class-balanced batch samplers.

``EpisodeSampler`` is a DataLoader ``batch_sampler``: each batch is one N-way K-shot episode,
``way*shot`` support indices (class-major: all shots of episode class 0, then class 1, ...)
followed by ``way*query`` query indices in the same class-major order, so the episode label of
support/query item j is ``j // shot`` / ``j // query``. Episodes depend only on
``(seed, epoch)``: identical seeds give identical episodes; ``set_epoch`` draws fresh ones.

``DistributedMPerClassSampler`` is pml's class-balanced sampler for several ranks: pml's
``MPerClassSampler`` has no notion of ranks, so the *global* list of class-balanced batches is
drawn once per epoch from a seed every rank shares, and each rank takes its slice of every global
batch: each rank's batch still holds whole classes (``m`` images each), all ranks together see
exactly the single-process global batch, and the order depends only on (seed, epoch), so a
resumed run replays it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from deepemd.errors import DeepEMDError
from deepemd.seeding import derive_seed


class EpisodeSampler:
    def __init__(
        self,
        labels,
        way: int,
        shot: int,
        query: int,
        episodes: int,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
    ):
        """``labels``: int array (or an ImageList / ImageDataset, whose class names then appear
        in errors). Every sampled class needs ``shot + query`` images."""
        if class_names is None and hasattr(labels, "classes"):
            class_names = labels.classes
        labels = np.asarray(getattr(labels, "labels", labels), dtype=np.int64)
        if way < 1 or shot < 1 or query < 0 or episodes < 1:
            raise DeepEMDError(
                f"bad episode settings way={way} shot={shot} query={query} episodes={episodes}",
                fix="use way >= 1, shot >= 1, query >= 0, episodes >= 1",
            )
        self.way, self.shot, self.query, self.episodes, self.seed = way, shot, query, episodes, seed
        self.epoch = 0
        classes, counts = np.unique(labels, return_counts=True)
        need = shot + query
        small = classes[counts < need]
        if len(small):
            c = int(small[0])
            name = class_names[c] if class_names is not None else f"label {c}"
            raise DeepEMDError(
                f"class '{name}' has {int(counts[classes == c][0])} images, fewer than "
                f"shot + query = {need} ({len(small)} classes are this small)",
                fix="lower --shot/--query, add images, or remove the small classes",
            )
        if len(classes) < way:
            raise DeepEMDError(
                f"{way}-way episodes need {way} classes, the data has {len(classes)}",
                fix="lower --way or use a split with more classes",
            )
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
            query = [int(i) for p in picks for i in p[self.shot :]]
            yield support + query


def class_balanced_sampler(labels, m: int, batch_size: int, length_before_new_iter: int | None = None):
    """pml's ``MPerClassSampler``: batches of ``batch_size`` holding ``m`` images per class."""
    from pytorch_metric_learning.samplers import MPerClassSampler

    labels = np.asarray(getattr(labels, "labels", labels), dtype=np.int64)
    n_classes = len(np.unique(labels))
    if batch_size % m or m * n_classes < batch_size:
        raise DeepEMDError(
            f"batch_size {batch_size} must be a multiple of m={m} and at most m x classes = {m * n_classes}",
            fix="change --batch-size or m",
        )
    return MPerClassSampler(
        labels, m, batch_size=batch_size, length_before_new_iter=length_before_new_iter or max(len(labels), batch_size)
    )


@contextmanager
def seeded_pml(seed: int) -> Iterator[None]:
    """pml samplers draw from the module-level ``NUMPY_RANDOM``; point it at a seeded generator."""
    from pytorch_metric_learning.utils import common_functions as c_f

    saved = c_f.NUMPY_RANDOM
    c_f.NUMPY_RANDOM = np.random.RandomState(seed)
    try:
        yield
    finally:
        c_f.NUMPY_RANDOM = saved


class DistributedMPerClassSampler(Sampler[int]):
    """pml's MPerClassSampler, seeded per epoch and split across ranks (``set_epoch`` like
    ``DistributedSampler``). ``batch_size`` is per rank; it must be a multiple of ``m``."""

    def __init__(
        self,
        labels: np.ndarray,
        m: int,
        batch_size: int,
        batches_per_epoch: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ):
        if batch_size % m:
            raise DeepEMDError(
                f"batch size {batch_size} is not a multiple of m_per_class={m}",
                fix="make --batch-size a multiple of --m-per-class",
            )
        self.labels = np.asarray(labels, dtype=np.int64)
        self.m, self.batch_size, self.batches = int(m), int(batch_size), int(batches_per_epoch)
        self.seed, self.rank, self.world, self.epoch = int(seed), int(rank), int(world), 0
        self.global_batch = self.batch_size * self.world
        # validates m x classes >= global batch with one clear error
        class_balanced_sampler(self.labels, self.m, self.global_batch, self.global_batch * self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        with seeded_pml(derive_seed(self.seed, "m-per-class", self.epoch) % (2**32)):
            sampler = class_balanced_sampler(self.labels, self.m, self.global_batch, self.global_batch * self.batches)
            order = np.fromiter(iter(sampler), dtype=np.int64)
        batches = order[: self.batches * self.global_batch].reshape(self.batches, self.world, self.batch_size)
        return iter(batches[:, self.rank].reshape(-1).tolist())
