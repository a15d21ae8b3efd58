"""The options of ``deepemd fewshot pretrain | train | test``: one dataclass per command.

Every field can be set in a YAML file (``--config``) or on the command line (``--field-name``);
unknown keys are an error (``deepemd.config``). The groups shared with the retrieval job live in
``deepemd.options``; this module adds the few-shot options and the paper's defaults (ResNet-12,
a 5x5 map, temperature 12.5, centred nodes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from deepemd.config import option, registry_choices, same_option
from deepemd.options import (
    BUILTIN_ROOTS,
    BatchNormOptions,
    DataOptions,
    LabelSpaceOptions,
    LocalKindOption,
    LocalOptions,
    ModelOptions,
    class_loss_option,
    out_option,
    split_option,
)


@dataclass
class FewShotOptions(ModelOptions, LocalOptions, LocalKindOption, DataOptions):
    """The options every few-shot command shares."""

    backbone: str = same_option(ModelOptions, "backbone", "resnet12")
    weights: str = same_option(ModelOptions, "weights", "auto")
    batch_size: int = same_option(ModelOptions, "batch_size", 64)
    temperature: float = option(
        12.5, "logit scale of the EMD score (the authors' 12.5)", minimum=0.0, exclusive_minimum=True
    )
    out: str = out_option("runs/fewshot")


@dataclass
class ValidationOptions:
    """How a training command picks its best checkpoint on classes it does not train on."""

    val_split: str = option(
        "val",
        "split that picks the best checkpoint; if the layout has none, val_fraction of the train classes is held out",
    )
    val_fraction: float = option(
        0.2, "share of train classes held out when the layout has no val split", minimum=0.0, maximum=1.0
    )
    val_episodes: int = option(
        200, "validation episodes per epoch (0: no validation, the last epoch is kept)", minimum=0
    )


@dataclass
class ScheduleOptions:
    """SGD with step decay, as the authors train both stages."""

    momentum: float = option(0.9, "SGD momentum", minimum=0.0)
    weight_decay: float = option(5e-4, "SGD weight decay", minimum=0.0)
    gamma: float = option(0.2, "learning-rate drop factor", minimum=0.0)
    resume: bool = option(True, "continue from OUT/last.pt when it exists")


@dataclass
class PretrainConfig(LabelSpaceOptions, BatchNormOptions, ScheduleOptions, ValidationOptions, FewShotOptions):
    """`deepemd fewshot pretrain`: a linear classifier over the train classes (+ rotation loss)."""

    epochs: int = option(120, "passes over the train split", minimum=0)
    lr: float = option(0.1, "SGD learning rate", minimum=0.0)
    step_size: int = option(30, "epochs between learning-rate drops", minimum=1)
    rotation: bool = option(False, "add the 4-way rotation self-supervision loss (paper 5.3, Table 4)")
    rotation_weight: float = option(0.5, "weight of the rotation loss (paper: 0.5)", minimum=0.0)
    val_method: str = option(
        "fcn", "validation metric: fcn (DeepEMD-FCN episodes) or proto (prototype)", choices=("fcn", "proto")
    )
    val_way: int = option(5, "validation episode classes", minimum=2)
    val_shot: int = option(1, "validation episode shots", minimum=1)
    val_query: int = option(15, "validation queries per class", minimum=1)
    loss: str = class_loss_option("class loss")


@dataclass
class TrainConfig(BatchNormOptions, ScheduleOptions, ValidationOptions, FewShotOptions):
    """`deepemd fewshot train`: episodic meta-training through the differentiable EMD layer."""

    init: Optional[str] = option(None, "pre-trained checkpoint to start from (pretrain's best.pt); none: 'weights'")
    way: int = option(5, "classes per training episode", minimum=2)
    shot: int = option(1, "support images per class (k > 1 trains on the mean support set per class)", minimum=1)
    query: int = option(15, "query images per class", minimum=1)
    epochs: int = option(100, "training epochs", minimum=0)
    episodes_per_epoch: int = option(50, "episodes per epoch (summed over DDP ranks)", minimum=1)
    lr: float = option(5e-4, "SGD learning rate", minimum=0.0)
    step_size: int = option(10, "epochs between learning-rate drops", minimum=1)
    gamma: float = same_option(ScheduleOptions, "gamma", 0.5)


@dataclass
class EvalConfig(FewShotOptions):
    """`deepemd fewshot test`: seeded test episodes, every method on the same episodes."""

    checkpoint: Optional[str] = option(
        None, "trained checkpoint (pretrain or train output); none: the 'weights' option"
    )
    split: str = split_option("test")
    way: int = option(5, "classes per episode", minimum=2)
    shot: int = option(1, "support images per class", minimum=1)
    query: int = option(15, "query images per class", minimum=1)
    episodes: Optional[int] = option(
        None, "test episodes (default: 5000 for 1-shot, 600 otherwise, as the paper)", minimum=1
    )
    methods: tuple[str, ...] = option(
        (),
        "methods to evaluate on the same episodes (default: all that fit the shot count)",
        choices=registry_choices("deepemd.fewshot.methods", "METHODS"),
    )
    sfc_steps: int = option(100, "SFC: SGD steps, one support mini-batch each (paper Algorithm 1: 100)", minimum=0)
    sfc_batch_size: int = option(5, "SFC: support images per step (paper: 5; authors' code: 4)", minimum=1)
    sfc_lr: float = option(0.1, "SFC: learning rate (authors: 0.1)", minimum=0.0)
    finetune_steps: int = option(100, "fine-tuned FC/cosine classifiers: full-support Adam steps (lr 0.01)", minimum=0)
    knn_k: int = option(3, "KNN on local features: nearest support vectors per query vector", minimum=1)
    flow_picture: bool = option(True, "draw one episode's query-support matching flows (flows.png)")
    feature_cache: Optional[str] = option(
        None,
        "folder keeping extracted features, keyed by data + network "
        "options, so runs with other shots/methods/episodes skip the CNN "
        "(none: no cache)",
    )

    def num_episodes(self) -> int:
        """The paper's protocol unless told otherwise: 5,000 for 1-shot, 600 for k-shot."""
        if self.episodes is not None:
            return self.episodes
        return 5000 if self.shot == 1 else 600


__all__ = ["BUILTIN_ROOTS", "FewShotOptions", "PretrainConfig", "TrainConfig", "EvalConfig"]
