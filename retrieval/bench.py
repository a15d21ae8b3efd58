"""``deepemd bench pipeline``: the whole ``retrieval eval`` against its floor, stage by stage.

Runs the job's own code path (:func:`deepemd.retrieval.evaluate.run_eval`) on a folder and
reads the per-stage times it records (:mod:`deepemd.timing`), then measures in the same process
the floor of each part:

- features, per local kind: the bare backbone (``torch.no_grad``, default memory layout) over
  random tensors of the same shapes -- the images at the input size for FCN, the crops at the
  patch size for Grid and Sampling -- at its best batch size among 8, 16, 32 and 64;
- rerank, per method: the plain route on the same shortlists -- float32 features, one dense
  torch matmul for the node dots (``pair_dots``), costs, weights and the exact solve of every
  entry;
- the whole floor: the two summed (FAISS and the metrics are a few ms).

``--fcn224`` adds the FCN + pyramid (63 nodes x 1280-d at 224 px) top-100 rerank in queries/s
beside its floor and the share of LPs the pruned rerank skips at k = 10;
``--compare-inference-dtypes N`` alternates whole evals in float32 and bfloat16.
``benchmarks/pipeline_speed.py`` runs the same sections and adds an older commit's eval on the
same folder (``--baseline-commit``) and ``deepemd bench episodes`` (``--fewshot``).

    deepemd bench pipeline [--data-root demo|DIR] [--max-classes 20 --per-class 20] [--fcn224]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time

import numpy as np
import torch

from deepemd import backbones
from deepemd.emd import solve
from deepemd.emd.features import (
    node_norms,
    pair_costs,
    pair_cross_weights,
    pair_dots,
    pair_uniform_weights,
)
from deepemd.timing import recording


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data-root", default="demo", help="demo (bundled Omniglot) or a <root>/<class>/<image> folder")
    ap.add_argument("--split", default="test", help="dataset split the eval runs on")
    ap.add_argument("--max-classes", type=int, default=None, help="use at most this many classes (default: all)")
    ap.add_argument("--per-class", type=int, default=None, help="use at most this many images per class (default: all)")
    ap.add_argument("--image-size", type=int, default=None, help="backbone input size in px (default: the eval's)")
    ap.add_argument("--patch-size", type=int, default=96, help="Grid / Sampling crop size in px")
    ap.add_argument("--methods", nargs="+", default=["fcn", "grid", "sampling"], help="local kinds timed")
    ap.add_argument("--rerank-k", type=int, default=100, help="shortlist length each query reranks")
    ap.add_argument("--rerank-queries", type=int, default=40, help="queries the rerank floors are timed on")
    ap.add_argument("--backbone", default="efficientnet_lite0", help="backbone registry name")
    ap.add_argument(
        "--compare-inference-dtypes",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="only alternate whole evals in float32 and bfloat16 (--inference-dtype) this many times",
    )
    ap.add_argument("--fcn224", action="store_true", help="FCN + pyramid at 224 px top-100 rerank section")
    ap.add_argument("--fcn224-images", type=int, default=300, help="--fcn224: images of the folder used")
    ap.add_argument("--no-eval", action="store_true", help="skip the retrieval eval section")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")


def run(args: argparse.Namespace) -> int:
    """The sections ``args`` asks for, printed as markdown tables; returns the exit status."""
    torch.set_num_threads(args.threads)
    print_uptime()
    if args.compare_inference_dtypes:
        dtype_section(args)
    elif not args.no_eval:
        eval_section(args)
    if args.fcn224:
        fcn224_section(args)
    return 0


def print_uptime() -> None:
    """The machine's load with the tables: on a shared machine it says how far to trust them."""
    print(f"uptime: {subprocess.run(['uptime'], check=False, capture_output=True, text=True).stdout.strip()}")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pipeline", help="the whole retrieval eval beside its floors, stage by stage")
    add_arguments(parser)
    parser.set_defaults(func=run)


def eval_options(args, out: str) -> dict:
    root = args.data_root
    if root == "demo":
        from deepemd.data import demo_root

        root = str(demo_root())
    return {
        "layout": "folder",
        "data_root": root,
        "split": args.split,
        "max_classes": args.max_classes,
        "per_class": args.per_class,
        "image_size": args.image_size,
        "patch_size": args.patch_size,
        "methods": list(args.methods),
        "rerank_k": args.rerank_k,
        "flow_queries": 0,
        "out": out,
        "backbone": args.backbone,
        "weights": "imagenet",
        "seed": 0,
        "batch_size": 32,
    }


def run_current(options: dict) -> tuple[float, dict, list[dict]]:
    """Today's eval in this process: wall seconds, per-stage seconds, result rows."""
    from deepemd.retrieval.config import EvalConfig
    from deepemd.retrieval.evaluate import run_eval

    cfg = EvalConfig(**{**options, "methods": tuple(options["methods"])})
    with recording() as timer:
        start = time.perf_counter()
        result = run_eval(cfg, progress=False)
        wall = time.perf_counter() - start
    return wall, dict(timer.seconds), result["rows"]


@torch.no_grad()
def backbone_floor(name: str, size: int, count: int, batches=(8, 16, 32, 64)) -> tuple[float, int]:
    """Seconds for the plain backbone over ``count`` random ``size`` px inputs at its best batch
    size (one timed batch per size after a warm-up), and that batch size."""
    net = backbones.create(name, pretrained=False, input_size=size).eval()
    best_rate, best_bs = 0.0, batches[0]
    for bs in batches:
        x = torch.randn(bs, 3, size, size)
        net(x)
        start = time.perf_counter()
        net(x)
        rate = bs / (time.perf_counter() - start)
        if rate > best_rate:
            best_rate, best_bs = rate, bs
    return count / best_rate, best_bs


def rerank_floor(glob: np.ndarray, sets: np.ndarray, depth: int, weights: str, queries: int) -> tuple[float, float]:
    """Per query: seconds of the plain cost matmul (+ costs, weights) and of the exact solve of
    every one of its ``depth`` shortlist entries, float32 features already gathered (the
    gather of the shortlist's sets is not timed: the floor is the arithmetic alone), on
    ``queries`` queries."""
    sims = glob @ glob.T
    np.fill_diagonal(sims, -np.inf)
    depth = min(depth, len(glob) - 1)
    picks = np.linspace(0, len(glob) - 1, min(queries, len(glob))).astype(int)
    full = torch.from_numpy(sets).float()
    norms = node_norms(full)
    matmul = solving = 0.0
    warm = False
    for q in np.r_[picks[:1], picks]:  # the first query warms up (allocations, kernel load), untimed
        ids = torch.from_numpy(np.argsort(-sims[q])[:depth].copy())
        cand, cand_norms = full[ids], norms[ids]
        start = time.perf_counter()
        dots = pair_dots(full[q : q + 1], cand)
        cost = pair_costs(dots, norms[q : q + 1], cand_norms)
        if weights == "cross":
            wu, wv = pair_cross_weights(full[q : q + 1], cand, dots=dots)
        else:
            wu, wv = pair_uniform_weights(full[q : q + 1], cand)
        mid = time.perf_counter()
        solve(cost, wu, wv)
        if warm:
            matmul += mid - start
            solving += time.perf_counter() - mid
        warm = True
    return matmul / len(picks), solving / len(picks)


def eval_section(args) -> tuple[float, dict, list[dict]]:
    """The whole eval stage by stage beside its floors; returns (wall s, options, rows)."""
    out = tempfile.mkdtemp(prefix="pipeline-eval-")
    options = eval_options(args, out)
    wall, stages, rows = run_current(options)
    from deepemd.retrieval.build import dataset_images, local_specs, make_embedder
    from deepemd.retrieval.config import EvalConfig

    cfg = EvalConfig(**{**options, "methods": tuple(options["methods"])})
    n = len(dataset_images(cfg))
    model = make_embedder(cfg, local_specs(cfg, [m.split(":")[0] for m in args.methods]))
    size = model.info.image_size
    patch = args.patch_size or size
    print(
        f"## retrieval eval: {n} images, {size} px, crops {patch} px, methods {' '.join(args.methods)}, "
        f"rerank depth {args.rerank_k}; torch threads {torch.get_num_threads()}; load {os.getloadavg()[0]:.1f}"
    )
    floors = {"fcn": backbone_floor(args.backbone, size, n)}
    for kind in ("grid", "sampling"):
        if any(m.split(":")[0] == kind for m in args.methods):
            floors[kind] = backbone_floor(args.backbone, patch, n * model.num_nodes(kind))
    print("\n| features | ours s | floor s (best batch) | ours / floor | images/s |\n|---|---|---|---|---|")
    decode = stages.get("decode + transform", 0.0)
    ours_kind = {"fcn": stages.get("backbone: image maps", 0.0) + stages.get("fcn: pyramid", 0.0)}
    for kind in ("grid", "sampling"):
        if kind in floors:
            ours_kind[kind] = stages.get(f"crops: {kind}", 0.0) + stages.get(f"backbone: {kind} crops", 0.0)
    for kind, (floor, bs) in floors.items():
        print(
            # three significant digits: a small folder's floor on a fast minute is tens of ms
            f"| {kind} | {ours_kind[kind]:.3g} | {floor:.3g} (batch {bs}) | {ours_kind[kind] / floor:.2f} | "
            f"{n / ours_kind[kind]:.1f} |"
        )
    feat_ours, feat_floor = sum(ours_kind.values()) + decode, sum(f for f, _ in floors.values())
    print(
        f"| all + decode/transform {decode:.3g} s | {feat_ours:.3g} | {feat_floor:.3g} | "
        f"{feat_ours / feat_floor:.2f} | {n / feat_ours:.1f} |"
    )
    # the rerank floor on the same sets (re-extracted: run_eval keeps them inside)
    from deepemd.retrieval.build import make_loader
    from deepemd.retrieval.model import embed_loader

    images = dataset_images(cfg)
    glob, sets, _ = embed_loader(model, make_loader(images, model, 32, 0), torch.device("cpu"), progress=False)
    print(
        "\n| rerank | ours queries/s | floor: matmul ms + solve ms per query | floor queries/s | "
        "ours / floor (time) |\n|---|---|---|---|---|"
    )
    rerank_floor_total = 0.0
    for row, method in zip(rows[1:], args.methods):
        kind, _, weights = method.partition(":")
        mm, sv = rerank_floor(glob, sets[kind], args.rerank_k, weights or "cross", args.rerank_queries)
        rerank_floor_total += n * (mm + sv)
        qps = row["queries/s"]
        print(
            f"| {row['method']} ({sets[kind].shape[1]} nodes) | {qps:.1f} | {1e3 * mm:.1f} + {1e3 * sv:.1f} | "
            f"{1 / (mm + sv):.1f} | {(1 / qps) / (mm + sv):.2f} |"
        )
    print("\n| stage (ours, whole run) | seconds |\n|---|---|")
    for name, secs in stages.items():
        print(f"| {name} | {secs:.2f} |")
    whole_floor = feat_floor + rerank_floor_total
    print(
        f"\nwhole eval: ours {wall:.1f} s, floor {whole_floor:.1f} s (features {feat_floor:.1f} + rerank "
        f"{rerank_floor_total:.1f}): ours / floor = {wall / whole_floor:.2f}"
    )
    print(f"load average after: {os.getloadavg()}")
    return wall, options, rows


def dtype_section(args) -> None:
    """The whole eval in float32 and with ``--inference-dtype bfloat16``, alternated
    ``--compare-inference-dtypes`` times: the best wall time of each and every metric side by
    side (bfloat16 changes the features, so its accuracy is part of the answer)."""
    out = tempfile.mkdtemp(prefix="pipeline-dtype-")
    options = eval_options(args, out)
    walls: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    rows: dict[str, list[dict]] = {}
    for _ in range(args.compare_inference_dtypes):
        for dtype in walls:
            wall, _, rows[dtype] = run_current({**options, "inference_dtype": dtype})
            walls[dtype].append(wall)
            print(f"round: {dtype} {wall:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    f32, b16 = min(walls["float32"]), min(walls["bfloat16"])
    print(f"\n## Whole eval, float32 vs bfloat16 inference (best of {args.compare_inference_dtypes} alternated runs)")
    print(f"float32 {f32:.1f} s, bfloat16 {b16:.1f} s: speed-up {f32 / b16:.2f}x\n")
    print("| method | P@1 float32 | P@1 bfloat16 | MAP@R float32 | MAP@R bfloat16 |\n|---|---|---|---|---|")
    for a, b in zip(rows["float32"], rows["bfloat16"]):
        print(f"| {a['method']} | {a['P@1']:.2f} | {b['P@1']:.2f} | {a['MAP@R']:.2f} | {b['MAP@R']:.2f} |")


def fcn224_section(args) -> None:
    """FCN + pyramid at 224 px (63 x 1280), top-100: ours (k = 100 and pruned k = 10) vs floor."""
    from deepemd.eval.shortlist import Shortlist
    from deepemd.retrieval.build import (
        dataset_images,
        local_specs,
        make_embedder,
        make_loader,
    )
    from deepemd.retrieval.config import EvalConfig
    from deepemd.retrieval.model import embed_loader
    from deepemd.retrieval.rerank import Reranker

    options = eval_options(args, tempfile.mkdtemp())
    cfg = EvalConfig(**{**options, "methods": ("fcn",), "image_size": 224, "max_classes": None, "per_class": None})
    images = dataset_images(cfg)
    images = images.subset(np.linspace(0, len(images) - 1, min(len(images), args.fcn224_images)).astype(int))
    model = make_embedder(cfg, local_specs(cfg, ["fcn"]))
    glob, sets, _ = embed_loader(model, make_loader(images, model, 32, 0), torch.device("cpu"), progress=False)
    sets = sets["fcn"]
    sims = glob @ glob.T
    np.fill_diagonal(sims, -np.inf)
    depth = min(100, len(glob) - 1)
    queries = np.linspace(0, len(glob) - 1, min(args.rerank_queries, len(glob))).astype(int)
    order = np.argsort(-sims[queries], axis=1, kind="stable")[:, :depth]
    shortlist = Shortlist(order, np.take_along_axis(sims[queries], order, 1))
    query_sets = sets[queries]
    result = {}
    pyramid = tuple(cfg.pyramid)  # as the eval reranks its FCN sets
    Reranker(sets, k=10, pyramid=pyramid).rerank(query_sets[:2], Shortlist(order[:2], shortlist.scores[:2]))  # warm-up
    parts = {}
    for k in (depth, 10):
        reranker = Reranker(sets, k=k, pyramid=pyramid)
        with recording() as timer:
            start = time.perf_counter()
            reranker.rerank(query_sets, shortlist)
            result[k] = (len(queries) / (time.perf_counter() - start), reranker.stats.skipped_fraction)
        parts[k] = ", ".join(
            f"{name.split(': ')[1]} {1e3 * timer.get(name) / len(queries):.1f}"
            for name in ("rerank: node dots", "rerank: costs + weights", "rerank: bounds", "rerank: solve")
        )
    mm, sv = rerank_floor(glob, sets, depth, "cross", len(queries))
    print(
        f"\n## FCN + pyramid at 224 px: {sets.shape[1]} nodes x {sets.shape[2]}-d, top-{depth}, "
        f"{len(queries)} queries over {len(glob)} images; load {os.getloadavg()[0]:.1f}"
    )
    print("| rerank | queries/s | LPs skipped | ms per query |\n|---|---|---|---|")
    print(f"| ours, full top-{depth} order | {result[depth][0]:.1f} | {100 * result[depth][1]:.0f}% | {parts[depth]} |")
    print(f"| ours, exact top-10 (pruned) | {result[10][0]:.1f} | {100 * result[10][1]:.0f}% | {parts[10]} |")
    print(
        f"| floor: dense torch matmul + solve of all {depth} | {1 / (mm + sv):.1f} | 0% | "
        f"matmul {1e3 * mm:.1f}, solve {1e3 * sv:.1f} |"
    )


__all__ = [
    "add_arguments",
    "dtype_section",
    "eval_options",
    "eval_section",
    "fcn224_section",
    "print_uptime",
    "register",
    "run",
    "run_current",
]
