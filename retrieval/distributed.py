"""Multi-process training helpers: process group set-up and class-balanced sampling per rank.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything runs in one process.
pml's ``MPerClassSampler`` has no notion of ranks, so :class:`DistributedMPerClassSampler` draws
the *global* list of class-balanced batches once per epoch from a seed every rank shares, and
gives each rank its slice of every global batch: each rank's batch still holds whole classes
(``m`` images each), all ranks together see exactly the single-process global batch, and the
order depends only on (seed, epoch), so a resumed run replays it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from deepemd.data import class_balanced_sampler
from deepemd.errors import DeepEMDError


def setup_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); ``(rank, world)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


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

    def __init__(self, labels: np.ndarray, m: int, batch_size: int, batches_per_epoch: int,
                 seed: int = 0, rank: int = 0, world: int = 1):
        if batch_size % m:
            raise DeepEMDError(f"batch size {batch_size} is not a multiple of m_per_class={m}",
                               fix="make --batch-size a multiple of --m-per-class")
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
        with seeded_pml(self.seed * 1_000_003 + self.epoch):
            sampler = class_balanced_sampler(self.labels, self.m, self.global_batch, self.global_batch * self.batches)
            order = np.fromiter(iter(sampler), dtype=np.int64)
        batches = order[: self.batches * self.global_batch].reshape(self.batches, self.world, self.batch_size)
        return iter(batches[:, self.rank].reshape(-1).tolist())


def average_loss_gradients(module: torch.nn.Module, world: int) -> None:
    """Proxy-loss parameters see the gathered batch on every rank (pml's DistributedLossWrapper
    scales the loss by ``world``): sum over ranks and divide by ``world**2`` to get the gradient
    of the one global loss, identical on every rank."""
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= world * world


def sync_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP does this before
    each forward; doing it at the end of an epoch makes the saved model the one every rank holds."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
