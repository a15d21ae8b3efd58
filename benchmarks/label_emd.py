"""Label-space EMD: speed of tree_emd against the exact LP and Sinkhorn, and the synthetic
convergence experiment (fit a softmax to a target by gradient descent).

    python benchmarks/label_emd.py                      # both parts, K = 10, 100, 1000
    python benchmarks/label_emd.py --part speed --batch 32 --repeats 5
    python benchmarks/label_emd.py --part convergence --steps 2000

Speed: one batch of ``B`` (prediction, one-hot label) pairs on a random tree with ``K`` leaves,
forward + backward with respect to the predictions, for
  tree_emd (closed form, one segment sum), POT ``ot.emd2`` on the tree's shortest-path matrix
  (the exact LP, one call per pair, gradient = POT's dual potentials through its torch backend),
  and the project's batched log-domain Sinkhorn (``deepemd.emd.sinkhorn``, fixed iterations,
  envelope gradient). Every ratio is against tree_emd measured in the same run.

Convergence: logits ``z`` start at 0 (uniform); plain gradient descent on ``loss(softmax(z), q)``
for a soft target ``q`` on a random tree; the number of steps until the exact EMD falls below
``--tol`` x its starting value (best over a small learning-rate grid), for rho = 1, relaxed
rho = 2, cross-entropy, and Sinkhorn (its transport cost as the loss) at several eps.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from deepemd.labels import LabelTree, tree_emd


def random_tree(K: int, rng: np.random.Generator, branching: int = 4) -> LabelTree:
    """A random tree with K leaves under about K / branching inner nodes (each inner node under
    a random earlier one), random edge lengths in [0.5, 2]."""
    inner = max(1, K // branching)
    parents = {f"i{i}": f"i{int(rng.integers(i))}" for i in range(1, inner)}
    parents.update({f"c{k}": f"i{int(rng.integers(inner))}" for k in range(K)})
    while True:  # prune inner nodes left without children (they would be extra leaves)
        has_child = set(parents.values())
        empty = [n for n in parents if n.startswith("i") and n not in has_child]
        if not empty:
            break
        for n in empty:
            parents.pop(n)
    return LabelTree.from_parents(parents, {c: float(rng.uniform(0.5, 2.0)) for c in parents})


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def speed(sizes: list[int], batch: int, repeats: int, sinkhorn_iter: int, eps_rel: float, budget: float) -> None:
    rng = np.random.default_rng(0)
    print(
        f"## Speed: one batch of {batch} pairs (softmax prediction vs soft target), forward + backward, "
        f"float64, {torch.get_num_threads()} thread(s), load {os.getloadavg()[0]:.2f}"
    )
    print("LP and Sinkhorn at large K are timed on fewer pairs (column 'pairs timed') and scaled to the batch.\n")
    print(
        "| K | depth | tree_emd | ot.emd2 (exact LP, loop) | Sinkhorn batched "
        f"({sinkhorn_iter} it, eps={eps_rel} x mean d) | pairs timed (LP / Sinkhorn) | LP / tree_emd | "
        "Sinkhorn / tree_emd | Sinkhorn rel. error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for K in sizes:
        _speed_row(K, rng, batch, repeats, sinkhorn_iter, eps_rel, budget)


def _speed_row(
    K: int, rng: np.random.Generator, batch: int, repeats: int, sinkhorn_iter: int, eps_rel: float, budget: float
) -> None:
    import ot

    from deepemd.emd.sinkhorn import solve_sinkhorn

    tree = random_tree(K, rng)
    D = tree.distance_matrix()
    depth = int(np.bincount(tree._pair_leaf.numpy()).max())
    logits = torch.tensor(rng.normal(size=(batch, K)))
    target = torch.tensor(rng.dirichlet(np.full(K, 0.5), size=batch))
    target = (target + 1e-9) / (target + 1e-9).sum(1, keepdim=True)
    # pairs the slow methods are timed on: about `budget` multiply-adds of K x K work each
    n_lp = int(min(batch, max(1, budget / (K * K * 20))))
    n_sink = int(min(batch, max(1, budget / (K * K * sinkhorn_iter))))

    def closed():
        z = logits.clone().requires_grad_(True)
        tree_emd(z.softmax(1), target, tree).sum().backward()

    def lp():
        z = logits[:n_lp].clone().requires_grad_(True)
        p = z.softmax(1)
        total = sum(ot.emd2(p[b], target[b], D) for b in range(n_lp))
        total.backward()

    eps = eps_rel * float(D.mean())
    sink_value = {}

    def sinkhorn():
        z = logits[:n_sink].clone().requires_grad_(True)
        dist, _ = solve_sinkhorn(
            D.expand(n_sink, K, K), z.softmax(1), target[:n_sink], eps=eps, n_iter=sinkhorn_iter, tol=0.0
        )
        dist.sum().backward()
        sink_value["d"] = dist.detach()

    t_tree = _time(closed, repeats)
    t_lp = _time(lp, max(1, repeats // 2)) * batch / n_lp
    t_sink = _time(sinkhorn, max(1, repeats // 2)) * batch / n_sink
    exact = tree_emd(logits[:n_sink].softmax(1), target[:n_sink], tree)
    err = float(((sink_value["d"] - exact).abs() / exact).mean())
    print(
        f"| {K} | {depth} | {t_tree * 1e3:.3f} ms | {t_lp * 1e3:.1f} ms | {t_sink * 1e3:.1f} ms | "
        f"{n_lp} / {n_sink} | {t_lp / t_tree:.0f}x | {t_sink / t_tree:.0f}x | {100 * err:.1f}% |",
        flush=True,
    )


def _fit(loss_fn, q: torch.Tensor, tree: LabelTree, lr: float, steps: int, tol: float) -> tuple[int | None, float]:
    """Gradient descent on logits from 0; (first step whose exact EMD <= tol x start, final EMD)."""
    z = torch.zeros_like(q, requires_grad=True)
    start = float(tree_emd(q.new_full(q.shape, 1.0 / q.numel()), q, tree))
    reached = None
    for step in range(1, steps + 1):
        loss = loss_fn(z.softmax(-1))
        (grad,) = torch.autograd.grad(loss, z)
        with torch.no_grad():
            z -= lr * grad
            now = float(tree_emd(z.softmax(-1), q, tree))
        if reached is None and now <= tol * start:
            reached = step
            break
    return reached, now / start


def convergence(K: int, steps: int, tol: float, lrs: list[float], eps_list: list[float], sinkhorn_iter: int) -> None:
    from deepemd.emd.sinkhorn import solve_sinkhorn

    rng = np.random.default_rng(1)
    tree = random_tree(K, rng)
    D = tree.distance_matrix()
    q = torch.tensor(rng.dirichlet(np.full(K, 0.5)))
    q = (q + 1e-6) / (q + 1e-6).sum()
    methods = {
        "EMD (rho=1)": lambda p: tree_emd(p, q, tree, 1.0),
        "relaxed EMD (rho=2)": lambda p: tree_emd(p, q, tree, 2.0),
        "cross-entropy": lambda p: -(q * p.clamp_min(1e-300).log()).sum(),
    }
    mean_d = float(D.mean())
    for e in eps_list:
        methods[f"Sinkhorn (eps={e} x mean d)"] = lambda p, e=e: solve_sinkhorn(
            D[None], p[None], q[None], eps=e * mean_d, n_iter=sinkhorn_iter, tol=1e-9
        )[0][0]
    print(
        f"\n## Convergence: fit softmax(z) to a soft target on a random tree, K={K}; steps until the exact "
        f"EMD <= {tol:g} x its start (best learning rate of {lrs}; at most {steps} steps)"
    )
    print("| loss | steps to reach | best lr | EMD / start after the run (best lr) |")
    print("|---|---|---|---|")
    for name, fn in methods.items():
        results = [(lr, *_fit(fn, q, tree, lr, steps, tol)) for lr in lrs]
        hit = [r for r in results if r[1] is not None]
        lr, reached, final = min(hit, key=lambda r: r[1]) if hit else min(results, key=lambda r: r[2])
        print(
            f"| {name} | {reached if reached is not None else f'not in {steps}'} | {lr:g} | {final:.4f} |", flush=True
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["speed", "convergence", "both"], default="both")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sinkhorn-iter", type=int, default=100)
    parser.add_argument("--eps", type=float, default=0.05, help="Sinkhorn eps for the speed table, x mean distance")
    parser.add_argument("--conv-k", type=int, default=30)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--tol", type=float, default=0.02)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.3, 1.0, 3.0, 10.0, 30.0, 100.0])
    parser.add_argument("--conv-eps", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument(
        "--budget", type=float, default=2e8, help="K x K work allowed per slow timing; fewer pairs are timed at large K"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("speed", "both"):
        speed(args.sizes, args.batch, args.repeats, args.sinkhorn_iter, args.eps, args.budget)
    if args.part in ("convergence", "both"):
        convergence(args.conv_k, args.steps, args.tol, args.lrs, args.conv_eps, args.sinkhorn_iter)


if __name__ == "__main__":
    main()
