"""Every CUDA path of deepemd in one short run (well under 4 minutes), printed as a markdown table.

Run it whenever a session is lent a GPU and paste the table into the README:

- the exact EMD layer from CUDA tensors: ``similarity`` forward + backward, gradients back on
  the GPU, the same numbers as the CPU run;
- Sinkhorn on the GPU (``solve(..., solver="sinkhorn")`` stays on the device), beside the exact
  distance;
- faiss-gpu search (``faiss.get_num_gpus() > 0``): a Flat index moved with
  ``deepemd.retrieval.index.to_gpu`` finds the same neighbours as on the CPU;
- a few DDP steps over NCCL when there are 2 GPUs (the replicas stay identical);
- feature extraction with EfficientNet-Lite0 at 160 px: images/s on the GPU vs the CPU.

Without CUDA (or with ``--cpu-only``) it says so, runs the CPU side of each check quickly (so
the script itself stays tested) and exits 0. Exit status 1 means a check FAILED.

    python benchmarks/device_check.py [--cpu-only] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from deepemd import backbones
from deepemd.emd import cost_matrix, cross_reference_weights, similarity, solve

Row = dict[str, str]


def _row(check: str, device: str, status: str, result: str, seconds: float) -> Row:
    return {"check": check, "device": device, "status": status, "result": result, "seconds": f"{seconds:.2f}"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _problems(device: torch.device) -> int:
    """256 problems on a GPU; 16 on the CPU, whose side of a check only has to run."""
    return 256 if device.type == "cuda" else 16


def _sets(device: torch.device, nodes: int = 25, dim: int = 640):
    batch = _problems(device)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(batch, nodes, dim, generator=gen).relu()
    v = torch.randn(batch, nodes, dim, generator=gen).relu()
    return u.to(device), v.to(device)


def exact_layer(device: torch.device) -> Row:
    """Forward + backward of the exact layer from ``device`` tensors, checked against the CPU."""
    u, v = _sets(device)
    u.requires_grad_(True)
    start = time.perf_counter()
    score = similarity(u, v, temperature=12.5, center=True)
    score.sum().backward()
    _sync(device)
    seconds = time.perf_counter() - start
    cpu_u = u.detach().cpu().requires_grad_(True)
    cpu_score = similarity(cpu_u, v.cpu(), temperature=12.5, center=True)
    cpu_score.sum().backward()
    diff = max(
        float((score.detach().cpu() - cpu_score.detach()).abs().max()), float((u.grad.cpu() - cpu_u.grad).abs().max())
    )
    ok = u.grad.device == u.device and score.device == u.device and diff < 1e-4
    return _row(
        f"exact EMD layer, {len(u)} x 25x25 640-d, fwd+bwd",
        str(device),
        "ok" if ok else "FAIL",
        f"score/grad on {score.device}; max abs diff vs CPU {diff:.1e}",
        seconds,
    )


def sinkhorn(device: torch.device) -> Row:
    """Entropic solve on ``device``: output stays there; distance close to the exact one."""
    u, v = _sets(device)
    cost = cost_matrix(u, v, center=True)
    wu, wv = cross_reference_weights(u, v)
    iters = 2000 if device.type == "cuda" else 100  # the CPU side only has to run
    solve(cost[:2], wu[:2], wv[:2], solver="sinkhorn", n_iter=iters)  # warm-up (CUDA context, kernels)
    _sync(device)
    start = time.perf_counter()
    dist, flow = solve(cost, wu, wv, solver="sinkhorn", n_iter=iters)
    _sync(device)
    seconds = time.perf_counter() - start
    exact, _ = solve(cost.cpu().double(), wu.cpu().double(), wv.cpu().double())
    rel = float(((dist.cpu().double() - exact).abs() / exact).max())
    ok = dist.device == cost.device and flow.device == cost.device and bool(torch.isfinite(dist).all()) and rel < 0.05
    return _row(
        f"Sinkhorn, {len(u)} x 25x25, {iters} iterations at most",
        str(device),
        "ok" if ok else "FAIL",
        f"on {dist.device}; max relative gap to exact {rel:.2e}",
        seconds,
    )


def faiss_search(gpu: bool) -> Row:
    """Flat inner-product search of 1,000 queries over 100,000 vectors, GPU vs CPU results
    (the CPU side alone: 100 over 5,000)."""
    import faiss

    from deepemd.retrieval.index import gpu_count, to_gpu

    if gpu and gpu_count() == 0:
        return _row("faiss search", "gpu", "skipped", "faiss.get_num_gpus() == 0 (faiss-cpu installed)", 0.0)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((100_000 if gpu else 5_000, 128)).astype(np.float32)
    queries = rng.standard_normal((1_000 if gpu else 100, 128)).astype(np.float32)
    cpu = faiss.IndexFlatIP(128)
    cpu.add(base)
    _, want = cpu.search(queries, 10)
    index = to_gpu(cpu) if gpu else cpu
    start = time.perf_counter()
    _, got = index.search(queries, 10)
    seconds = time.perf_counter() - start
    same = float((got == want).mean())
    on_gpu = "Gpu" in type(faiss.downcast_index(index)).__name__
    ok = same > 0.99 and (on_gpu or not gpu)
    return _row(
        f"faiss Flat search, {len(queries):,} q x {len(base):,}",
        type(faiss.downcast_index(index)).__name__,
        "ok" if ok else "FAIL",
        f"{same:.1%} of the top-10 ids as on the CPU",
        seconds,
    )


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    model = DistributedDataParallel(
        backbones.create("resnet12", channels=(16, 32, 64, 128)).cuda(rank), device_ids=[rank]
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(rank)  # each rank its own data
    for _ in range(3):
        loss = model(torch.randn(8, 3, 48, 48, generator=gen).cuda(rank)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    spread = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    gap = float((spread - flat).abs().max())
    Path(out, f"rank{rank}").write_text(f"{gap}")
    dist.destroy_process_group()


def ddp_nccl() -> Row:
    """3 DDP steps of a small ResNet-12 on 2 GPUs over NCCL: both replicas stay identical."""
    if torch.cuda.device_count() < 2:
        return _row("DDP over NCCL, 2 ranks", "cuda", "skipped", f"{torch.cuda.device_count()} GPU(s), needs 2", 0.0)
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
        seconds = time.perf_counter() - start
        gaps = [float(Path(out, f"rank{r}").read_text()) for r in range(2)]
    ok = max(gaps) == 0.0
    return _row(
        "DDP over NCCL, 2 ranks, 3 steps",
        "cuda:0,1",
        "ok" if ok else "FAIL",
        f"largest parameter gap between replicas {max(gaps):.1e}",
        seconds,
    )


@torch.inference_mode()
def extraction(device: torch.device, batch: int, batches: int) -> tuple[Row, float]:
    """EfficientNet-Lite0 at 160 px, random weights (speed does not depend on them)."""
    net = backbones.create("efficientnet_lite0", pretrained=False).to(device).eval()
    x = torch.randn(batch, 3, 160, 160, device=device)
    net(x)  # warm-up (cuDNN autotune, oneDNN primitives)
    _sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        fmap = net(x)
    _sync(device)
    seconds = time.perf_counter() - start
    rate = batch * batches / seconds
    return _row(
        f"EfficientNet-Lite0 160 px, batch {batch}",
        str(device),
        "ok",
        f"{rate:,.0f} images/s, map {tuple(fmap.shape[1:])}",
        seconds,
    ), rate


def run(cpu_only: bool, batch: int) -> list[Row]:
    cuda = torch.cuda.is_available() and not cpu_only
    cpu = torch.device("cpu")
    rows: list[Row] = []
    checks: list[Callable[[], Row]] = [lambda: exact_layer(cpu), lambda: sinkhorn(cpu), lambda: faiss_search(False)]
    if cuda:
        gpu = torch.device("cuda")
        checks += [lambda: exact_layer(gpu), lambda: sinkhorn(gpu), lambda: faiss_search(True), ddp_nccl]
    for check in checks:
        try:
            rows.append(check())
        except Exception as exc:  # a broken path is a row of the table, not the end of the check
            rows.append(_row(getattr(check, "__name__", "check"), "?", "FAIL", f"{type(exc).__name__}: {exc}", 0.0))
    cpu_row, cpu_rate = extraction(cpu, 8 if not cuda else min(batch, 16), 2)
    rows.append(cpu_row)
    if cuda:
        gpu_row, gpu_rate = extraction(torch.device("cuda"), batch, 20)
        gpu_row["result"] += f"; {gpu_rate / cpu_rate:.1f}x the CPU in this run"
        rows.append(gpu_row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-only", action="store_true", help="run only the CPU side of each check (quick)")
    ap.add_argument("--batch", type=int, default=64, help="GPU extraction batch size")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here (torch.cuda.is_available() is False): running the CPU side only")
    elif args.cpu_only:
        print("--cpu-only: running the CPU side only")
    else:
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"CUDA {torch.version.cuda}, torch {torch.__version__}: {names}")
    if args.cpu_only or not torch.cuda.is_available():
        torch.set_num_threads(1)  # small CPU checks: a second OpenMP thread only waits on a busy machine
    start = time.perf_counter()
    rows = run(args.cpu_only, args.batch)
    print("\n| check | device | status | result | s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['check']} | {r['device']} | {r['status']} | {r['result']} | {r['seconds']} |")
    print(f"\n{time.perf_counter() - start:.1f} s in all; load average {os.getloadavg()[0]:.2f}")
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
