"""The whole `retrieval eval` (and `fewshot test`) against its floor, stage by stage, in one run.

The sections are ``deepemd bench pipeline`` (:mod:`deepemd.retrieval.bench`: the eval beside the
bare backbone and the plain matmul + solve; ``--fcn224``; ``--compare-inference-dtypes``) and
``deepemd bench episodes`` (:mod:`deepemd.fewshot.bench`, here ``--fewshot``). This script adds
what needs the repository: ``--baseline-commit SHA`` runs the same eval with the code of that
commit (``git archive`` into a temporary folder, installed there with ``pip install --no-deps
--target``, run in a subprocess) so the speed-up is measured on the same folder in the same
run, and ``--ab-rounds N`` alternates the two N times.

    python benchmarks/pipeline_speed.py [--data-root demo|DIR] [--max-classes 20 --per-class 20]
        [--image-size 96] [--baseline-commit 62ea9f4] [--fewshot] [--fcn224]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from deepemd.fewshot.bench import episodes_section
from deepemd.memory import keep_freed_memory
from deepemd.retrieval import bench

REPO = Path(__file__).resolve().parents[1]
#: The options both today's and older EvalConfigs take, so one dict runs either code.
SHARED = (
    "layout",
    "data_root",
    "split",
    "max_classes",
    "per_class",
    "image_size",
    "patch_size",
    "methods",
    "rerank_k",
    "flow_queries",
    "out",
    "backbone",
    "weights",
    "seed",
    "batch_size",
)
RUNNER = """
import json, sys, time
import torch
torch.set_num_threads({threads})
from deepemd.retrieval.config import EvalConfig
from deepemd.retrieval.evaluate import run_eval
cfg = EvalConfig(**json.loads(sys.argv[1]))
start = time.perf_counter()
result = run_eval(cfg, progress=False)
print(json.dumps({{"seconds": time.perf_counter() - start,
                  "rows": [{{k: v for k, v in r.items()}} for r in result["rows"]]}}))
"""


def run_baseline(sha: str, options: dict, threads: int) -> tuple[float, list[dict]]:
    """The same eval with commit ``sha``'s code, in a subprocess (its own install)."""
    work = Path(tempfile.mkdtemp(prefix=f"deepemd-{sha}-"))
    src, site = work / "src", work / "site"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", sha], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(src),
        ],
        check=True,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER.format(threads=threads), json.dumps(options)],
        check=False,
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"baseline {sha} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["seconds"], result["rows"]


def ab_section(args) -> None:
    """The whole eval, today's code and ``--baseline-commit``'s, alternated ``--ab-rounds`` times
    on the same folder (on a shared machine the load drifts between runs: alternating and
    keeping each side's fastest run compares them under the same conditions)."""
    out = tempfile.mkdtemp(prefix="pipeline-ab-")
    options = bench.eval_options(args, out)
    ours, base = [], []
    for _ in range(args.ab_rounds):
        base.append(run_baseline(args.baseline_commit, {**options, "out": out + "-base"}, torch.get_num_threads())[0])
        ours.append(bench.run_current(options)[0])
        print(f"round: baseline {base[-1]:.1f} s, ours {ours[-1]:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    print(
        f"whole eval, best of {args.ab_rounds} alternated runs: baseline {args.baseline_commit} {min(base):.1f} s, "
        f"ours {min(ours):.1f} s: speed-up {min(base) / min(ours):.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(ap)
    ap.add_argument("--baseline-commit", default=None, help="also run this commit's eval on the same folder")
    ap.add_argument(
        "--ab-rounds",
        type=int,
        default=0,
        help="only alternate whole evals of --baseline-commit and today's code this many times",
    )
    ap.add_argument("--fewshot", action="store_true", help="fewshot test section (deepemd bench episodes)")
    ap.add_argument("--fewshot-episodes", type=int, default=50)
    ap.add_argument("--fewshot-image-size", type=int, default=None)
    ap.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="leave glibc's malloc at its defaults (the deepemd command keeps freed memory: deepemd.memory)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.return_freed_memory:
        keep_freed_memory()
    bench.print_uptime()
    if args.ab_rounds:
        ab_section(args)
    elif args.compare_inference_dtypes:
        bench.dtype_section(args)
    elif not args.no_eval:
        wall, options, rows = bench.eval_section(args)
        if args.baseline_commit:
            base, base_rows = run_baseline(
                args.baseline_commit, {**options, "out": options["out"] + "-base"}, torch.get_num_threads()
            )
            print(f"baseline {args.baseline_commit}: {base:.1f} s on the same folder: speed-up {base / wall:.2f}x")
            print("| method | ours P@1 / MAP@R | baseline P@1 / MAP@R |\n|---|---|---|")
            for a, b in zip(rows, base_rows):
                print(f"| {a['method']} | {a['P@1']:.2f} / {a['MAP@R']:.2f} | {b['P@1']:.2f} / {b['MAP@R']:.2f} |")
    if args.fcn224:
        bench.fcn224_section(args)
    if args.fewshot:
        episodes_section(args.data_root, args.fewshot_episodes, args.fewshot_image_size)


if __name__ == "__main__":
    main()
