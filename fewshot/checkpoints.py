"""Training checkpoints that resume exactly and load with ``weights_only=True``.

One dict of tensors and plain types: ``backbone`` (what ``test`` and ``train --init`` read),
``heads`` (pre-training classifiers), ``optimizer``, ``scheduler``, ``epoch`` (last finished),
``rng`` (torch/numpy/CUDA generator states), ``best`` (accuracy and epoch) and ``config``.
Written each epoch through :func:`deepemd.io.save_checkpoint` (temp file + rename), so a run
killed mid-write resumes from the previous epoch.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn

from deepemd import distributed
from deepemd.checkpoints import check_resumable, restore_rng, rng_state
from deepemd.errors import DeepEMDError
from deepemd.io import load_checkpoint, load_state_dict_checked, save_checkpoint

LAST, BEST = "last.pt", "best.pt"
#: Options of pre-training and meta-training that must not change between a checkpoint and its
#: resumption (those a command does not have are skipped).
FROZEN = (
    "backbone",
    "backbone_widths",
    "image_size",
    "local",
    "pyramid",
    "grid_levels",
    "grid_ratio",
    "num_patches",
    "batch_size",
    "seed",
    "bn",
    "bn_affine",
    "way",
    "shot",
    "query",
    "episodes_per_epoch",
    "rotation",
    "loss",
    "hierarchy",
)


def save_training_state(
    path: Path,
    *,
    backbone: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epoch: int,
    best: dict[str, float],
    config: Any,
    heads: nn.Module | None = None,
) -> None:
    state = {
        "backbone": backbone.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": int(epoch),
        "rng": rng_state(),
        "best": dict(best),
        "config": dataclasses.asdict(config),
    }
    if heads is not None:
        state["heads"] = heads.state_dict()
    save_checkpoint(state, path)


def save_epoch(out: Path, history: list[dict], improved: bool, **state: Any) -> None:
    """End of a training epoch on the main rank: ``OUT/last.pt``, ``OUT/best.pt`` when validation
    improved, and the per-epoch table ``OUT/history.csv`` across resumes."""
    from deepemd.eval import write_results

    save_training_state(out / LAST, **state)
    if improved:
        save_training_state(out / BEST, **state)
    write_results(merge_history(out, history), out, name="history", float_format="%.6g")


def end_epoch(
    out: Path,
    rank: distributed.Rank,
    history: list[dict],
    best: dict,
    *,
    epoch: int,
    loss: float,
    train_accuracy: float,
    val_acc: float,
    job: str,
    accuracy_name: str,
    **state: Any,
) -> dict:
    """The end of a pre-training or meta-training epoch on every rank; returns the new ``best``.

    The main rank's ``val_acc`` (NaN elsewhere, and on every rank without validation) is shared,
    the epoch is kept as best when it improved on validation (without, the last epoch is kept,
    as :func:`val_note` says), its row goes into
    ``history``, the main rank writes the checkpoints and the table (:func:`save_epoch`) and
    prints ``"{job} epoch 3: loss ... {accuracy_name} ..."``, and all ranks wait for it."""
    val_acc = distributed.broadcast_float(val_acc, rank)
    if math.isnan(val_acc) or val_acc > best["accuracy"]:
        best, improved = {"accuracy": val_acc, "epoch": epoch}, True
    else:
        improved = False
    scheduler = state["scheduler"]
    history.append(
        {
            "epoch": epoch,
            "loss": loss,
            "train_accuracy": train_accuracy,
            "val_accuracy": val_acc,
            "lr": scheduler.get_last_lr()[0],
        }
    )
    if rank.main:
        save_epoch(out, history, improved, epoch=epoch, best=best, **state)
        print(
            f"{job} epoch {epoch}: loss {loss:.3f} {accuracy_name} {train_accuracy:.1f}% " + val_note(val_acc, best),
            flush=True,
        )
    distributed.barrier(rank)
    return best


def load_training_state(path: Path) -> dict[str, Any]:
    state = load_checkpoint(path)
    missing = [k for k in ("backbone", "optimizer", "scheduler", "epoch", "best") if k not in state]
    if missing:
        raise DeepEMDError(
            f"not a fewshot training checkpoint (missing '{missing[0]}')",
            path,
            "delete it, or point --out to a fresh folder",
        )
    return state


def merge_history(out: Path, new_rows: list[dict]) -> list[dict]:
    """The per-epoch table across resumes: earlier epochs from ``out/history.csv``, then this run's."""
    path = out / "history.csv"
    first = new_rows[0]["epoch"]
    old = pd.read_csv(path).to_dict("records") if path.is_file() else []
    return [r for r in old if r["epoch"] < first] + new_rows


def val_note(val_acc: float, best: dict) -> str:
    """The progress line's validation part (no validation: the last epoch is what is kept)."""
    if math.isnan(val_acc):  # val_episodes 0
        return "no validation (last epoch kept)"
    return f"val acc {val_acc:.2f}% (best {best['accuracy']:.2f}% @ {best['epoch']})"


def run_keeping_best(body: Callable[..., nn.Module], cfg: Any, progress: bool, load_best: bool) -> nn.Module:
    """Run a training ``body(cfg, rank, device, progress)`` in its (possibly distributed) process
    group and return its backbone: the best on validation (``load_best``, read from
    ``OUT/best.pt`` after every rank finished), else the last epoch's."""
    rank, device = distributed.setup(cfg.device)
    try:
        backbone = body(cfg, rank, device, progress and rank.main)
        best = Path(cfg.out) / BEST
        if load_best and best.is_file():
            load_state_dict_checked(backbone, load_training_state(best)["backbone"], best)
        return backbone
    finally:
        distributed.teardown(rank)


def sgd_with_steps(model: nn.Module, cfg: Any) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.StepLR]:
    """The authors' optimiser for both stages: SGD (Nesterov when momentum > 0), step decay."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0
    )
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)


def say_if_complete(job: str, start_epoch: int, config: Any) -> None:
    """One line when a resumed run has nothing left to do, so re-running a finished command is
    not a silent exit 0 that looks like a failure to train. ``start_epoch`` 0 is a fresh start
    (``--epochs 0`` trains nothing on purpose), and a run resumed at ``--epochs`` lowered below
    what ``last.pt`` holds needs more than that many epochs to train on."""
    if start_epoch == 0 or start_epoch < config.epochs:
        return
    done = f"{start_epoch} of {config.epochs} epochs done"
    if start_epoch > config.epochs:
        done = f"{start_epoch} epochs done, more than --epochs {config.epochs}"
    print(
        f"{job}: already complete: {done} ({Path(config.out) / LAST}); "
        f"raise --epochs above {start_epoch} to train further"
    )


def resume_or_start(
    config: Any, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[int, dict[str, Any]]:
    """``(epoch to run next, best-so-far record)``: a fresh start, or, with ``config.resume`` and
    an ``OUT/last.pt``, its training state restored (each module under its saved key, optimiser,
    schedule, RNGs). A run whose ``config`` differs from the checkpoint's in an option of
    :data:`FROZEN` is refused, not mixed in."""
    path = Path(config.out) / LAST
    if not (config.resume and path.is_file()):
        return 0, {"accuracy": -1.0, "epoch": -1}
    state = load_training_state(path)
    check_resumable(state.get("config", {}), config, FROZEN, path)
    for key, module in modules.items():
        load_state_dict_checked(module, state[key], path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])
    return state["epoch"] + 1, dict(state["best"])
