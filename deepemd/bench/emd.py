"""``deepemd bench emd``: per-problem time of every EMD solver, with ratios measured in one run.

Problems are built the way DeepEMD builds them (random features -> cosine cost and
cross-reference weights), so their structure matches real use. Every row is the best of
``--repeats`` runs; the ratio columns divide the cv2.EMD loop's and qpth's time (forward for
forward rows, forward+backward for forward+backward rows) by the row's own time, all measured
in this run on this machine. The load average is printed with the table because the machine
may be shared.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import torch

from deepemd.emd.api import pairwise_similarity, similarity, solve
from deepemd.emd.exact import solve_batch
from deepemd.emd.features import cost_matrix, cross_reference_weights
from deepemd.emd.reference import qpth_matrices
from deepemd.errors import DeepEMDError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="5x5,25x25,50x50,25x50", help="problem sizes m x n, comma separated")
    parser.add_argument("--batches", default="1,100,1000", help="batch sizes, comma separated")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timing runs per cell, best kept (Sinkhorn and qpth: 1 run)"
    )
    parser.add_argument(
        "--solvers",
        default=",".join(SOLVER_ROWS),
        help="which rows to time, comma separated (cv2.EMD is always timed: the ratios need it)",
    )
    parser.add_argument(
        "--qpth-count", type=int, default=3, help="problems timed for qpth (batch 1 each; it takes ~1 s per problem)"
    )
    parser.add_argument(
        "--qpth-max-cells",
        type=int,
        default=625,
        help="skip qpth above this many variables m*n (its KKT solve is cubic)",
    )
    parser.add_argument("--sinkhorn-eps", type=float, default=1e-2, help="entropic eps (cost units)")
    parser.add_argument("--sinkhorn-iters", type=int, default=500, help="Sinkhorn iteration cap")
    parser.add_argument("--dim", type=int, default=64, help="feature channels of the problems")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, also used by the exact solver")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random problems")
    parser.add_argument(
        "--quick", action="store_true", help="sizes 5x5,25x25; batches 1,100; 1 repeat; 2 qpth problems"
    )
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA rows")
    parser.add_argument(
        "--pairwise",
        default=None,
        metavar="PxQ",
        help="instead of the solver table, time pairwise_similarity of P query "
        "sets against Q sets (e.g. 1x100: one rerank of a shortlist)",
    )
    parser.add_argument("--nodes", type=int, default=25, help="--pairwise: nodes per set")
    parser.add_argument("--channels", type=int, default=640, help="--pairwise and --user-path: feature channels")
    parser.add_argument("--no-qpth-probe", action="store_true", help="skip trying qpth with a CPU batch of 2 at 25x25")
    parser.add_argument(
        "--user-path",
        action="store_true",
        help="instead of the solver table, time solve() in a user's call path: "
        "float32 features -> cost_matrix -> cross_reference_weights -> "
        "solve right after that torch work, on random ReLU features "
        "(--channels) and on EfficientNet-Lite0 cell features of the demo "
        "set, against a cv2.EMD loop and the bare kernel in the same run",
    )
    parser.add_argument(
        "--images", type=int, default=64, help="--user-path: demo images whose cell features are paired"
    )


SOLVER_ROWS = ("exact", "pot", "sinkhorn", "qpth")


def _options_given() -> str:
    """The options of this run as typed, after ``deepemd bench emd`` or the script's name."""
    args = sys.argv[1:]
    if args[:2] == ["bench", "emd"]:
        args = args[2:]
    return " ".join(args) or "(defaults)"


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    try:
        sizes = [tuple(int(s) for s in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise DeepEMDError(f"--sizes {text!r} is not a list like 5x5,25x50")
    return sizes  # type: ignore[return-value]


def make_problems(batch: int, m: int, n: int, dim: int, seed: int, device: str = "cpu"):
    """Cosine costs and cross-reference weights of random non-negative (post-ReLU) features."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.relu(torch.randn(batch, m, dim, generator=gen, dtype=torch.float64))
    v = torch.relu(torch.randn(batch, n, dim, generator=gen, dtype=torch.float64))
    cost = cost_matrix(u, v)
    wu, wv = cross_reference_weights(u, v)
    return cost.to(device), wu.to(device), wv.to(device)


def _best_time(fn: Callable[[], object], repeats: int, sync: bool = False) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _best_cpu(fn: Callable[[], object], repeats: int) -> float:
    """Least CPU time of the calling thread over ``repeats`` calls (single-threaded work)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def _forward(solver: str, cost, wu, wv, **opts) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            solve(cost, wu, wv, solver=solver, **opts)

    return run


def _forward_backward(solver: str, cost, wu, wv, **opts) -> Callable[[], object]:
    def run():
        c, a, b = (t.detach().requires_grad_(True) for t in (cost, wu, wv))
        dist, _ = solve(c, a, b, solver=solver, **opts)
        dist.sum().backward()

    return run


def _pot_loop(cost, wu, wv) -> Callable[[], object]:
    import ot

    c, a, b = (t.detach().cpu().double().numpy() for t in (cost, wu, wv))

    def run():
        for k in range(c.shape[0]):
            ot.emd2(a[k], b[k], c[k])

    return run


def probe_qpth_batch(m: int = 25, n: int = 25, batch: int = 2, seed: int = 0) -> str:
    """What qpth does with a CPU batch >= 2 at DeepEMD size (the design notes say it fails)."""
    from qpth.qp import QPFunction

    cost, wu, wv = make_problems(batch, m, n, 64, seed)
    A, eye = qpth_matrices(m, n, torch.float64)
    rhs = torch.cat([wu, wv[:, :-1]], dim=1)
    t0 = time.perf_counter()
    try:
        x = QPFunction(verbose=-1, eps=1e-12, maxIter=30, check_Q_spd=False)(
            1e-6 * eye, cost.reshape(batch, -1), -eye, torch.zeros(m * n, dtype=torch.float64), A, rhs
        )
    except Exception as exc:  # qpth raises torch/LinAlg errors; report the first line
        return f"fails after {time.perf_counter() - t0:.2f} s: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    ref, _ = solve(cost, wu, wv)
    got = (cost.reshape(batch, -1) * x).sum(-1)
    err = float(((got - ref).abs() / ref).max())
    return f"runs in {time.perf_counter() - t0:.2f} s for {batch} problems; max rel. error {err:.1e}"


def _gathered_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The reference: per-pair :func:`similarity` on gathered copies of the sets (what
    pairwise_similarity did before it scored blocks of pairs with matmuls)."""
    idx = torch.arange(a.shape[0] * b.shape[0])
    return similarity(a[idx // b.shape[0]], b[idx % b.shape[0]]).reshape(a.shape[0], b.shape[0])


def run_pairwise(args: argparse.Namespace) -> int:
    """Milliseconds per call of pairwise_similarity against the gathered per-pair reference,
    on random post-ReLU float32 sets (the retrieval rerank and few-shot episode shapes)."""
    p, q = _parse_sizes(args.pairwise)[0]
    gen = torch.Generator().manual_seed(args.seed)
    a = torch.relu(torch.randn(p, args.nodes, args.channels, generator=gen))
    b = torch.relu(torch.randn(q, args.nodes, args.channels, generator=gen))
    with torch.no_grad():
        ref = _gathered_pairs(a, b)
        fast = pairwise_similarity(a, b)
        cost = torch.cat([cost_matrix(a[i : i + 1].expand(q, -1, -1), b) for i in range(p)])
        weights = [cross_reference_weights(a[i : i + 1].expand(q, -1, -1), b) for i in range(p)]
        wu, wv = (torch.cat(w).double().numpy() for w in zip(*weights))
    c64 = cost.double().numpy()
    rows = [
        ("per-pair similarity on gathered copies (reference)", _best_time(lambda: _gathered_pairs(a, b), args.repeats)),
        ("pairwise_similarity", _best_time(_forward_pairwise(a, b), args.repeats)),
        ("  of which the exact solve (solve_batch)", _best_time(lambda: solve_batch(c64, wu, wv), args.repeats)),
    ]
    print(f"# deepemd bench emd: {_options_given()}")
    print(
        f"{p} x {q} sets of {args.nodes} nodes x {args.channels} channels (float32, ReLU), "
        f"cross-reference weights, exact solver; best of {args.repeats} runs"
    )
    print(
        f"loadavg {' '.join(f'{x:.2f}' for x in os.getloadavg())}, cpus {os.cpu_count()}, "
        f"threads (torch and exact solver) {torch.get_num_threads()}; max |difference| "
        f"between the two: {float((fast - ref).abs().max()):.1e}\n"
    )
    print("| pairs | path | ms / call | x reference |")
    print("|---|---|---|---|")
    for name, t in rows:
        print(f"| {p}x{q} | {name} | {t * 1e3:,.2f} | {rows[0][1] / t:.1f} |", flush=True)
    print(f"loadavg at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def _forward_pairwise(a: torch.Tensor, b: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            pairwise_similarity(a, b)

    return run


def real_cell_features(count: int, size: int = 160, seed: int = 0) -> torch.Tensor:
    """EfficientNet-Lite0 (packaged ImageNet weights) cell features of ``count`` demo images:
    its 5x5 map at ``size`` 160 as ``(count, 25, 1280)`` float32 sets (what FCN local features
    of the retrieval and few-shot jobs are)."""
    import random

    from deepemd.backbones import create
    from deepemd.data import demo_root
    from deepemd.data.images import load_image
    from deepemd.data.transforms import build_transform

    paths = sorted(demo_root().rglob("*.png"))
    chosen = random.Random(seed).sample(paths, min(count, len(paths)))
    net = create("efficientnet_lite0", pretrained=True).eval()
    transform = build_transform(size)
    images = torch.stack([transform(load_image(p)) for p in chosen])
    with torch.inference_mode():
        maps = net(images)
    return maps.flatten(2).transpose(1, 2).contiguous().float()


def paired_sets(sets: torch.Tensor, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random pairs of distinct sets, gathered into ``(batch, m, d)`` twice."""
    gen = torch.Generator().manual_seed(seed)
    i = torch.randint(0, sets.shape[0], (batch,), generator=gen)
    j = (i + torch.randint(1, sets.shape[0], (batch,), generator=gen)) % sets.shape[0]
    return sets[i].contiguous(), sets[j].contiguous()


def run_user_path(args: argparse.Namespace) -> int:
    """Microseconds per problem of ``solve`` reached the plain way (float32 features ->
    cost_matrix -> cross_reference_weights -> solve, the torch work right before each timed
    solve), beside a cv2.EMD loop and the bare kernel (solve_batch on float64 arrays) on the
    same problems, interleaved in one run so that the ratios share the machine's load."""
    sizes = _parse_sizes(args.sizes if args.sizes != parser_default("sizes") else "25x25")
    m, n = sizes[0]
    batch = int(args.batches.split(",")[-1]) if args.batches != parser_default("batches") else 1000
    gen = torch.Generator().manual_seed(args.seed)
    kinds = {
        f"random ReLU {args.channels}-d": (
            torch.relu(torch.randn(batch, m, args.channels, generator=gen)),
            torch.relu(torch.randn(batch, n, args.channels, generator=gen)),
        )
    }
    if (m, n) == (25, 25):
        kinds["EfficientNet-Lite0 1280-d demo cells"] = paired_sets(
            real_cell_features(args.images, seed=args.seed), batch, args.seed
        )
    print(f"# deepemd bench emd: {_options_given()}")
    print(
        f"{m}x{n}, batch {batch}, float32 features, cross-reference weights; best of "
        f"{args.repeats} interleaved runs; threads (torch and exact solver) "
        f"{torch.get_num_threads()}; loadavg {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
        f"cpus {os.cpu_count()}\n"
    )
    print("| features | path | us / problem | x cv2.EMD | x bare kernel | pivots mean (max) |")
    print("|---|---|---|---|---|---|")
    cpu_lines = [_user_path_rows(name, u, v, args.repeats) for name, (u, v) in kinds.items()]
    print(
        "\nCPU time of one thread (less sensitive to the machine's load than the wall times "
        "above, not immune: contention for caches and cores inflates it too; two threads on "
        "an idle 2-core machine can at best double the ratio):"
    )
    for line in cpu_lines:
        print(line)
    print(f"loadavg at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def _user_path_rows(name: str, u: torch.Tensor, v: torch.Tensor, repeats: int) -> str:
    """Print the user-path rows of one feature kind; return its one-thread CPU-time line."""
    import numpy as np

    from deepemd.emd import threads

    def build():
        cost = cost_matrix(u, v)
        return (cost, *cross_reference_weights(u, v))

    batch = u.shape[0]
    with torch.no_grad():
        cost, wu, wv = build()
        c64, a64, b64 = (np.ascontiguousarray(t.double().numpy()) for t in (cost, wu, wv))
        solve(cost, wu, wv)  # load the compiled kernels (both dtypes) before any timing
        solve_batch(c64, a64, b64)
        _forward("opencv", cost[:2], wu[:2], wv[:2])()
        times = dict.fromkeys(("cv2", "bare", "user", "own"), float("inf"))
        for _ in range(repeats):
            times["cv2"] = min(times["cv2"], _best_time(_forward("opencv", cost, wu, wv), 1))
            times["bare"] = min(times["bare"], _best_time(lambda: solve_batch(c64, a64, b64), 1))
            for key, torch_pool in (("user", True), ("own", False)):
                threads.PREFER_TORCH_POOL = torch_pool
                problem = build()  # torch work just before the solve, as in a user's code
                t0 = time.perf_counter()
                solve(*problem)
                times[key] = min(times[key], time.perf_counter() - t0)
            threads.PREFER_TORCH_POOL = True
    pivots = solve_batch(c64, a64, b64).pivots
    piv = f"{pivots.mean():.1f} ({pivots.max()})"
    rows = [
        ("cv2.EMD loop", times["cv2"], "-"),
        ("exact, bare kernel (solve_batch, float64 arrays)", times["bare"], piv),
        ("exact, user call path (solve on float32, after torch work)", times["user"], piv),
        ("  the same on an own thread pool instead of torch's", times["own"], ""),
    ]
    for label, t, p in rows:
        print(
            f"| {name} | {label} | {t / batch * 1e6:,.2f} | {times['cv2'] / t:.1f} | {times['bare'] / t:.2f} | {p} |",
            flush=True,
        )
    cpu_cv2 = _best_cpu(_forward("opencv", cost, wu, wv), repeats)
    cpu_kernel = _best_cpu(lambda: solve_batch(c64, a64, b64, threads=1), repeats)
    return (
        f"{name}: per problem cv2.EMD {cpu_cv2 / batch * 1e6:,.2f} us, bare kernel "
        f"{cpu_kernel / batch * 1e6:,.2f} us: {cpu_cv2 / cpu_kernel:.1f}x"
    )


def parser_default(name: str) -> object:
    """The default of option ``name`` (to tell an explicit value from none)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.get_default(name)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)  # the exact solver's thread count too
    if args.pairwise:
        return run_pairwise(args)
    if args.user_path:
        return run_user_path(args)
    if args.quick:
        args.sizes, args.batches, args.repeats, args.qpth_count = "5x5,25x25", "1,100", 1, 2
    sizes = _parse_sizes(args.sizes)
    chosen = {name.strip() for name in args.solvers.split(",")}
    if not chosen <= set(SOLVER_ROWS):
        raise DeepEMDError(f"--solvers {args.solvers!r}: choose from {','.join(SOLVER_ROWS)}")
    batches = [int(b) for b in args.batches.split(",")]
    cuda = torch.cuda.is_available() and not args.no_cuda
    warm = make_problems(2, 3, 3, 4, 0)  # imports and numba's cached compile stay untimed
    for solver in ("exact", "opencv", "qpth", "sinkhorn"):
        _forward(solver, *warm)()
    _forward_backward("exact", *warm)()
    _pot_loop(*warm)()

    print(f"# deepemd bench emd: {_options_given()}")
    settings = [f"every row: best of {args.repeats} runs", f"problems of {args.dim}-d ReLU features"]
    if "sinkhorn" in chosen:
        settings.insert(
            0, f"sinkhorn: eps {args.sinkhorn_eps}, at most {args.sinkhorn_iters} iterations, tol 1e-6, 1 run"
        )
    if "qpth" in chosen:
        settings.insert(0, f"qpth: l2 1e-6, {args.qpth_count} problems one at a time, 1 run")
    print("; ".join(settings), flush=True)
    print(
        f"loadavg {' '.join(f'{x:.2f}' for x in os.getloadavg())}, cpus {os.cpu_count()}, "
        f"threads (torch and exact solver) {torch.get_num_threads()}, "
        f"cuda {'yes' if cuda else 'no'}\n"
    )
    print("| m x n | batch | solver | pass | us / problem | x cv2.EMD | x qpth (batch 1) |")
    print("|---|---|---|---|---|---|---|")
    sk = {"eps": args.sinkhorn_eps, "n_iter": args.sinkhorn_iters, "tol": 1e-6}
    for m, n in sizes:
        for batch in batches:
            cost, wu, wv = make_problems(batch, m, n, args.dim, args.seed)
            rows: list[tuple[str, str, float]] = []

            def timed(fn, reps=args.repeats, sync=False, count=batch):
                return _best_time(fn, reps, sync) / count

            rows.append(("cv2.EMD loop", "fwd", timed(_forward("opencv", cost, wu, wv))))
            if "pot" in chosen:
                rows.append(("POT ot.emd loop", "fwd", timed(_pot_loop(cost, wu, wv))))
            if "exact" in chosen:
                rows.append(("exact (ours)", "fwd", timed(_forward("exact", cost, wu, wv))))
                rows.append(("exact (ours)", "fwd+bwd", timed(_forward_backward("exact", cost, wu, wv))))
            if "sinkhorn" in chosen:
                rows.append(("sinkhorn", "fwd", timed(_forward("sinkhorn", cost, wu, wv, **sk), 1)))
                rows.append(("sinkhorn", "fwd+bwd", timed(_forward_backward("sinkhorn", cost, wu, wv, **sk), 1)))
            if "qpth" in chosen and m * n <= args.qpth_max_cells and args.qpth_count > 0:
                k = min(batch, args.qpth_count)
                sub = (cost[:k], wu[:k], wv[:k])
                rows.append(("qpth batch-1 loop", "fwd", timed(_forward("qpth", *sub), 1, False, k)))
                rows.append(("qpth batch-1 loop", "fwd+bwd", timed(_forward_backward("qpth", *sub), 1, False, k)))
            if cuda:
                dev = [t.cuda() for t in (cost, wu, wv)]
                if "exact" in chosen:
                    rows.append(
                        ("exact (ours), cuda in/out", "fwd+bwd", timed(_forward_backward("exact", *dev), sync=True))
                    )
                if "sinkhorn" in chosen:
                    rows.append(("sinkhorn, cuda", "fwd", timed(_forward("sinkhorn", *dev, **sk), sync=True)))
                    rows.append(
                        ("sinkhorn, cuda", "fwd+bwd", timed(_forward_backward("sinkhorn", *dev, **sk), sync=True))
                    )
            ref = {(s, p): t for s, p, t in rows}
            cv2_t = ref[("cv2.EMD loop", "fwd")]
            for solver, pass_, t in rows:
                q = ref.get(("qpth batch-1 loop", pass_))
                vs_cv2 = f"{cv2_t / t:.1f}" if pass_ == "fwd" else "-"
                vs_qpth = f"{q / t:,.0f}" if q else "-"
                print(f"| {m}x{n} | {batch} | {solver} | {pass_} | {t * 1e6:,.1f} | {vs_cv2} | {vs_qpth} |", flush=True)
    if not args.no_qpth_probe:
        print(f"\nqpth with a CPU batch of 2 at 25x25: {probe_qpth_batch()}")
    print(f"loadavg at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """``deepemd bench emd``."""
    parser = subparsers.add_parser("emd", help="per-problem time of each EMD solver, ratios to cv2.EMD and qpth")
    add_arguments(parser)
    parser.set_defaults(func=run)
