"""Options of every `deepemd retrieval` command, one dataclass each.

Every field is also a command-line flag (``--field-name``) and a YAML key (``--config``); an
unknown key is an error (``deepemd.config``). Shared groups are plain base classes so that a
flag means the same thing in every command.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

LOSSES = ("normsoftmax", "contrastive", "softtriple", "arcface", "multisimilarity", "snr")
LOCAL_KINDS = ("fcn", "grid", "sampling")


@dataclass
class ModelOptions:
    """Which network turns images into a global vector and a local set."""

    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    checkpoint: Optional[str] = None
    embed_dim: Optional[int] = None
    image_size: Optional[int] = None
    device: Optional[str] = None
    batch_size: int = 32
    workers: int = 0
    seed: int = 0


@dataclass
class LocalOptions:
    """How local sets are cut (paper 4.4) and scored (paper 4.2-4.3)."""

    pyramid: tuple[int, ...] = (3, 2, 1)
    grid_levels: tuple[int, ...] = (3, 2)
    grid_enlarge: float = 1.0
    num_patches: int = 25
    patch_size: Optional[int] = 96
    node_weights: str = "cross"
    solver: str = "exact"
    rerank_k: int = 100
    alpha: float = 0.0


@dataclass
class DataOptions:
    layout: str = "folder"
    data_root: Optional[str] = None
    split: str = "test"
    max_classes: Optional[int] = None
    per_class: Optional[int] = None
    skip_bad: bool = False


@dataclass
class EvalConfig(ModelOptions, LocalOptions, DataOptions):
    """`deepemd retrieval eval`: leave-one-out P@1 / RP / MAP@R, raw vs +DeepEMD."""

    methods: tuple[str, ...] = ("fcn", "grid", "sampling")
    flow_queries: int = 3
    out: str = "runs/retrieval-eval"


@dataclass
class TrainConfig(ModelOptions, DataOptions):
    """`deepemd retrieval train`: a pml loss on the train classes, checkpoint every epoch."""

    backbone: str = "resnet50"
    weights: str = "auto"
    embed_dim: Optional[int] = 128
    split: str = "train"
    loss: str = "normsoftmax"
    distance: str = "cosine"
    pyramid: tuple[int, ...] = ()
    node_weights: str = "cross"
    solver: str = "exact"
    m_per_class: int = 4
    epochs: int = 10
    steps_per_epoch: Optional[int] = None
    lr: float = 1e-5
    loss_lr: float = 1e-3
    weight_decay: float = 1e-4
    augment: bool = True
    out: str = "runs/retrieval-train"
    resume: bool = True


@dataclass
class IndexConfig(ModelOptions, LocalOptions, DataOptions):
    """`deepemd retrieval index`: FAISS index of global vectors + aligned local-feature store.

    With ``index`` + ``id_map`` (a user's own FAISS index and the image behind each id) only the
    local-feature store is built, for those images."""

    split: str = "all"
    local: str = "fcn"
    index_spec: str = "Flat"
    index: Optional[str] = None
    id_map: Optional[str] = None
    out: str = "runs/retrieval-gallery"


@dataclass
class SearchConfig(ModelOptions, LocalOptions):
    """`deepemd retrieval search`: FAISS top-K for query images, reranked by DeepEMD."""

    gallery: str = "runs/retrieval-gallery"
    local: str = "fcn"
    index: Optional[str] = None
    id_map: Optional[str] = None
    queries: Optional[str] = None
    query_vectors: Optional[str] = None
    top: int = 10
    out: str = "runs/retrieval-search"


@dataclass
class DemoConfig:
    """`deepemd demo`: the bundled set, pretrained efficientnet_lite0, raw vs +DeepEMD."""

    out: str = "demo-out"
    max_classes: int = 40
    per_class: int = 20
    image_size: int = 96
    methods: tuple[str, ...] = ("fcn",)
    rerank_k: int = 20
    seed: int = 0


FIELD_DOCS = {
    "backbone": "feature network: efficientnet_lite0, mobilenetv2, resnet12, resnet18, resnet50",
    "weights": "imagenet (packaged), none (random), auto (imagenet where packaged), or a weights file",
    "checkpoint": "a `deepemd retrieval train` checkpoint (rebuilds its backbone; overrides --backbone)",
    "embed_dim": "1x1 linear head to this many channels (paper: 128); none = backbone channels",
    "image_size": "input size in pixels",
    "device": "cpu, cuda, cuda:1 (default: cuda if available)",
    "batch_size": "images per batch (per process under torchrun)",
    "workers": "DataLoader worker processes",
    "seed": "seed for subsampling, random patches, batch order and augmentation",
    "layout": "folder, cub-retrieval, cub, miniimagenet, tieredimagenet, cifarfs, fc100",
    "data_root": "dataset root (folder layout: <root>/<class>/<image>)",
    "split": "train / test / all (folder layout: first / second half of the sorted classes)",
    "max_classes": "use at most this many classes (random, seeded)",
    "per_class": "use at most this many images per class (random, seeded)",
    "skip_bad": "skip unreadable, truncated or oversized images (counted in a warning) instead of stopping",
    "pyramid": "FCN feature pyramid levels added to the raw cells (paper: 3 2 1)",
    "grid_levels": "Grid image pyramid levels (paper: 3 2)",
    "grid_enlarge": "Grid: enlarge each cell by this ratio around its centre",
    "num_patches": "Sampling: random patches per image (paper: 25)",
    "patch_size": "Grid/Sampling: crop size fed to the backbone; 96 keeps 13-25 crops per image affordable "
    "on a CPU (the paper feeds each crop at the full input size: give 224 / 227 for that; none = input size)",
    "node_weights": "cross (cross-reference, paper Eq. 11-12) or uniform",
    "solver": "EMD solver: exact, sinkhorn, opencv, qpth",
    "rerank_k": "rerank depth K: the FAISS top-K rescored with DeepEMD",
    "alpha": "fused score = (1 - alpha) * DeepEMD + alpha * global cosine",
    "methods": "rows after 'raw': fcn, grid, sampling (append :uniform or :cross to override weights)",
    "flow_queries": "queries drawn in flows.png (0: no picture)",
    "out": "output folder",
    "loss": "normsoftmax, contrastive, softtriple, arcface, multisimilarity, snr",
    "distance": "cosine (global vector) or deepemd (FCN local sets through the EMD layer; pair losses)",
    "m_per_class": "images per class in every batch (pml MPerClassSampler)",
    "epochs": "training epochs (a checkpoint after each)",
    "steps_per_epoch": "batches per epoch (default: images / global batch)",
    "lr": "backbone + head learning rate (Adam)",
    "loss_lr": "learning rate of the loss's own parameters (proxy losses)",
    "weight_decay": "Adam weight decay",
    "augment": "random resized crops + flips while training",
    "resume": "continue from <out>/checkpoint.pt when it exists",
    "local": "local set kind stored in the gallery: fcn, grid or sampling",
    "index_spec": "FAISS index_factory string: Flat, IVF256,Flat, IVF1024,PQ32, HNSW32",
    "index": "your own FAISS index file (built outside deepemd) to rerank",
    "id_map": "text file '<id> <image path>' per line, naming the image behind each id of --index",
    "gallery": "gallery folder written by `deepemd retrieval index`",
    "queries": "query image, folder of images, or text file of paths",
    "query_vectors": ".npy of query vectors from the model that built --index (one row per query)",
    "top": "results written per query",
}
for _cls in (EvalConfig, TrainConfig, IndexConfig, SearchConfig, DemoConfig):
    _cls.__field_docs__ = FIELD_DOCS
