"""``deepemd bench episodes``: ``fewshot test`` per episode beside the EMD work alone.

Runs the job's own ``run_test`` (5-way 1-shot, 15 queries, every default method) twice on the
same folder -- the first fills the feature cache and compiles the kernels, the second is
timed -- then times the EMD scoring alone on the same episodes
(:func:`~deepemd.emd.pairwise_similarity` of each episode's queries against its supports) and
prints seconds per episode and the ratio for each method.

    deepemd bench episodes [--data-root demo|DIR] [--episodes 50] [--image-size 84]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def episodes_section(data_root: str, episodes: int, image_size: int | None) -> None:
    """`fewshot test` (5-way 1-shot, every default method) vs the EMD scoring alone on the same
    episodes (``pairwise_similarity`` of each episode's queries against its supports)."""
    from deepemd.emd import pairwise_similarity
    from deepemd.fewshot import build
    from deepemd.fewshot.config import EvalConfig as FewShotEval
    from deepemd.fewshot.episodes import episode_indices
    from deepemd.fewshot.evaluate import feature_key, run_test
    from deepemd.fewshot.features import cached

    out = tempfile.mkdtemp(prefix="bench-episodes-")
    cfg = FewShotEval(
        data_root=data_root,
        way=5,
        shot=1,
        query=15,
        episodes=episodes,
        image_size=image_size,
        weights="none",  # a timing: a random network's episodes cost what a trained one's do
        out=out,
        feature_cache=str(Path(out) / "cache"),
        flow_picture=False,
    )
    run_test(cfg, progress=False)  # features into the cache, kernels compiled
    start = time.perf_counter()
    frame = run_test(cfg, progress=False)
    wall = time.perf_counter() - start
    cache = cached(cfg.feature_cache, feature_key(cfg, build.read_split(cfg, cfg.split)), lambda: None)
    local = torch.as_tensor(cache.local).float()
    n_support = cfg.way * cfg.shot
    emd = 0.0
    for idx in episode_indices(cache.labels, cfg.way, cfg.shot, cfg.query, cfg.num_episodes(), cfg.seed):
        idx = torch.as_tensor(np.asarray(idx))
        start = time.perf_counter()
        pairwise_similarity(local[idx[n_support:]], local[idx[:n_support]], weights=cfg.node_weights, center=cfg.center)
        emd += time.perf_counter() - start
    floor = emd / cfg.num_episodes()
    print(
        f"\n## fewshot test: 5-way 1-shot, {cfg.num_episodes()} episodes (features cached), "
        f"{wall:.2f} s in all; EMD work alone {floor:.4f} s / episode; load {os.getloadavg()[0]:.1f}"
    )
    print("| method | s / episode | ratio to the EMD work alone |\n|---|---|---|")
    for _, row in frame.iterrows():
        per = row["seconds"] / cfg.num_episodes()
        print(f"| {row['method']} | {per:.4f} | {per / floor:.2f} |")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    episodes_section(args.data_root, args.episodes, args.image_size)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("episodes", help="fewshot test per episode beside the EMD work alone")
    parser.add_argument(
        "--data-root", default="demo", help="demo (bundled Omniglot) or a <root>/<class>/<image> folder"
    )
    parser.add_argument("--episodes", type=int, default=50, help="5-way 1-shot episodes timed")
    parser.add_argument("--image-size", type=int, default=None, help="backbone input size in px (default: the test's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.set_defaults(func=run)


__all__ = ["episodes_section", "register", "run"]
