"""Data-parallel training under ``torchrun`` (DDP), for both jobs: gloo on CPU, NCCL on CUDA.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything here is a no-op and the
run is an ordinary single process. Under ``torchrun`` each rank trains on its own share of the
batches / episodes, DDP averages the gradients, and only the main rank validates and writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from deepemd.device import default_device


@dataclass(frozen=True)
class Rank:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only the main rank validates, checkpoints and writes results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(requested_device: str | None) -> tuple[Rank, torch.device]:
    """Join the process group when launched by ``torchrun``; pick this rank's device
    (``cuda:LOCAL_RANK`` on a GPU machine)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = default_device(requested_device)
    if world <= 1:
        return Rank(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Rank(rank, world, local_rank), device


def wrap(module: nn.Module, rank: Rank, device: torch.device) -> nn.Module:
    """DDP around ``module`` when distributed (gradients are all-reduced in ``backward``)."""
    if not rank.distributed:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def barrier(rank: Rank) -> None:
    if rank.distributed:
        dist.barrier()


def broadcast_float(value: float, rank: Rank) -> float:
    """The main rank's value on every rank (e.g. the validation accuracy only it computed)."""
    if not rank.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return float(box[0])


def sync_buffers(module: nn.Module, rank: Rank) -> None:
    """The main rank's buffers (BatchNorm running statistics) on every rank.

    DDP broadcasts buffers before each forward, but each rank's forward then updates its own
    copy from its own batch; syncing at epoch end makes every rank hold identical weights.
    """
    if rank.distributed:
        for buffer in unwrap(module).buffers():
            dist.broadcast(buffer, src=0)


def average_loss_gradients(module: nn.Module, rank: Rank) -> None:
    """Proxy-loss parameters see the gathered batch on every rank (pml's DistributedLossWrapper
    scales the loss by ``world``): sum over ranks and divide by ``world**2`` to get the gradient
    of the one global loss, identical on every rank."""
    if not rank.distributed:
        return
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= rank.world * rank.world


def teardown(rank: Rank) -> None:
    if rank.distributed and dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "Rank",
    "setup",
    "wrap",
    "unwrap",
    "barrier",
    "broadcast_float",
    "sync_buffers",
    "average_loss_gradients",
    "teardown",
]
