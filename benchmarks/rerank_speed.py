"""Rerank speed: ms per query to rescore a top-K shortlist of local sets with DeepEMD.

Compares, in one run on the same data, deepemd's rerank (``deepemd.retrieval.rerank.rescore``:
cross-reference weights, batched exact solver) with the same rerank done by a Python loop over
``cv2.EMD`` (the authors' test-time route), and prints the ratio. Default sizes are the ones the
brief asks about: top-100 shortlist, 25-node sets, 640-d features (ResNet-12, 5x5 map).

    python benchmarks/rerank_speed.py [--queries 20] [--k 100] [--nodes 25] [--dim 640] [--threads 2]
    python benchmarks/rerank_speed.py --density-sweep [--nodes 49] [--dim 1280]
    python benchmarks/rerank_speed.py --solve-batches
    python benchmarks/rerank_speed.py --gallery [--queries 40]
    python benchmarks/rerank_speed.py --pricing

``--solve-batches`` times the exact solve of a real rerank row's 63 x 63 problems (EfficientNet
FCN + pyramid sets of demo images at 224 px) in batches of the sizes a pruned rerank solves,
per LP against the whole row of 100 in one batch: small batches should cost no more per LP.

``--gallery`` times a gallery search's rerank (top-100 of a memory-mapped store read by id, real
224 px FCN sets) as ``retrieval search`` runs it (the store's rows as stored, their scales and
its pyramid) beside a fetch of whole float32 sets (``store.get``, every node multiplied).

``--pricing`` times the exact solve with its default block pricing (an eighth of the rows per
pivot above 32x32) against Dantzig's rule (every cell) on real 63 x 63 rerank problems and on
25 x 25 ones, where the full scan stays the default.

``--density-sweep`` times the rerank's node dots alone (``CandidateSets.dots``, one query
against 100 stored sets) dense and over the store's CSR copy, at ReLU features of several
densities: where the sparse product stops paying (``deepemd.retrieval.sparse_sets.MAX_DENSITY``).
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import torch

from deepemd.emd import cost_matrix, cross_reference_weights
from deepemd.eval.tables import to_markdown
from deepemd.retrieval.rerank import RerankSettings, rescore


def opencv_rescore(query: torch.Tensor, cands: torch.Tensor) -> np.ndarray:
    """Same scores as ``rescore`` (cross weights, total-mass-normalised), one cv2.EMD per pair."""
    q = query[None].expand(len(cands), -1, -1)
    cost = cost_matrix(q, cands).numpy().astype(np.float32)
    wu, wv = cross_reference_weights(q, cands)
    wu, wv = wu.numpy().astype(np.float32), wv.numpy().astype(np.float32)
    out = np.empty(len(cands))
    for i in range(len(cands)):
        emd, _, _ = cv2.EMD(wu[i][:, None], wv[i][:, None], cv2.DIST_USER, cost[i])
        out[i] = 1.0 - emd  # cv2 returns cost / total flow: the flow-weighted mean cosine is 1 - that
    return out


def real_fcn_sets(count: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """EfficientNet-Lite0 FCN + pyramid sets (63 x 1280, float16) of ``count`` demo images at
    224 px, as ``retrieval eval`` stores them, and their pyramid."""
    from deepemd.retrieval.build import dataset_images, local_specs, make_embedder, make_loader
    from deepemd.retrieval.config import EvalConfig
    from deepemd.retrieval.model import embed_loader

    cfg = EvalConfig(data_root="demo", methods=("fcn",), image_size=224)
    images = dataset_images(cfg)
    images = images.subset(np.linspace(0, len(images) - 1, count).astype(int))
    model = make_embedder(cfg, local_specs(cfg, ["fcn"]))
    _, sets, _ = embed_loader(model, make_loader(images, model, 32, 0), torch.device("cpu"), progress=False)
    return sets["fcn"], tuple(cfg.pyramid)


def real_rerank_rows(queries: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(cost, weights, weights)`` of the 100 63 x 63 problems of each of the first ``queries``
    rerank rows over 101 real sets (:func:`real_fcn_sets`): each query against the other 100."""
    from deepemd.retrieval.rerank import Reranker

    sets, pyramid = real_fcn_sets(101)
    reranker = Reranker(sets, k=100, pyramid=pyramid, prune=False)
    rows = []
    for q in range(queries):
        query = reranker.sets.expand(torch.from_numpy(sets[q : q + 1]))[0]
        rows.append(reranker._problem(query, *reranker.sets.dots(query, np.setdiff1d(np.arange(101), [q]))))
    return rows


def gallery_rerank(args) -> None:
    """ms per query of a gallery search's rerank (a memory-mapped LocalFeatureStore read by id)
    as ``retrieval search`` runs it and through ``store.get`` (float32 sets, every node),
    interleaved, best of 3 rounds, on real 224 px sets of demo images."""
    import tempfile

    import pandas as pd

    from deepemd.eval.shortlist import Shortlist
    from deepemd.retrieval.candidates import stored_pyramid
    from deepemd.retrieval.rerank import Reranker
    from deepemd.retrieval.store import LocalFeatureStore, build_store

    count = max(args.k + 1, 301)
    sets, pyramid = real_fcn_sets(count)
    rng = np.random.default_rng(args.seed)
    shortlists = np.stack([rng.choice(count, args.k, replace=False) for _ in range(args.queries)])
    queries = torch.from_numpy(sets[: args.queries]).float()
    with tempfile.TemporaryDirectory() as tmp:
        fingerprint = {"local": {"kind": "fcn", "pyramid": list(pyramid)}}
        build_store(tmp, count, lambda lo, hi: sets[lo:hi], sets.shape[1], sets.shape[2], fingerprint, progress=False)
        store = LocalFeatureStore.open(tmp, expected_fingerprint=fingerprint)
        variants = {
            "store.get: float32 sets, every node": (store.get, ()),
            f"the store: stored rows + scales, pyramid {stored_pyramid(store.fingerprint)}": (store, pyramid),
        }
        best = dict.fromkeys(variants, np.inf)
        tops = {}
        shortlist = Shortlist(shortlists, np.tile(-np.arange(args.k, dtype=np.float32), (args.queries, 1)))
        for _ in range(3):
            for name, (source, pyr) in variants.items():
                reranker = Reranker(source, k=10, depth=args.k, pyramid=pyr)
                reranker.rerank(queries[:1], Shortlist(shortlist.ids[:1], shortlist.scores[:1]))
                start = time.perf_counter()
                tops[name] = reranker.rerank(queries, shortlist)
                best[name] = min(best[name], (time.perf_counter() - start) / args.queries)
    before, after = (tops[name] for name in variants)
    gap = float(np.abs(np.asarray(before.scores) - np.asarray(after.scores)).max())
    differ = int((np.asarray(before.ids) != np.asarray(after.ids)).any(axis=1).sum())
    first = next(iter(variants))
    rows = [{"store read": name, "ms / query": 1e3 * t, "x store.get": best[first] / t} for name, t in best.items()]
    print(
        f"gallery rerank: {args.queries} queries, top-{args.k} of {count} stored FCN sets "
        f"({sets.shape[1]} x {sets.shape[2]}, float16, memory-mapped), exact top 10, {args.threads} threads; "
        f"queries whose top-10 ids differ: {differ}, max |score difference| {gap:.1e}"
    )
    print(to_markdown(pd.DataFrame(rows)))


def pricing(args) -> None:
    """us per LP of the exact solve with the default block pricing against Dantzig's full
    pricing (``block=m``), interleaved, best of 5 rounds: real 63 x 63 rerank problems (FCN +
    pyramid sets of demo images at 224 px) and 25 x 25 ones (random ReLU 640-d)."""
    import pandas as pd

    from deepemd.emd.exact import pricing_block, solve_batch

    rows63 = [[t.double().numpy() for t in row] for row in real_rerank_rows(3)]
    problems = {"63x63 rerank (EfficientNet FCN + pyramid, 224 px)": [np.concatenate(x) for x in zip(*rows63)]}
    gen = torch.Generator().manual_seed(args.seed)
    u, v = (torch.relu(torch.randn(300, 25, 640, generator=gen)) for _ in range(2))
    wu, wv = cross_reference_weights(u, v)
    problems["25x25 (random ReLU 640-d)"] = [
        cost_matrix(u, v).double().numpy(),
        wu.double().numpy(),
        wv.double().numpy(),
    ]
    rows = []
    for name, (cost, a, b) in problems.items():
        m, n = cost.shape[1:]
        blocks = {"block (default)": pricing_block(m, n), "Dantzig (every cell)": m}
        best = dict.fromkeys(blocks, np.inf)
        solutions = {}
        for _ in range(5):
            for label, block in blocks.items():
                start = time.perf_counter()
                solutions[label] = solve_batch(cost, a, b, block=block)
                best[label] = min(best[label], time.perf_counter() - start)
        blocked, dantzig = solutions.values()
        gap = float(np.abs(blocked.distance - dantzig.distance).max())
        for label, block in blocks.items():
            pivots = solutions[label].pivots
            rows.append(
                {
                    "problems": name,
                    "pricing": f"{label}: {block} of {m} rows",
                    "us / LP": 1e6 * best[label] / len(cost),
                    "x Dantzig": best["Dantzig (every cell)"] / best[label],
                    "pivots": float(pivots.mean()),
                    "max |distance gap|": f"{gap:.1e}",
                }
            )
    print(f"exact solve by pricing rule, {args.threads} threads, best of 5 interleaved rounds")
    print(to_markdown(pd.DataFrame(rows)))


def solve_batches(args) -> None:
    """Per-LP time of the exact solve by batch size, best of 7 interleaved rounds."""
    from deepemd.emd import solve

    cost, wu, wv = real_rerank_rows(1)[0]
    sizes = (10, 15, 19, 25, 34, 100)
    best = dict.fromkeys(sizes, np.inf)
    for _ in range(7):
        for size in sizes:
            start = time.perf_counter()
            for lo in range(0, 100 - size + 1, size):
                solve(cost[lo : lo + size], wu[lo : lo + size], wv[lo : lo + size])
            lps = (100 // size) * size
            best[size] = min(best[size], (time.perf_counter() - start) / lps)
    import pandas as pd

    rows = [{"batch": s, "us / LP": 1e6 * best[s], "x the batch of 100": best[s] / best[100]} for s in sizes]
    print(f"exact solve of 63 x 63 rerank problems by batch size, {args.threads} threads")
    print(to_markdown(pd.DataFrame(rows)))


def density_sweep(args) -> None:
    """Dense vs CSR node dots per query at several densities, interleaved, best of 3 rounds."""
    from deepemd.retrieval.candidates import CandidateSets

    gen = torch.Generator().manual_seed(args.seed)
    ids = np.random.default_rng(args.seed).choice(1000, args.k, replace=False).astype(np.int64)
    rows = []
    for shift in (1.4, 1.0, 0.8, 0.6, 0.5, 0.3):
        sets = torch.relu(torch.randn(1000, args.nodes, args.dim, generator=gen) - shift).half()
        dense, sparse = CandidateSets(sets, False), CandidateSets(sets, False)
        sparse.index_for(0, True)
        query = sets[0].float()
        best = {"dense": np.inf, "sparse": np.inf}
        for _ in range(3):
            for name, candidates in (("dense", dense), ("sparse", sparse)):
                candidates.dots(query, ids)
                start = time.perf_counter()
                for _ in range(args.queries):
                    candidates.dots(query, ids)
                best[name] = min(best[name], (time.perf_counter() - start) / args.queries)
        rows.append(
            {
                "nonzero share": float((sets != 0).float().mean()),
                "dense ms": 1e3 * best["dense"],
                "CSR ms": 1e3 * best["sparse"],
                "dense / CSR": best["dense"] / best["sparse"],
            }
        )
    import pandas as pd

    print(f"node dots, one query against {args.k} sets of {args.nodes} x {args.dim}, {args.threads} threads")
    print(to_markdown(pd.DataFrame(rows)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--nodes", type=int, default=25)
    ap.add_argument("--dim", type=int, default=640)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--solve-batches", action="store_true", help="per-LP solve time by batch size")
    ap.add_argument("--density-sweep", action="store_true", help="dense vs CSR node dots by feature density")
    ap.add_argument("--gallery", action="store_true", help="a gallery store's rerank, as search runs it and via get")
    ap.add_argument("--pricing", action="store_true", help="block pricing vs Dantzig's on 63x63 and 25x25 solves")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.solve_batches:
        solve_batches(args)
        return
    if args.density_sweep:
        density_sweep(args)
        return
    if args.gallery:
        gallery_rerank(args)
        return
    if args.pricing:
        pricing(args)
        return
    gen = torch.Generator().manual_seed(args.seed)
    # post-ReLU-like features (non-negative, sparse), as a CNN's local features are
    queries = torch.relu(torch.randn(args.queries, args.nodes, args.dim, generator=gen))
    cands = torch.relu(torch.randn(args.queries, args.k, args.nodes, args.dim, generator=gen))
    settings = RerankSettings(depth=args.k)
    rescore(queries[0], cands[0], None, settings)  # compile / warm up
    opencv_rescore(queries[0], cands[0])

    start = time.perf_counter()
    ours = [rescore(queries[i], cands[i], None, settings).numpy() for i in range(args.queries)]
    t_ours = (time.perf_counter() - start) / args.queries
    start = time.perf_counter()
    ref = [opencv_rescore(queries[i], cands[i]) for i in range(args.queries)]
    t_cv = (time.perf_counter() - start) / args.queries
    gap = max(float(np.abs(a - b).max()) for a, b in zip(ours, ref))
    rows = [
        {
            "rerank": "deepemd (exact, batched)",
            "ms/query": 1000 * t_ours,
            "us/pair": 1e6 * t_ours / args.k,
            "x faster than cv2 loop": t_cv / t_ours,
        },
        {
            "rerank": "cv2.EMD loop",
            "ms/query": 1000 * t_cv,
            "us/pair": 1e6 * t_cv / args.k,
            "x faster than cv2 loop": 1.0,
        },
    ]
    import pandas as pd

    print(
        f"top-{args.k} shortlist, {args.nodes}-node sets, {args.dim}-d, {args.queries} queries, "
        f"{args.threads} torch threads; max |score difference| = {gap:.2e}"
    )
    print(to_markdown(pd.DataFrame(rows)))


if __name__ == "__main__":
    main()
