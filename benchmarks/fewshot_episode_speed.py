"""Seconds per few-shot TRAINING episode spent in the EMD layer: exact (ours) vs qpth (paper).

One 5-way 1-shot episode with 15 queries per class and 5x5 maps (25 nodes, 640-d as ResNet-12):
75 x 5 = 375 EMD problems, forward + backward of the cross-entropy over the temperature-12.5
EMD logits (cross-reference weights, centred cosine cost), exactly what ``deepemd fewshot train``
runs per step besides the backbone (``deepemd.emd.pairwise_similarity`` as
``fewshot/metatrain.py`` calls it, the solver being the only difference). The same random features go to every solver.

qpth solves one problem per call on the CPU (a batch of 2 at 625 variables fails with 2 torch
threads and gains nothing with 1, see docs/emd.md), so
a full episode takes minutes: by default it is timed on ``--qpth-pairs`` pairs and extrapolated
linearly to 375 (the loop is per pair, so time is linear in pairs); ``--qpth-pairs 375`` times
it all. Also printed: the gradient agreement of the two solvers on those pairs, and forward-only
references (cv2.EMD loop, as the authors' test time; Sinkhorn). Paper Table 6 (GPU, 10 queries):
qpth 8.6 s, OpenCV 0.018 s forward.

The second table (``--test-path``) times TEST episodes through the real ``deepemd fewshot test``
code (``deepemd.fewshot.evaluate.run_methods`` on the job's own cached features of
``--data-root``, every default method on the same seeded episodes) and, in the same run, the
EMD work alone on those episodes (the floor: one ``pairwise_similarity`` per episode, queries
against supports, features already gathered), printing ms and episodes/s per method, for the
whole episode, and the ratio to the floor. ``--old`` also runs the pre-batching per-episode
methods (tests/fewshot_reference.py) on the first ``--old-episodes`` episodes.
:func:`test_path_timing` and :func:`emd_floor` are importable (benchmarks/pipeline_speed.py).

    python benchmarks/fewshot_episode_speed.py [--repeats 5] [--qpth-pairs 10] [--dim 640]
    python benchmarks/fewshot_episode_speed.py --test-path --data-root demo --episodes 200 \
        [--feature-cache DIR] [--old] [--no-layer]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from deepemd.data.cache import cache_dir
from deepemd.emd import pairwise_similarity
from deepemd.eval.tables import to_markdown

REPO = Path(__file__).resolve().parents[1]


def episode(way: int, query: int, nodes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-negative (post-ReLU-like) features, so cross-reference weights are informative."""
    gen = torch.Generator().manual_seed(seed)
    support = torch.randn(way, nodes, dim, generator=gen).relu()
    queries = (support.repeat_interleave(query, 0) + torch.randn(way * query, nodes, dim, generator=gen)).relu()
    labels = torch.arange(way).repeat_interleave(query)
    return queries, support, labels


def step(
    queries: torch.Tensor, support: torch.Tensor, labels: torch.Tensor, solver: str, grad: bool = True
) -> tuple[float, torch.Tensor | None]:
    """Seconds for logits + loss (+ backward); returns the query gradient when ``grad``."""
    q = queries.clone().requires_grad_(grad)
    s = support.clone().requires_grad_(grad)
    start = time.perf_counter()
    with torch.set_grad_enabled(grad):
        logits = pairwise_similarity(q, s, solver=solver, temperature=12.5, center=True)
        loss = F.cross_entropy(logits, labels, reduction="sum")
        if grad:
            loss.backward()
    return time.perf_counter() - start, (q.grad if grad else None)


def best_of(repeats: int, fn) -> float:
    return min(fn() for _ in range(repeats))


def test_cache(cfg):
    """The features ``deepemd fewshot test`` would use for ``cfg`` (its own cache and key):
    extracted once into ``cfg.feature_cache``, loaded from there afterwards."""
    from deepemd.device import default_device
    from deepemd.fewshot import build
    from deepemd.fewshot.evaluate import test_features

    device = default_device(cfg.device)
    images = build.read_split(cfg, cfg.split)
    net = build.create_backbone(cfg, cfg.checkpoint).to(device)
    extractor = build.create_extractor(cfg, net).to(device)
    return test_features(cfg, images, net, extractor, device, progress=False)


def test_path_timing(cfg, cache) -> tuple[float, dict[str, float], dict[str, np.ndarray]]:
    """``(wall seconds, seconds per method, per-episode accuracies)`` of the real test path
    (``run_methods``: every selected method on ``cfg``'s seeded episodes over ``cache``)."""
    from deepemd.fewshot.evaluate import run_methods

    start = time.perf_counter()
    rows, accs = run_methods(cfg, cache, progress=False)
    return time.perf_counter() - start, {r["method"]: float(r["seconds"]) for r in rows}, accs


def emd_floor(cfg, cache) -> float:
    """Seconds of the EMD work alone on ``cfg``'s episodes: one ``pairwise_similarity`` per
    episode (queries against supports, the features already gathered, only the call timed)."""
    from deepemd.fewshot.episodes import episode_indices

    n_support = cfg.way * cfg.shot
    total = 0.0
    for idx in episode_indices(cache.labels, cfg.way, cfg.shot, cfg.query, cfg.num_episodes(), cfg.seed):
        idx_t = torch.from_numpy(idx)
        queries, support = cache.local[idx_t[n_support:]], cache.local[idx_t[:n_support]]
        start = time.perf_counter()
        pairwise_similarity(
            queries,
            support,
            weights=cfg.node_weights,
            solver=cfg.solver,
            temperature=cfg.temperature,
            center=cfg.center,
        )
        total += time.perf_counter() - start
    return total


def old_path_timing(cfg, cache, episodes: int) -> float:
    """Seconds per episode of the per-episode methods the batched ones replaced (the test
    oracle in tests/fewshot_reference.py), all default methods, on the first ``episodes``."""
    from deepemd.fewshot.episodes import episode_indices, make_episode
    from deepemd.fewshot.evaluate import method_options
    from deepemd.fewshot.methods import select

    spec = importlib.util.spec_from_file_location("fewshot_reference", REPO / "tests" / "fewshot_reference.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    opts, keys = method_options(cfg), select(cfg.methods, cfg.shot)
    start = time.perf_counter()
    for idx in episode_indices(cache.labels, cfg.way, cfg.shot, cfg.query, episodes, cfg.seed):
        ep = make_episode(cache, idx, cfg.way, cfg.shot)
        for key in keys:
            reference.REFERENCE[key](ep, opts)
    return (time.perf_counter() - start) / episodes


def test_path_table(args) -> None:
    """The test path's table: each method, the whole episode, the floor (and the old code)."""
    from deepemd.fewshot.config import EvalConfig

    cfg = EvalConfig(
        data_root=args.data_root,
        backbone=args.backbone,
        way=args.way,
        shot=args.shot,
        query=args.query,
        episodes=args.episodes,
        feature_cache=args.feature_cache,
        out="/tmp/unused",
        flow_picture=False,
    )
    cache = test_cache(cfg)
    test_path_timing(dataclasses.replace(cfg, episodes=2), cache)  # kernels compiled, first-touch of the cache pages
    cpu = time.process_time()
    wall, per_method, _ = test_path_timing(cfg, cache)
    cpu_whole, cpu = time.process_time() - cpu, time.process_time()
    floor = emd_floor(cfg, cache)
    cpu_floor = time.process_time() - cpu
    n = cfg.num_episodes()
    rows = [
        {
            "method": name,
            "ms / episode": 1e3 * sec / n,
            "episodes/s": n / sec if sec else float("inf"),
            "x the EMD work alone": sec / floor,
        }
        for name, sec in per_method.items()
    ]
    # CPU seconds (all threads) beside the wall time: on a shared machine wall time mostly
    # measures the other jobs; CPU time is what the work itself costs.
    rows.append(
        {
            "method": "whole episode (all methods, sampling included)",
            "ms / episode": 1e3 * wall / n,
            "episodes/s": n / wall,
            "x the EMD work alone": wall / floor,
            "CPU ms / episode": 1e3 * cpu_whole / n,
        }
    )
    rows.append(
        {
            "method": "floor: pairwise_similarity per episode",
            "ms / episode": 1e3 * floor / n,
            "episodes/s": n / floor,
            "x the EMD work alone": 1.0,
            "CPU ms / episode": 1e3 * cpu_floor / n,
        }
    )
    if args.old:
        old = old_path_timing(cfg, cache, min(args.old_episodes, n))
        rows.append(
            {
                "method": f"old per-episode code ({min(args.old_episodes, n)} episodes)",
                "ms / episode": 1e3 * old,
                "episodes/s": 1 / old,
                "x the EMD work alone": old * n / floor,
            }
        )
    print(
        f"\n`fewshot test` path: {cfg.way}-way {cfg.shot}-shot, {cfg.query} queries/class, {n} episodes, "
        f"{args.data_root} ({len(cache.labels)} images, local sets {tuple(cache.local.shape[1:])}), "
        f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}"
    )
    print(to_markdown(pd.DataFrame(rows).astype(object).fillna(""), "%.4g"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--nodes", type=int, default=25)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--qpth-pairs", type=int, default=10, help="pairs timed with qpth (375 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-path", action="store_true", help="also time the `fewshot test` path vs its EMD floor")
    parser.add_argument("--no-layer", action="store_true", help="skip the training-layer table (exact vs qpth)")
    parser.add_argument("--data-root", default="demo", help="test path: demo, fashion-mnist or a folder")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--shot", type=int, default=1, help="test path shots (the layer table is 1-shot)")
    parser.add_argument("--episodes", type=int, default=200, help="test path episodes")
    parser.add_argument(
        "--feature-cache",
        default=str(cache_dir() / "fewshot-features"),
        help="test path: where the extracted features are kept between runs",
    )
    parser.add_argument("--old", action="store_true", help="test path: also time the pre-batching per-episode code")
    parser.add_argument("--old-episodes", type=int, default=20)
    args = parser.parse_args()
    if not args.no_layer:
        layer_table(args)
    if args.test_path:
        test_path_table(args)


def layer_table(args) -> None:
    """The training episode's EMD layer: exact vs qpth (fwd+bwd), Sinkhorn, cv2.EMD (fwd)."""
    queries, support, labels = episode(args.way, args.query, args.nodes, args.dim, args.seed)
    pairs = queries.shape[0] * support.shape[0]
    step(queries[:2], support, labels[:2], "exact")  # compile / warm up
    exact = best_of(args.repeats, lambda: step(queries, support, labels, "exact")[0])

    # qpth on the first k pairs: k_q queries against all supports (k_q * way pairs)
    k_q = max(1, min(queries.shape[0], -(-args.qpth_pairs // support.shape[0])))
    k_pairs = k_q * support.shape[0]
    qpth_part, g_qpth = step(queries[:k_q], support, labels[:k_q], "qpth")
    qpth_full = qpth_part * pairs / k_pairs
    exact_part, g_exact = step(queries[:k_q], support, labels[:k_q], "exact")
    agreement = float(F.cosine_similarity(g_exact.flatten(), g_qpth.flatten(), dim=0))

    opencv = best_of(args.repeats, lambda: step(queries, support, labels, "opencv", grad=False)[0])
    sinkhorn = best_of(args.repeats, lambda: step(queries, support, labels, "sinkhorn", grad=True)[0])

    rows = [
        {
            "solver": "exact (ours)",
            "pass": "fwd+bwd",
            "pairs timed": pairs,
            "s / episode": exact,
            "x faster than qpth": qpth_full / exact,
        },
        {
            "solver": "qpth (paper)",
            "pass": "fwd+bwd",
            "pairs timed": k_pairs,
            "s / episode": qpth_full,
            "x faster than qpth": 1.0,
        },
        {
            "solver": "sinkhorn",
            "pass": "fwd+bwd",
            "pairs timed": pairs,
            "s / episode": sinkhorn,
            "x faster than qpth": qpth_full / sinkhorn,
        },
        {
            "solver": "opencv (cv2.EMD)",
            "pass": "fwd only",
            "pairs timed": pairs,
            "s / episode": opencv,
            "x faster than qpth": qpth_full / opencv,
        },
    ]
    print(
        f"{args.way}-way 1-shot episode, {args.query} queries/class, {args.nodes} nodes x {args.dim}-d, "
        f"{pairs} EMD problems; best of {args.repeats} (qpth: one run on {k_pairs} pairs"
        f"{'' if k_pairs == pairs else f', extrapolated x{pairs / k_pairs:.1f} to {pairs}'})"
    )
    print(to_markdown(__import__("pandas").DataFrame(rows), "%.4g"))
    print(f"exact on the same {k_pairs} pairs: {exact_part:.4g} s; cosine(grad exact, grad qpth) = {agreement:.4f}")


if __name__ == "__main__":
    main()
