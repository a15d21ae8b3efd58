"""Training with EMD over label spaces on small real data: CE vs EMD vs relaxed EMD vs CE + relaxed.

    nice -n 5 python benchmarks/label_training.py --seeds 0 1 2
    python benchmarks/label_training.py --tasks ordinal --seeds 0 --steps 100   # quick look

What is trained: a linear classifier head on *frozen* ImageNet EfficientNet-Lite0 features
(pooled 1280-d, computed once per image and cached under ``--cache``), every loss from the same
initial head for a given seed, full-batch Adam for ``--steps`` steps, no model selection. The
losses are :class:`deepemd.labels.TreeEMDLoss` configurations and the numbers are
:mod:`deepemd.eval.labels` metrics. Tasks:

- ``omniglot``: the bundled Omniglot demo set (``deepemd.data.demo_root()``, Greek and Latin
  kept once), 242 characters of 8 alphabets; tree root -> alphabet -> character; ``--shots``
  training drawings per character (seeded), the rest are test drawings.
- ``fashion``: Fashion-MNIST (Debian ``dataset-fashion-mnist``) with the tree tops {T-shirt,
  pullover, coat, shirt} / bottoms {trouser} / one-piece {dress} / footwear {sandal, sneaker,
  ankle boot} / bags {bag}; ``--fashion-shots`` training images per class drawn (seeded) from
  the train file, ``--fashion-test`` test images per class from the t10k file.
- ``ordinal``: images made here with k = 1..8 discs pasted at random non-overlapping places
  (random radius and grey level on a noisy background): the label k is true by construction;
  a chain of 8 classes; reports MAE in class steps, accuracy within +-1 and RPS.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deepemd.eval.labels import chain_metrics, label_metrics
from deepemd.io import atomic_path
from deepemd.labels import LOSS_NAMES, LabelTree, TreeEMDLoss, chain

FASHION_NAMES = (
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
)
FASHION_GROUPS = {
    "T-shirt_top": "tops",
    "Pullover": "tops",
    "Coat": "tops",
    "Shirt": "tops",
    "Trouser": "bottoms",
    "Dress": "one-piece",
    "Sandal": "footwear",
    "Sneaker": "footwear",
    "Ankle_boot": "footwear",
    "Bag": "bags",
}
SIZE = 96


# ---------------------------------------------------------------- features (frozen, cached)
def _features(images: list[np.ndarray], cache: Path, key: str) -> np.ndarray:
    """Pooled EfficientNet-Lite0 features of grey or RGB uint8 images, cached in ``cache/key.npy``."""
    path = cache / f"{key}.npy"
    if path.is_file():
        return np.load(path)
    from deepemd.backbones import create
    from deepemd.local import global_features

    net = create("efficientnet_lite0", pretrained=True).eval()
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    out = []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(images), 64):
            batch = []
            for img in images[i : i + 64]:
                pil = Image.fromarray(img).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
                batch.append((torch.from_numpy(np.asarray(pil)).permute(2, 0, 1).float() / 255 - mean) / std)
            out.append(global_features(net(torch.stack(batch))).numpy())
    feats = np.concatenate(out).astype(np.float32)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, feats)
    print(f"  features {key}: {feats.shape} in {time.perf_counter() - start:.0f} s", flush=True)
    return feats


def omniglot(cache: Path) -> tuple[np.ndarray, np.ndarray, LabelTree]:
    """All drawings of the demo set, their character labels, and alphabet -> character."""
    from deepemd.data import demo_root

    root = demo_root()  # <alphabet>_<character>/<png>; Greek/Latin of both zips kept once
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for k, c in enumerate(classes):
        files = sorted((root / c).glob("*.png"))
        paths += files
        labels += [k] * len(files)
    key = "omniglot-" + hashlib.sha1("|".join(str(p.relative_to(root)) for p in paths).encode()).hexdigest()[:10]
    cached = cache / f"{key}.npy"
    feats = (
        np.load(cached)
        if cached.is_file()
        else _features([np.asarray(Image.open(p).convert("L")) for p in paths], cache, key)
    )
    alphabet = {c: c.rsplit("_character", 1)[0] for c in classes}
    tree = LabelTree.from_parents(
        {**{c: a for c, a in alphabet.items()}, **{a: "root" for a in set(alphabet.values())}}, classes=classes
    )
    return feats, np.asarray(labels), tree


def fashion(cache: Path, pool: int, test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, LabelTree]:
    """(train-pool features, labels, test features, labels, tree): ``pool`` per class from the
    train file (first in file order), ``test`` per class from t10k."""
    from deepemd.data.fashion_mnist import SOURCE, _read_idx

    parts = {}
    for part, n in (("train", pool), ("t10k", test)):
        x = _read_idx(SOURCE / f"{part}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        y = _read_idx(SOURCE / f"{part}-labels-idx1-ubyte.gz", 8)
        idx = np.concatenate([np.flatnonzero(y == k)[:n] for k in range(10)])
        parts[part] = (_features(list(x[idx]), cache, f"fashion-{part}-{n}"), y[idx].astype(np.int64))
    tree = LabelTree.from_parents(
        {**FASHION_GROUPS, **{g: "clothing" for g in set(FASHION_GROUPS.values())}}, classes=FASHION_NAMES
    )
    return (*parts["train"], *parts["t10k"], tree)


def paste_discs(count: int, rng: np.random.Generator) -> np.ndarray:
    """A 96x96 grey image with exactly ``count`` non-overlapping discs (the label, by construction)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    img = rng.normal(110, 12, (SIZE, SIZE))
    placed: list[tuple[float, float, float]] = []
    while len(placed) < count:
        r = rng.uniform(5, 9)
        cy, cx = rng.uniform(r + 1, SIZE - r - 1, 2)
        if all((cy - y) ** 2 + (cx - x) ** 2 > (r + s + 2) ** 2 for y, x, s in placed):
            placed.append((cy, cx, r))
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.uniform(190, 255)
    return np.clip(img, 0, 255).astype(np.uint8)


def ordinal(cache: Path, pool: int, test: int, classes: int = 8):
    rng = np.random.default_rng(2016)
    out = []
    for n in (pool, test):
        labels = np.repeat(np.arange(classes), n)
        images = [paste_discs(int(k) + 1, rng) for k in labels]
        out += [_features(images, cache, f"discs-{classes}-{pool}-{test}-{'train' if n == pool else 'test'}"), labels]
    return (*out, chain(classes, names=[str(k + 1) for k in range(classes)]))


# ---------------------------------------------------------------- training
def train_head(x: np.ndarray, y: np.ndarray, loss_fn: TreeEMDLoss, seed: int, steps: int, lr: float) -> torch.nn.Linear:
    torch.manual_seed(seed)  # same initial head for every loss of this seed
    head = torch.nn.Linear(x.shape[1], loss_fn.tree.num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(head(xt), yt).backward()
        opt.step()
    return head


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return [((a - mu) / sd).astype(np.float32) for a in (train, *others)]


def pick_per_class(labels: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random indices per class and the rest."""
    chosen = np.concatenate([rng.permutation(np.flatnonzero(labels == k))[:n] for k in np.unique(labels)])
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    return chosen, rest


def run_task(name: str, seeds: list[int], args) -> list[dict]:
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    if name == "omniglot":
        feats, labels, tree = omniglot(cache)
    elif name == "fashion":
        pool_x, pool_y, test_x, test_y, tree = fashion(cache, args.fashion_pool, args.fashion_test)
    else:
        pool_x, pool_y, test_x, test_y, tree = ordinal(cache, args.ordinal_pool, args.ordinal_test)
    D = tree.distance_matrix()
    for seed in seeds:
        rng = np.random.default_rng(seed)
        if name == "omniglot":
            tr, te = pick_per_class(labels, args.shots, rng)
            xtr, xte = standardise(feats[tr], feats[te])
            ytr, yte = labels[tr], labels[te]
        else:
            shots = args.fashion_shots if name == "fashion" else args.ordinal_shots
            tr, _ = pick_per_class(pool_y, shots, rng)
            xtr, xte = standardise(pool_x[tr], test_x)
            ytr, yte = pool_y[tr], test_y
        for loss_name in args.losses:
            loss = TreeEMDLoss.from_name(loss_name, tree)
            head = train_head(xtr, ytr, loss, seed, args.steps, args.lr)
            with torch.no_grad():
                probs = head(torch.from_numpy(xte)).softmax(1).double()
            m = chain_metrics(probs, yte) if tree.is_chain else label_metrics(probs, yte, D)
            rows.append({"task": name, "seed": seed, "loss": loss_name, **m})
        print(f"  {name} seed {seed} done", flush=True)
    return rows


def table(rows: list[dict], keys: list[str]) -> str:
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    head = "| loss | " + " | ".join(keys) + " |"
    lines = [head, "|---|" + "---|" * len(keys)]
    for loss in losses:
        cells = []
        for k in keys:
            vals = np.array([r[k] for r in rows if r["loss"] == loss], dtype=float)
            scale = 100.0 if k in ("top1", "top5", "within1") else 1.0
            digits = 3 if k in ("rps", "mae") else 2
            cells.append(f"{scale * np.nanmean(vals):.{digits}f} ± {scale * np.nanstd(vals):.{digits}f}")
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks", nargs="+", default=["omniglot", "fashion", "ordinal"], choices=["omniglot", "fashion", "ordinal"]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--losses", nargs="+", default=list(LOSS_NAMES), choices=list(LOSS_NAMES))
    parser.add_argument("--shots", type=int, default=5, help="Omniglot training drawings per character")
    parser.add_argument("--fashion-shots", type=int, default=10)
    parser.add_argument("--fashion-pool", type=int, default=100, help="train-file images per class to draw shots from")
    parser.add_argument("--fashion-test", type=int, default=200)
    parser.add_argument("--ordinal-shots", type=int, default=20)
    parser.add_argument("--ordinal-pool", type=int, default=40)
    parser.add_argument("--ordinal-test", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="runs/label-features")
    parser.add_argument("--out", default="runs/label-training.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    setup = (
        f"Frozen ImageNet EfficientNet-Lite0 features ({SIZE} px, pooled) + linear head, full-batch Adam "
        f"lr {args.lr}, {args.steps} steps, seeds {args.seeds}; mean ± std over seeds; "
        f"load {os.getloadavg()[0]:.1f}."
    )
    report = [setup]
    for task in args.tasks:
        rows = run_task(task, args.seeds, args)
        if task == "ordinal":
            keys = ["top1", "mae", "within1", "rps"]
            what = f"ordinal: 1-8 pasted discs, {args.ordinal_shots} train images per count, {args.ordinal_test} test"
        else:
            keys = ["top1", "top5", "severity", "mean_distance", "hd@5"]
            what = (
                f"omniglot: 242 characters / 8 alphabets, {args.shots} train drawings per character, rest test"
                if task == "omniglot"
                else f"fashion: 10 classes / 5 groups, {args.fashion_shots} train images per class, {args.fashion_test} test"
            )
        report += ["", f"### {what}", "", table(rows, keys)]
        print("\n".join(report[-3:]), flush=True)
    report.append(f"\n(total {time.perf_counter() - start:.0f} s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(report) + "\n")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
