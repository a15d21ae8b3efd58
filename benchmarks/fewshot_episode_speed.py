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

    python benchmarks/fewshot_episode_speed.py [--repeats 5] [--qpth-pairs 10] [--dim 640]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from deepemd.eval.tables import to_markdown
from deepemd.emd import pairwise_similarity


def episode(way: int, query: int, nodes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-negative (post-ReLU-like) features, so cross-reference weights are informative."""
    gen = torch.Generator().manual_seed(seed)
    support = torch.randn(way, nodes, dim, generator=gen).relu()
    queries = (support.repeat_interleave(query, 0) + torch.randn(way * query, nodes, dim, generator=gen)).relu()
    labels = torch.arange(way).repeat_interleave(query)
    return queries, support, labels


def step(queries: torch.Tensor, support: torch.Tensor, labels: torch.Tensor, solver: str, grad: bool = True
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--nodes", type=int, default=25)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--qpth-pairs", type=int, default=10, help="pairs timed with qpth (375 = all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

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
        {"solver": "exact (ours)", "pass": "fwd+bwd", "pairs timed": pairs, "s / episode": exact,
         "x faster than qpth": qpth_full / exact},
        {"solver": "qpth (paper)", "pass": "fwd+bwd", "pairs timed": k_pairs,
         "s / episode": qpth_full, "x faster than qpth": 1.0},
        {"solver": "sinkhorn", "pass": "fwd+bwd", "pairs timed": pairs, "s / episode": sinkhorn,
         "x faster than qpth": qpth_full / sinkhorn},
        {"solver": "opencv (cv2.EMD)", "pass": "fwd only", "pairs timed": pairs, "s / episode": opencv,
         "x faster than qpth": qpth_full / opencv},
    ]
    print(f"{args.way}-way 1-shot episode, {args.query} queries/class, {args.nodes} nodes x {args.dim}-d, "
          f"{pairs} EMD problems; best of {args.repeats} (qpth: one run on {k_pairs} pairs"
          f"{'' if k_pairs == pairs else f', extrapolated x{pairs / k_pairs:.1f} to {pairs}'})")
    print(to_markdown(__import__("pandas").DataFrame(rows), "%.4g"))
    print(f"exact on the same {k_pairs} pairs: {exact_part:.4g} s; cosine(grad exact, grad qpth) = {agreement:.4f}")


if __name__ == "__main__":
    main()
