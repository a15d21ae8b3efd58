"""`deepemd retrieval train | index | search | eval` and `deepemd demo`.

Every option of a command is a field of its dataclass in ``retrieval/config.py``: settable as a
flag or in the YAML given to ``--config`` (flags win); unknown YAML keys are errors.
"""

from __future__ import annotations

import argparse
import time

from deepemd.config import add_command
from deepemd.retrieval.config import DemoConfig, EvalConfig, IndexConfig, SearchConfig, TrainConfig


def _print_table(frame, notes=()) -> None:
    from deepemd.eval.tables import to_markdown

    print(to_markdown(frame))
    for note in notes:
        print(f"- {note}")


def cmd_train(cfg: TrainConfig) -> int:
    from deepemd.retrieval.train import train

    result = train(cfg)
    if result["rank"] == 0:
        print(f"checkpoint: {result['checkpoint']}")
    return 0


def cmd_index(cfg: IndexConfig) -> int:
    from deepemd.retrieval.search import run_index

    result = run_index(cfg)
    gallery = result["gallery"]
    print(
        f"gallery: {result['out']} ({gallery.index.ntotal} images, local sets {gallery.store.m} x {gallery.store.d}; "
        f"{result['embedded']} embedded, {result['reused']} reused from the previous gallery)"
    )
    return 0


def cmd_search(cfg: SearchConfig) -> int:
    from deepemd.retrieval.search import run_search

    result = run_search(cfg)
    _print_table(result["frame"])
    print(f"written: {cfg.out}/search.csv, search.md")
    return 0


def cmd_eval(cfg: EvalConfig) -> int:
    from deepemd.retrieval.evaluate import run_eval

    result = run_eval(cfg)
    _print_table(result["frame"], result["notes"])
    print(
        f"written: {result['out']}/results.csv, results.md" + (f", {result['figure'].name}" if result["figure"] else "")
    )
    return 0


def demo_eval_config(cfg: DemoConfig) -> EvalConfig:
    """The demo is `retrieval eval` on the bundled Omniglot set with settings picked so the run
    stays short on 2 CPU cores and the rerank's effect shows."""
    from deepemd.data import demo_root

    return EvalConfig(
        layout="folder",
        data_root=str(demo_root()),
        split="test",
        backbone="efficientnet_lite0",
        weights="imagenet",
        image_size=cfg.image_size,
        methods=tuple(cfg.methods),
        rerank_k=cfg.rerank_k,
        max_classes=cfg.max_classes,
        per_class=cfg.per_class,
        seed=cfg.seed,
        flow_queries=3,
        out=cfg.out,
    )


def cmd_demo(cfg: DemoConfig) -> int:
    from deepemd.retrieval.evaluate import run_eval

    start = time.perf_counter()
    ecfg = demo_eval_config(cfg)
    print(
        f"deepemd demo: Omniglot (bundled), {cfg.max_classes} held-out classes x {cfg.per_class} drawings, "
        f"efficientnet_lite0 ImageNet weights at {cfg.image_size} px, rerank top-{cfg.rerank_k}",
        flush=True,
    )
    result = run_eval(ecfg)
    _print_table(result["frame"], result["notes"])
    print(
        f"written: {result['out']}/results.csv, results.md, {result['figure'].name} "
        f"({time.perf_counter() - start:.0f} s)"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    retrieval = subparsers.add_parser("retrieval", help="train, index, search and evaluate image retrieval")
    sub = retrieval.add_subparsers(dest="retrieval_command", required=True, metavar="{train,index,search,eval}")
    add_command(sub, "train", TrainConfig, cmd_train, "train an embedding with a pytorch-metric-learning loss")
    add_command(
        sub, "index", IndexConfig, cmd_index, "build a FAISS index + local-feature store (or a store for your index)"
    )
    add_command(sub, "search", SearchConfig, cmd_search, "search a gallery, rerank the shortlist with DeepEMD")
    add_command(sub, "eval", EvalConfig, cmd_eval, "leave-one-out P@1 / RP / MAP@R, raw vs +DeepEMD")


def register_demo(subparsers: argparse._SubParsersAction) -> None:
    add_command(
        subparsers,
        "demo",
        DemoConfig,
        cmd_demo,
        "retrieval on the bundled demo set: raw vs +DeepEMD table and a flow picture",
    )


__all__ = ["register", "register_demo", "demo_eval_config"]
