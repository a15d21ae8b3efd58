"""The option groups both jobs share, declared once: data, network, local sets and EMD scoring.

Each job's command dataclass (``retrieval/config.py``, ``fewshot/config.py``) inherits these
groups and adds only its own options; where a job's paper setting differs (the retrieval
pyramid {3,2,1} against the few-shot plain 5x5 map) it retunes the default with
:func:`deepemd.config.same_option`, keeping the help and the rules in this one place.
Conventions: "not given" is ``None`` for every option; every number has its bounds declared, so
a bad value fails when it is parsed; names backed by a registry list their choices in ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from deepemd.config import option, registry_choices

#: ``data_root`` names that are not folders: data sets that ship with or install for deepemd.
BUILTIN_ROOTS = ("demo", "fashion-mnist")


@dataclass
class DataOptions:
    """Where the images are and which of them a command uses."""

    layout: str = option(
        "folder",
        "dataset layout on disk (trees in docs/data.md)",
        choices=registry_choices("deepemd.data.layouts", "LAYOUTS"),
    )
    data_root: Optional[str] = option(
        None,
        "dataset folder (folder layout: <root>/<class>/<image>), or 'demo' (the bundled Omniglot "
        "set) or 'fashion-mnist' (Debian's idx files)",
    )
    max_classes: Optional[int] = option(None, "use at most this many classes (random, seeded)", minimum=1)
    per_class: Optional[int] = option(None, "use at most this many images per class (random, seeded)", minimum=1)
    skip_bad: bool = option(
        False, "skip unreadable, truncated or oversized images (counted in a warning) instead of stopping"
    )


@dataclass
class ModelOptions:
    """Which network turns images into feature maps, and where it runs."""

    backbone: str = option(
        "efficientnet_lite0", "feature network", choices=registry_choices("deepemd.backbones", "BACKBONES")
    )
    backbone_widths: tuple[int, ...] = option(
        (), "resnet12 stage widths (default 64 160 320 640; smaller runs fast on a CPU)", minimum=1
    )
    weights: str = option(
        "imagenet",
        "backbone weights: auto (packaged ImageNet weights where the backbone has "
        "them), imagenet, none (random init) or a weights / checkpoint file",
    )
    image_size: Optional[int] = option(
        None,
        "input side in pixels (none: retrieval uses the backbone's own; few-shot "
        "the side giving the paper's 5x5 map, 84 for resnet12, 160 otherwise)",
        minimum=8,
    )
    device: Optional[str] = option(None, "cpu, cuda, cuda:1 (default: cuda if available)")
    inference_dtype: str = option(
        "float32",
        "precision of the backbone when it extracts features (eval, index, search, test): float32, or "
        "bfloat16 (autocast: the whole retrieval eval 1.40x faster on a CPU with AMX, metrics within 0.7 "
        "points; training is unaffected)",
        choices=registry_choices("deepemd.device", "INFERENCE_DTYPES"),
    )
    batch_size: int = option(32, "images per forward pass (per process under torchrun)", minimum=1)
    workers: int = option(0, "DataLoader worker processes", minimum=0)
    seed: int = option(0, "seed of every random draw: subsampling, episodes, crops, batch order, init", minimum=0)


@dataclass
class LocalKindOption:
    """The one local-set kind a command extracts (eval compares several through ``methods``)."""

    local: str = option(
        "fcn",
        "local feature set: FCN map cells, Grid image cells or random Sampling crops",
        choices=registry_choices("deepemd.local", "KINDS"),
    )


@dataclass
class LocalOptions:
    """How an image is cut into a local set (paper 4.4) and how two sets are scored (4.2-4.3)."""

    pyramid: tuple[int, ...] = option((), "FCN feature pyramid levels added to the raw cells, e.g. 3 2 1", minimum=1)
    grid_levels: tuple[int, ...] = option(
        (3,), "Grid cells per side; several levels = image pyramid, e.g. 3 2", minimum=1
    )
    grid_ratio: float = option(2.0, "Grid: enlarge each cell by this ratio around its centre, for context", minimum=1.0)
    num_patches: int = option(9, "Sampling: random resized crops per image", minimum=1)
    patch_size: Optional[int] = option(
        None,
        "Grid/Sampling: crop side fed to the backbone (none: the input size, as the paper; a smaller side such "
        "as 96 keeps 13-25 crops per image affordable on a CPU)",
        minimum=8,
    )
    node_weights: str = option(
        "cross", "EMD node weights: cross (cross-reference, Eq. 11-12) or uniform", choices=("cross", "uniform")
    )
    solver: str = option("exact", "EMD solver", choices=registry_choices("deepemd.emd.api", "SOLVERS"))
    center: bool = option(True, "centre each node over its channels before the cosine cost (the authors' code)")

    #: Old keys and what to write instead (a config using one gets this as its error's fix).
    __renamed__ = {
        "grid_enlarge": "write 'grid_ratio' (one name for the Grid cell enlargement in both jobs)",
        "pretrained": "write 'weights' (the backbone's weights); the old 'weights' (cross or uniform) "
        "is now 'node_weights'",
    }


@dataclass
class BatchNormOptions:
    """What training does to BatchNorm (``deepemd.backbones.batchnorm``): every training command
    of both jobs takes these two options."""

    bn: str = option(
        "auto",
        "BatchNorm running statistics: auto (frozen when the backbone starts from "
        "pretrained weights, train when from scratch), frozen (BN layers stay in eval mode) or train",
        choices=("auto", "frozen", "train"),
    )
    bn_affine: str = option("train", "BatchNorm scale and shift: train or frozen", choices=("train", "frozen"))


@dataclass
class LabelSpaceOptions:
    """The label space of the EMD class losses (``deepemd.labels``), for both jobs' classifiers."""

    hierarchy: Optional[str] = option(
        None,
        "label space of the EMD losses: chain (classes in order), names (<group>_<member> class names), "
        "folders (nested class folders of data_root), a CSV 'class,parent[,edge_length]' or CUB table, or a "
        "CIFAR-100 python folder",
    )
    emd_rho: Optional[float] = option(
        None, "exponent rho of relaxed-emd (default 2)", minimum=0.0, exclusive_minimum=True
    )
    ce_weight: Optional[float] = option(None, "weight of cross-entropy in ce+relaxed-emd (default 1)", minimum=0.0)


def class_loss_option(what: str) -> str:
    """A class-loss name option (few-shot ``loss``, retrieval ``label_loss``): cross-entropy or an
    EMD over the label space of :class:`LabelSpaceOptions`."""
    return option(
        "ce",
        f"{what}: ce, or EMD over the label hierarchy: emd (exact), relaxed-emd (edge-wise "
        "|.|^rho, rho 2), ce+relaxed-emd (docs/labels.md)",
        choices=registry_choices("deepemd.labels.losses", "LOSS_NAMES"),
    )


def split_option(default: str) -> str:
    """The ``split`` option: which part of the layout a command reads."""
    return option(
        default,
        "split to read: train / val / test / all (folder layout without split.csv: "
        "first / second half of the sorted classes)",
        choices=("train", "val", "test", "all"),
    )


def out_option(default: str) -> str:
    """The ``out`` option: the folder a command writes."""
    return option(default, "output folder")


__all__ = [
    "BUILTIN_ROOTS",
    "BatchNormOptions",
    "LabelSpaceOptions",
    "class_loss_option",
    "DataOptions",
    "ModelOptions",
    "LocalKindOption",
    "LocalOptions",
    "split_option",
    "out_option",
]
