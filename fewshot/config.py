"""The options of ``deepemd fewshot pretrain | train | test``: one dataclass per command.

Every field can be set in a YAML file (``--config``) or on the command line (``--field-name``);
unknown keys are an error (``deepemd.config``). The shared fields live in :class:`DataOptions`
and :class:`ModelOptions` so that the three commands name the same thing the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: Names accepted by ``data_root`` besides a folder: datasets that ship with or install for deepemd.
BUILTIN_ROOTS = ("demo", "fashion-mnist")


@dataclass
class DataOptions:
    layout: str = "folder"
    data_root: str = ""
    image_size: Optional[int] = None
    batch_size: int = 64
    workers: int = 0
    seed: int = 0
    device: Optional[str] = None
    skip_bad: bool = False
    out: str = "runs/fewshot"

    __field_docs__ = {
        "layout": "dataset layout: folder, miniimagenet, tieredimagenet, cifarfs, fc100, cub",
        "data_root": "dataset folder, or 'demo' (bundled Omniglot) or 'fashion-mnist' (Debian idx files)",
        "image_size": "input side in pixels; default: the size giving a 5x5 map as the paper "
        "(84 for resnet12, 160 otherwise)",
        "batch_size": "images per forward pass (feature extraction, pre-training)",
        "workers": "DataLoader worker processes",
        "seed": "seed for episodes, shuffling and initialisation",
        "device": "cpu, cuda, cuda:1 (default: CUDA if available)",
        "skip_bad": "skip unreadable, truncated or oversized images (counted in a warning) instead of stopping",
        "out": "output folder (checkpoints, results.csv, results.md, pictures)",
    }


@dataclass
class ModelOptions(DataOptions):
    backbone: str = "resnet12"
    backbone_widths: tuple[int, ...] = ()
    weights: str = "auto"
    local: str = "fcn"
    pyramid: tuple[int, ...] = ()
    grid_levels: tuple[int, ...] = (3,)
    grid_ratio: float = 2.0
    num_patches: int = 9
    node_weights: str = "cross"
    solver: str = "exact"
    temperature: float = 12.5
    center: bool = True

    __field_docs__ = {
        **DataOptions.__field_docs__,
        "backbone": "resnet12, resnet18, resnet50, efficientnet_lite0, mobilenetv2",
        "backbone_widths": "resnet12 stage widths (default 64 160 320 640; smaller runs fast on a CPU)",
        "weights": "backbone weights: auto (packaged ImageNet weights where the backbone has them), none, imagenet, "
        "or a checkpoint path (pre-train/train output)",
        "local": "local feature set: fcn, grid or sampling",
        "pyramid": "fcn feature pyramid levels, e.g. 3 2 1 (empty: plain 5x5 cells)",
        "grid_levels": "grid cells per side (several = image pyramid, e.g. 3 2)",
        "grid_ratio": "grid: enlarge each cell by this ratio for context",
        "num_patches": "sampling: random crops per image",
        "node_weights": "EMD node weights: cross (cross-reference) or uniform",
        "solver": "EMD solver: exact, opencv, qpth, sinkhorn",
        "temperature": "logit scale of the EMD score (the authors' 12.5)",
        "center": "centre each node over channels before the cosine cost (the authors' code)",
    }
    __renamed__ = {
        "pretrained": "write 'weights' (the backbone's weights, as in the retrieval job); the old "
                      "'weights' (cross or uniform) is now 'node_weights'",
    }


@dataclass
class PretrainConfig(ModelOptions):
    epochs: int = 120
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    step_size: int = 30
    gamma: float = 0.2
    rotation: bool = False
    rotation_weight: float = 0.5
    val_split: str = "val"
    val_fraction: float = 0.2
    val_method: str = "fcn"
    val_episodes: int = 200
    val_way: int = 5
    val_shot: int = 1
    val_query: int = 15
    resume: bool = True

    __field_docs__ = {
        **ModelOptions.__field_docs__,
        "epochs": "passes over the train split",
        "lr": "SGD learning rate",
        "momentum": "SGD momentum",
        "weight_decay": "SGD weight decay",
        "step_size": "epochs between learning-rate drops",
        "gamma": "learning-rate drop factor",
        "rotation": "add the 4-way rotation self-supervision loss (paper 5.3, Table 4)",
        "rotation_weight": "weight of the rotation loss (paper: 0.5)",
        "val_split": "split that picks the best checkpoint; if the layout has none, val_fraction of "
        "the train classes is held out",
        "val_fraction": "share of train classes held out when the layout has no val split",
        "val_method": "validation metric: fcn (DeepEMD-FCN episodes) or proto (prototype)",
        "val_episodes": "validation episodes per epoch (0: no validation, the last epoch is kept)",
        "val_way": "validation episode classes",
        "val_shot": "validation episode shots",
        "val_query": "validation queries per class",
        "resume": "continue from OUT/last.pt when it exists",
    }


@dataclass
class TrainConfig(ModelOptions):
    init: str = ""
    way: int = 5
    shot: int = 1
    query: int = 15
    epochs: int = 100
    episodes_per_epoch: int = 50
    lr: float = 5e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    step_size: int = 10
    gamma: float = 0.5
    val_split: str = "val"
    val_fraction: float = 0.2
    val_episodes: int = 200
    resume: bool = True

    __field_docs__ = {
        **ModelOptions.__field_docs__,
        "init": "pre-trained checkpoint to start from (pretrain's best.pt); empty: 'weights'",
        "way": "classes per training episode",
        "shot": "support images per class (k > 1 trains on the mean support set per class)",
        "query": "query images per class",
        "epochs": "training epochs",
        "episodes_per_epoch": "episodes per epoch (summed over DDP ranks)",
        "lr": "SGD learning rate",
        "momentum": "SGD momentum",
        "weight_decay": "SGD weight decay",
        "step_size": "epochs between learning-rate drops",
        "gamma": "learning-rate drop factor",
        "val_split": "split that picks the best checkpoint (see pretrain)",
        "val_fraction": "share of train classes held out when the layout has no val split",
        "val_episodes": "validation episodes per epoch (0: no validation, the last epoch is kept)",
        "resume": "continue from OUT/last.pt when it exists",
    }


@dataclass
class EvalConfig(ModelOptions):
    checkpoint: str = ""
    split: str = "test"
    way: int = 5
    shot: int = 1
    query: int = 15
    episodes: Optional[int] = None
    methods: tuple[str, ...] = ()
    sfc_steps: int = 100
    sfc_batch_size: int = 5
    sfc_lr: float = 0.1
    finetune_steps: int = 100
    knn_k: int = 3
    flow_picture: bool = True
    feature_cache: str = ""

    __field_docs__ = {
        **ModelOptions.__field_docs__,
        "checkpoint": "trained checkpoint (pretrain or train output); empty: the 'weights' option",
        "split": "split to sample test episodes from",
        "way": "classes per episode",
        "shot": "support images per class",
        "query": "query images per class",
        "episodes": "test episodes (default: 5000 for 1-shot, 600 otherwise, as the paper)",
        "methods": "methods to evaluate on the same episodes (default: all that fit the shot count; "
        "see `deepemd fewshot test --list-methods`)",
        "sfc_steps": "SFC: SGD steps, one support mini-batch each (paper Algorithm 1: 100)",
        "sfc_batch_size": "SFC: support images per step (paper: 5; authors' code: 4)",
        "sfc_lr": "SFC: learning rate (authors: 0.1)",
        "finetune_steps": "fine-tuned FC/cosine classifiers: full-support Adam steps (lr 0.01)",
        "knn_k": "KNN on local features: nearest support vectors per query vector",
        "flow_picture": "draw one episode's query-support matching flows (flows.png)",
        "feature_cache": "folder keeping extracted features, keyed by data + network options, so runs "
        "with other shots/methods/episodes skip the CNN (empty: no cache)",
    }

    def num_episodes(self) -> int:
        """The paper's protocol unless told otherwise: 5,000 for 1-shot, 600 for k-shot."""
        if self.episodes is not None:
            return self.episodes
        return 5000 if self.shot == 1 else 600
