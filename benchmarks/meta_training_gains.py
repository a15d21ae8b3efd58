"""Does training through the EMD layer help a pretrained backbone? (issue 14)

For each data set: 5-way 1-shot and 5-shot test accuracy (600 seeded episodes, the same episodes
for every model, so differences are paired) of the packaged ImageNet EfficientNet-Lite0 at 84 px
(3x3 map) as it comes, after the paper's meta-training recipe (SGD + Nesterov, temperature 12.5,
cross-reference weights, 5-way 1-shot episodes, the validation-picked checkpoint, the pretrained
start validated first) with ``--bn frozen``, and with ``--bn train``; and retrieval P@1 / RP /
MAP@R (raw and +DeepEMD-FCN) of the same start before and after pml training runs on the train
classes. Every step is a ``deepemd`` command (printed before it runs), so each number can be
re-made by hand; finished steps are skipped on a re-run.

    python benchmarks/build_openclipart.py --out ~/.cache/deepemd/openclipart-96
    nice -n 5 python benchmarks/meta_training_gains.py --data omniglot --part fewshot
    nice -n 5 python benchmarks/meta_training_gains.py --data openclipart \\
        --root ~/.cache/deepemd/openclipart-96 --part fewshot retrieval
    python benchmarks/meta_training_gains.py --data omniglot openclipart --part summary
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

DEEPEMD = [sys.executable, "-m", "deepemd.cli"]
NET = ["--backbone", "efficientnet_lite0", "--weights", "imagenet", "--image-size", "84"]
META = [
    "--way",
    "5",
    "--shot",
    "1",
    "--query",
    "5",
    "--temperature",
    "12.5",
    "--lr",
    "1e-3",
    "--momentum",
    "0.9",
    "--weight-decay",
    "5e-4",
    "--step-size",
    "2",
    "--gamma",
    "0.5",
]
#: Methods per shot count. 1-shot: DeepEMD (EMD to the one support). 5-shot: EMD to the nearest
#: support (+NN); the SFC fit (the paper's 5-shot head) takes ~2 s per episode on this loaded CPU
#: (20 min per 600-episode test), too much for 6 tests here: add "emd" with a faster machine.
TEST_METHODS = {1: ["emd", "protonet"], 5: ["emd_nn", "protonet"]}
#: Retrieval runs: name -> options of `deepemd retrieval train` (embed_dim none: the start is the
#: very network that is evaluated "before", no random head).
RETRIEVAL_RUNS = {
    "contrastive_deepemd": ["--loss", "contrastive", "--distance", "deepemd"],
    "normsoftmax_cosine": ["--loss", "normsoftmax", "--distance", "cosine", "--loss-lr", "1e-2"],
    "contrastive_deepemd_bn_train": ["--loss", "contrastive", "--distance", "deepemd", "--bn", "train"],
}


def run(cmd: list[str], done: Path) -> None:
    """Run one deepemd command unless ``done`` exists (a finished earlier run)."""
    if done.exists():
        print(f"skip (done): {done}", flush=True)
        return
    print("+ deepemd " + " ".join(cmd[len(DEEPEMD) :]), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"})


def data_args(name: str, root: str | None) -> list[str]:
    if name == "omniglot":
        return ["--layout", "folder", "--data-root", "demo"]
    if not root:
        raise SystemExit("--root is needed for openclipart (benchmarks/build_openclipart.py --out ROOT)")
    return ["--layout", "folder", "--data-root", str(Path(root).expanduser())]


def fewshot(name: str, data: list[str], out: Path, args: argparse.Namespace) -> None:
    cache = ["--feature-cache", str(out / "feature-cache")]
    models = {"start": []}
    for bn in ("frozen", "train"):
        train_out = out / f"meta_{bn}"
        run(
            [
                *DEEPEMD,
                "fewshot",
                "train",
                *data,
                *NET,
                *META,
                "--bn",
                bn,
                "--epochs",
                str(args.epochs),
                "--episodes-per-epoch",
                str(args.episodes),
                "--val-episodes",
                str(args.val_episodes),
                "--out",
                str(train_out),
            ],
            train_out / "done",
        )
        (train_out / "done").touch()
        models[f"meta_{bn}"] = ["--checkpoint", str(train_out / "best.pt")]
        if kept_start(train_out):  # validation kept the untrained start: also test what training made
            models[f"meta_{bn}_last"] = ["--checkpoint", str(train_out / "last.pt")]
    for model, extra in models.items():
        for shot in (1, 5):
            test_out = out / f"test_{model}_{shot}shot"
            run(
                [
                    *DEEPEMD,
                    "fewshot",
                    "test",
                    *data,
                    *NET,
                    *extra,
                    "--split",
                    "test",
                    "--way",
                    "5",
                    "--shot",
                    str(shot),
                    "--query",
                    "15",
                    "--episodes",
                    "600",
                    "--methods",
                    *TEST_METHODS[shot],
                    *cache,
                    "--flow-picture",
                    "false",
                    "--out",
                    str(test_out),
                ],
                test_out / "episodes.csv",
            )


def kept_start(train_out: Path) -> bool:
    h = pd.read_csv(train_out / "history.csv")
    return int(h.loc[h["val_accuracy"].idxmax(), "epoch"]) == -1


def retrieval(name: str, data: list[str], out: Path, args: argparse.Namespace) -> None:
    evaluate = [
        *DEEPEMD,
        "retrieval",
        "eval",
        *data,
        "--split",
        "test",
        "--methods",
        "fcn",
        "--rerank-k",
        "100",
        "--flow-queries",
        "0",
    ]
    run([*evaluate, *NET, "--out", str(out / "retrieval_start")], out / "retrieval_start" / "results.csv")
    for run_name in args.retrieval_runs:
        opts = RETRIEVAL_RUNS[run_name]
        train_out = out / f"retrieval_{run_name}"
        run(
            [
                *DEEPEMD,
                "retrieval",
                "train",
                *data,
                *NET,
                "--embed-dim",
                "none",
                "--split",
                "train",
                *opts,
                "--epochs",
                str(args.retrieval_epochs),
                "--steps-per-epoch",
                str(args.retrieval_steps),
                "--lr",
                "1e-4",
                "--batch-size",
                "32",
                "--m-per-class",
                "4",
                "--out",
                str(train_out),
            ],
            train_out / "done",
        )
        (train_out / "done").touch()
        run(
            [*evaluate, "--checkpoint", str(train_out / "checkpoint.pt"), "--out", str(train_out / "eval")],
            train_out / "eval" / "results.csv",
        )


def paired(a: pd.Series, b: pd.Series) -> str:
    d = (b - a).to_numpy()  # episodes.csv holds percent
    return f"{d.mean():+.2f} ± {1.96 * d.std(ddof=1) / np.sqrt(len(d)):.2f}"


def summary(name: str, out: Path) -> str:
    lines = [f"### {name}"]
    for bn in ("frozen", "train"):
        hist = out / f"meta_{bn}" / "history.csv"
        if hist.is_file():
            h = pd.read_csv(hist)
            best = h.loc[h["val_accuracy"].idxmax()]
            lines.append(
                f"meta-train --bn {bn}: val "
                + " -> ".join(f"{v:.2f}" for v in h["val_accuracy"])
                + f" (epochs -1..{int(h['epoch'].max())}; best epoch {int(best['epoch'])})"
            )
    models = ["start"] + [
        m
        for m in ("meta_frozen", "meta_frozen_last", "meta_train", "meta_train_last")
        if (out / f"test_{m}_1shot").is_dir()
    ]
    header = " | ".join(models) + " | " + " | ".join(f"paired: {m} - start" for m in models[1:])
    lines += ["", f"| method | shot | {header} |", "|---" * (2 * len(models) + 1) + "|"]
    for shot in (1, 5):
        tests = {m: out / f"test_{m}_{shot}shot" for m in models}
        if not all((t / "episodes.csv").is_file() for t in tests.values()):
            continue
        res = {m: pd.read_csv(t / "results.csv").set_index("method") for m, t in tests.items()}
        eps = {m: pd.read_csv(t / "episodes.csv") for m, t in tests.items()}
        for method in res["start"].index:
            gains = [paired(eps["start"][method], eps[m][method]) for m in models[1:]]
            lines.append(
                f"| {method} | {shot} | "
                + " | ".join(f"{res[m].loc[method, 'accuracy']:.2f} ± {res[m].loc[method, 'ci95']:.2f}" for m in models)
                + " | "
                + " | ".join(gains)
                + " |"
            )
    rows = [("pretrained start", out / "retrieval_start")] + [
        (f"after {r}", out / f"retrieval_{r}" / "eval") for r in RETRIEVAL_RUNS
    ]  # those that ran
    if any((p / "results.csv").is_file() for _, p in rows):
        lines += ["", "| retrieval (test classes) | method | P@1 | RP | MAP@R |", "|---|---|---|---|---|"]
        for label, path in rows:
            if (path / "results.csv").is_file():
                for _, r in pd.read_csv(path / "results.csv").iterrows():
                    lines.append(f"| {label} | {r['method']} | {r['P@1']:.2f} | {r['RP']:.2f} | {r['MAP@R']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", choices=("omniglot", "openclipart"), required=True)
    ap.add_argument("--root", help="openclipart folder made by benchmarks/build_openclipart.py")
    ap.add_argument("--part", nargs="+", choices=("fewshot", "retrieval", "summary"), default=["fewshot"])
    ap.add_argument("--out", type=Path, default=Path("runs/meta_training_gains"))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--episodes", type=int, default=20, help="meta-training episodes per epoch")
    ap.add_argument("--val-episodes", type=int, default=100)
    ap.add_argument("--retrieval-epochs", type=int, default=1)
    ap.add_argument("--retrieval-steps", type=int, default=25, help="batches of 32 per retrieval epoch")
    ap.add_argument("--retrieval-runs", nargs="+", choices=tuple(RETRIEVAL_RUNS), default=list(RETRIEVAL_RUNS))
    args = ap.parse_args()
    for name in args.data:
        out = args.out / name
        data = data_args(name, args.root) if {"fewshot", "retrieval"} & set(args.part) else []
        if "fewshot" in args.part:
            fewshot(name, data, out, args)
        if "retrieval" in args.part:
            retrieval(name, data, out, args)
        if "summary" in args.part:
            print(summary(name, out), flush=True)


if __name__ == "__main__":
    main()
