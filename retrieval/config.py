"""Options of every `deepemd retrieval` command, one dataclass each.

Every field is also a command-line flag (``--field-name``) and a YAML key (``--config``); an
unknown key is an error (``deepemd.config``). The groups shared with the few-shot job live in
``deepemd.options``; this module adds the retrieval options and the paper 5.8 defaults
(FCN feature pyramid {3,2,1}, Grid image pyramid {3,2}, 25 Sampling patches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from deepemd.config import option, registry_choices, same_option
from deepemd.options import (
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
class RetrievalModelOptions(ModelOptions):
    """The shared network options plus the paper's linear embedding head and trained checkpoints."""

    checkpoint: Optional[str] = option(
        None, "a `deepemd retrieval train` checkpoint (rebuilds its backbone; overrides --backbone)"
    )
    embed_dim: Optional[int] = option(
        None, "1x1 linear head to this many channels (paper: 128); none = backbone channels", minimum=1
    )


@dataclass
class RetrievalLocalOptions(LocalOptions):
    """Local sets and scoring with the retrieval defaults, plus the rerank depth and fusion."""

    pyramid: tuple[int, ...] = same_option(LocalOptions, "pyramid", (3, 2, 1))
    grid_levels: tuple[int, ...] = same_option(LocalOptions, "grid_levels", (3, 2))
    grid_ratio: float = same_option(LocalOptions, "grid_ratio", 1.0)
    num_patches: int = same_option(LocalOptions, "num_patches", 25)
    patch_size: Optional[int] = same_option(LocalOptions, "patch_size", 96)
    center: bool = same_option(LocalOptions, "center", False)
    rerank_k: int = option(100, "rerank depth K: the FAISS top-K rescored with DeepEMD", minimum=1)
    alpha: float = option(0.0, "fused score = (1 - alpha) * DeepEMD + alpha * global cosine", minimum=0.0, maximum=1.0)


@dataclass
class RetrievalDataOptions(DataOptions):
    split: str = split_option("test")


@dataclass
class EvalConfig(RetrievalModelOptions, RetrievalLocalOptions, RetrievalDataOptions):
    """`deepemd retrieval eval`: leave-one-out P@1 / RP / MAP@R, raw vs +DeepEMD."""

    methods: tuple[str, ...] = option(
        ("fcn", "grid", "sampling"),
        "rows after 'raw': local kinds (append :uniform or :cross to override the node weights)",
        choices=registry_choices("deepemd.local", "KINDS"),
    )
    flow_queries: int = option(3, "queries drawn in flows.png (0: no picture)", minimum=0)
    hierarchy: Optional[str] = same_option(LabelSpaceOptions, "hierarchy", None)
    out: str = out_option("runs/retrieval-eval")


@dataclass
class TrainConfig(LabelSpaceOptions, BatchNormOptions, RetrievalModelOptions, RetrievalDataOptions):
    """`deepemd retrieval train`: a pml loss on the train classes, checkpoint every epoch."""

    backbone: str = same_option(ModelOptions, "backbone", "resnet50")
    weights: str = same_option(ModelOptions, "weights", "auto")
    embed_dim: Optional[int] = same_option(RetrievalModelOptions, "embed_dim", 128)
    split: str = split_option("train")
    loss: str = option(
        "normsoftmax", "pytorch-metric-learning loss", choices=registry_choices("deepemd.retrieval.losses", "LOSSES")
    )
    distance: str = option(
        "cosine",
        "cosine (global vector) or deepemd (FCN local sets through the EMD layer; pair losses)",
        choices=("cosine", "deepemd"),
    )
    pyramid: tuple[int, ...] = same_option(LocalOptions, "pyramid", ())
    node_weights: str = same_option(LocalOptions, "node_weights", "cross")
    solver: str = same_option(LocalOptions, "solver", "exact")
    m_per_class: int = option(4, "images per class in every batch (pml MPerClassSampler)", minimum=1)
    epochs: int = option(10, "training epochs (a checkpoint after each)", minimum=0)
    steps_per_epoch: Optional[int] = option(None, "batches per epoch (default: images / global batch)", minimum=1)
    lr: float = option(1e-5, "backbone + head learning rate (Adam)", minimum=0.0)
    loss_lr: float = option(1e-3, "learning rate of the loss's own parameters (proxy losses)", minimum=0.0)
    weight_decay: float = option(1e-4, "Adam weight decay", minimum=0.0)
    augment: bool = option(True, "random resized crops + flips while training")
    out: str = out_option("runs/retrieval-train")
    resume: bool = option(True, "continue from <out>/checkpoint.pt when it exists")
    label_loss: str = class_loss_option("normsoftmax's loss on its proxy logits")


@dataclass
class IndexConfig(RetrievalModelOptions, RetrievalLocalOptions, LocalKindOption, RetrievalDataOptions):
    """`deepemd retrieval index`: FAISS index of global vectors + aligned local-feature store.

    With ``index`` + ``id_map`` (a user's own FAISS index and the image behind each id) only the
    local-feature store is built, for those images."""

    split: str = split_option("all")
    index_spec: str = option("Flat", "FAISS index_factory string: Flat, IVF256,Flat, IVF1024,PQ32, HNSW32")
    index: Optional[str] = option(None, "your own FAISS index file (built outside deepemd) to rerank")
    id_map: Optional[str] = option(
        None, "text file '<id> <image path>' per line, naming the image behind each id of --index"
    )
    repair: bool = option(
        False,
        "re-embed the images whose rows in the existing gallery fail their checksum "
        "(without it a damaged gallery is an error)",
    )
    store_dtype: str = option(
        "float16",
        "local-feature store values: float16 (scaled per set, half the disk) or float32",
        choices=("float16", "float32"),
    )
    out: str = out_option("runs/retrieval-gallery")


@dataclass
class SearchConfig(RetrievalModelOptions, RetrievalLocalOptions, LocalKindOption):
    """`deepemd retrieval search`: FAISS top-K for query images, reranked by DeepEMD."""

    gallery: str = option("runs/retrieval-gallery", "gallery folder written by `deepemd retrieval index`")
    index: Optional[str] = option(None, "your own FAISS index file (built outside deepemd) to rerank")
    id_map: Optional[str] = option(
        None, "text file '<id> <image path>' per line, naming the image behind each id of --index"
    )
    queries: Optional[str] = option(None, "query image, folder of images, or text file of paths")
    query_vectors: Optional[str] = option(
        None, ".npy of query vectors from the model that built --index (one row per query)"
    )
    top: int = option(10, "results written per query", minimum=1)
    skip_bad: bool = same_option(DataOptions, "skip_bad", False)  # here it applies to the query images
    out: str = out_option("runs/retrieval-search")


@dataclass
class DemoConfig:
    """`deepemd demo`: the bundled set, pretrained efficientnet_lite0, raw vs +DeepEMD."""

    out: str = out_option("demo-out")
    max_classes: int = same_option(DataOptions, "max_classes", 40)
    per_class: int = same_option(DataOptions, "per_class", 20)
    image_size: int = same_option(ModelOptions, "image_size", 96)
    methods: tuple[str, ...] = same_option(EvalConfig, "methods", ("fcn",))
    rerank_k: int = same_option(RetrievalLocalOptions, "rerank_k", 20)
    seed: int = same_option(ModelOptions, "seed", 0)
