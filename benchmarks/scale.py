"""How the gallery side grows: feature store + FAISS index + rerank at 10k, 100k, 1M images.

For each gallery size this builds, on disk, a synthetic gallery shaped like the real one
(random unit 128-d global vectors; 25 x 640 float16 local sets, i.e. 32 KB per image) with the
same code the retrieval job uses (``build_store``, ``build_index_from_store``, ``save_index``),
then loads it in a FRESH process and measures

* the FAISS shortlist: queries/s for top-``k`` search of random queries;
* the rerank: per query, top-``k`` shortlist, read those ``k`` local sets from the memory-mapped
  store, score them with ``deepemd.emd.pairwise_similarity`` (exact solver, cross-reference
  weights), reorder; queries/s, split into store read and EMD time;
* peak RSS of the build process and of the query process (``ru_maxrss``): the query process
  must stay far below the store's size on disk, because it reads only the rows it needs;
* what the always-on verification costs: every row ``store.get`` reads is CRC-checked (the
  "store read" time includes it; "of which CRC" times the same CRC-32 over the same bytes on
  its own), the index file is CRC-checked when loaded ("index load"), and a gallery write
  re-reads the whole new store before swapping it in ("store verify").

Every size runs in its own subprocesses so each peak RSS belongs to that size alone, and the
data is deleted afterwards unless ``--keep``. Ratios are against the smallest size of the run.

    python benchmarks/scale.py --sizes 10000 100000           # ~3.6 GB of temporary disk
    python benchmarks/scale.py --sizes 1000000 --spec IVF1024,Flat   # ~33 GB, check df -h first
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

M, D, VDIM, CHUNK = 25, 640, 128, 4096


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def produce(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic rows [start, stop): seeded by the range, so a rerun writes identical bytes."""
    rng = np.random.default_rng(start)
    vectors = rng.standard_normal((stop - start, VDIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    local = rng.random((stop - start, M, D), dtype=np.float32).astype(np.float16)  # ReLU-like, >= 0
    return vectors, local


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def phase_build(folder: Path, n: int, specs: list[str], seed: int) -> dict:
    from deepemd.retrieval.index import build_index_from_store, save_index
    from deepemd.retrieval.store import build_store

    fingerprint = {"backbone": "synthetic", "embed_dim": VDIM, "local": {"m": M, "d": D}}
    t0 = time.perf_counter()
    store = build_store(
        folder / "store", n, produce, M, D, fingerprint, chunk_size=CHUNK, vector_dim=VDIM, progress=n >= 100_000
    )
    out = {"store_s": time.perf_counter() - t0, "store_bytes": du(folder / "store"), "index": {}}
    t0 = time.perf_counter()
    store.verify()  # what a gallery write does before its atomic swap
    out["verify_s"] = time.perf_counter() - t0
    for spec in specs:
        t0 = time.perf_counter()
        index = build_index_from_store(store, spec, seed=seed)
        path = folder / f"{spec.replace(',', '_')}.faiss"
        save_index(index, path, fingerprint)
        out["index"][spec] = {
            "build_s": time.perf_counter() - t0,
            "bytes": path.stat().st_size + path.with_name(path.name + ".json").stat().st_size,
        }
        del index
    out["build_rss_mb"] = peak_rss_mb()
    return out


def phase_query(folder: Path, specs: list[str], queries: int, rerank_queries: int, k: int, seed: int) -> dict:
    import torch

    from deepemd.emd import pairwise_similarity
    from deepemd.retrieval.index import load_index, search
    from deepemd.retrieval.store import LocalFeatureStore

    torch.manual_seed(seed)
    rng = np.random.default_rng(10_000_019 + seed)
    q = rng.standard_normal((queries, VDIM), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q_sets = torch.from_numpy(rng.random((rerank_queries, M, D), dtype=np.float32))
    store = LocalFeatureStore.open(folder / "store")
    out = {"index": {}}
    rss_before_rerank = None
    for spec in specs:
        t0 = time.perf_counter()
        index = load_index(folder / f"{spec.replace(',', '_')}.faiss")  # CRC of the whole file included
        load_s = time.perf_counter() - t0
        search(index, q[:4], k)  # warm-up
        t0 = time.perf_counter()
        _, ids = search(index, q, k)
        shortlist_s = time.perf_counter() - t0
        out["index"][spec] = {"shortlist_qps": queries / shortlist_s, "load_s": load_s}
        if spec != specs[-1]:
            del index  # one index in memory at a time, so peak RSS is one index + the rerank
            continue
        # rerank with the last spec: shortlist -> read k local sets -> EMD scores -> reorder
        rss_before_rerank = peak_rss_mb()
        pairwise_similarity(q_sets[:1], torch.from_numpy(store.get(ids[-1]).astype(np.float32)))  # warm-up
        read_s = emd_s = crc_s = 0.0
        raw = np.empty((k, M, D), np.float16)  # the bytes get() checks per query: k rows of float16
        for i in range(rerank_queries):
            t0 = time.perf_counter()
            sets = store.get(ids[i])
            t1 = time.perf_counter()
            scores = pairwise_similarity(q_sets[i : i + 1], torch.from_numpy(sets.astype(np.float32)))[0]
            ids[i] = ids[i][torch.argsort(scores, descending=True).numpy()]
            t2 = time.perf_counter()
            read_s += t1 - t0
            emd_s += t2 - t1
            t3 = time.perf_counter()
            for row in raw:
                zlib.crc32(memoryview(row).cast("B"))
            crc_s += time.perf_counter() - t3
        out.update(
            rerank_qps=rerank_queries / (read_s + emd_s),
            read_ms=1e3 * read_s / rerank_queries,
            emd_ms=1e3 * emd_s / rerank_queries,
            crc_ms=1e3 * crc_s / rerank_queries,
        )
    out.update(query_rss_mb=peak_rss_mb(), rss_before_rerank_mb=rss_before_rerank)
    return out


def run_phase(args: argparse.Namespace, phase: str, n: int) -> dict:
    """Run one phase of one size in a fresh interpreter; it prints its result as JSON last."""
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--sizes",
        str(n),
        "--dir",
        str(args.dir),
        "--queries",
        str(args.queries),
        "--rerank-queries",
        str(args.rerank_queries),
        "--k",
        str(args.k),
        "--seed",
        str(args.seed),
    ] + [f"--spec={s}" for s in args.spec]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return ""


def table(results: dict[int, dict], specs: list[str], k: int) -> str:
    sizes = sorted(results)
    base = results[sizes[0]]
    rows = []
    header = ["metric"] + [f"{n:,}" for n in sizes] + [f"x {n // sizes[0]:,} vs {sizes[0]:,}" for n in sizes[1:]]

    def add(name, get, show):
        values = [get(results[n]) for n in sizes]
        rows.append([name] + [show(v) for v in values] + [f"{v / get(base):.2f}" for v in values[1:]])

    add("store build (s)", lambda r: r["store_s"], lambda v: f"{v:.1f}")
    add("store on disk", lambda r: r["store_bytes"], fmt_bytes)
    add("store verify, every CRC (s)", lambda r: r["verify_s"], lambda v: f"{v:.1f}")
    for s in specs:
        add(f"{s}: build + save (s)", lambda r, s=s: r["index"][s]["build_s"], lambda v: f"{v:.2f}")
        add(f"{s}: index file", lambda r, s=s: r["index"][s]["bytes"], fmt_bytes)
        add(f"{s}: index load incl. CRC (s)", lambda r, s=s: r["index"][s]["load_s"], lambda v: f"{v:.2f}")
        add(f"{s}: shortlist top-{k} (queries/s)", lambda r, s=s: r["index"][s]["shortlist_qps"], lambda v: f"{v:,.0f}")
    add(f"rerank top-{k} with EMD (queries/s)", lambda r: r["rerank_qps"], lambda v: f"{v:.2f}")
    add("  of which store read, verified (ms/query)", lambda r: r["read_ms"], lambda v: f"{v:.1f}")
    add("    of which row CRCs (ms/query)", lambda r: r["crc_ms"], lambda v: f"{v:.2f}")
    add("  of which EMD (ms/query)", lambda r: r["emd_ms"], lambda v: f"{v:.1f}")
    add("peak RSS, build process", lambda r: r["build_rss_mb"] * 2**20, fmt_bytes)
    add("peak RSS, query+rerank process", lambda r: r["query_rss_mb"] * 2**20, fmt_bytes)
    add("  of which added by the rerank", lambda r: (r["query_rss_mb"] - r["rss_before_rerank_mb"]) * 2**20, fmt_bytes)
    add("query RSS / store on disk", lambda r: r["query_rss_mb"] * 2**20 / r["store_bytes"], lambda v: f"{v:.3f}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument(
        "--spec",
        action="append",
        help="FAISS index_factory string (repeatable); "
        "the last one is used for the rerank. Default: Flat and IVF1024,Flat",
    )
    parser.add_argument("--queries", type=int, default=1000, help="shortlist queries timed")
    parser.add_argument("--rerank-queries", type=int, default=20, help="queries reranked with EMD")
    parser.add_argument("--k", type=int, default=100, help="shortlist length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "deepemd-scale-bench",
        help="scratch folder, deleted afterwards unless --keep",
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated galleries")
    parser.add_argument("--phase", choices=["build", "query"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.spec = args.spec or ["Flat", "IVF1024,Flat"]

    if args.phase:  # a child: one phase of one size
        folder = args.dir / str(args.sizes[0])
        result = (
            phase_build(folder, args.sizes[0], args.spec, args.seed)
            if args.phase == "build"
            else phase_query(folder, args.spec, args.queries, args.rerank_queries, args.k, args.seed)
        )
        print(json.dumps(result))
        return

    need = sum(n * (M * D * 2 + VDIM * 4) for n in args.sizes)
    free = shutil.disk_usage(args.dir.parent if not args.dir.exists() else args.dir).free
    print(
        f"sizes {args.sizes}, specs {args.spec}: needs ~{fmt_bytes(need)} of disk at peak "
        f"{fmt_bytes(max(n * (M * D * 2 + VDIM * 4) for n in args.sizes))} per size, "
        f"{fmt_bytes(free)} free; loadavg {os.getloadavg()}",
        flush=True,
    )
    results = {}
    try:
        for n in args.sizes:
            if n * (M * D * 2 + VDIM * 4) > free * 0.9:
                print(f"skipping {n:,}: not enough free disk", flush=True)
                continue
            results[n] = run_phase(args, "build", n)
            query = run_phase(args, "query", n)
            for spec, numbers in query.pop("index").items():
                results[n]["index"][spec].update(numbers)
            results[n].update(query)
            results[n]["loadavg"] = os.getloadavg()
            print(f"{n:,} done: {json.dumps(results[n])}", flush=True)
            if not args.keep:
                shutil.rmtree(args.dir / str(n), ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    print()
    print(table(results, args.spec, args.k))
    print(
        "\nloadavg (1, 5, 15 min) after each size: "
        + ", ".join(f"{n:,}: {tuple(round(x, 2) for x in results[n]['loadavg'])}" for n in results)
    )


if __name__ == "__main__":
    main()
