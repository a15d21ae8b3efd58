"""Prototype few-shot baseline on the bundled demo set: ImageNet EfficientNet-Lite0 vs random init.

What pretrained features alone give before any DeepEMD: each held-out Omniglot image (test
split of ``demo_root()``: 106 characters from alphabets unseen in training) is embedded ONCE
(global average pool of the backbone map), then N-way K-shot episodes are sampled over the
cached vectors with :class:`deepemd.data.EpisodeSampler`; a query takes the class of the
nearest prototype (mean of its support vectors) by cosine. Mean accuracy with 95% CI.

    python benchmarks/prototype_fewshot.py [--episodes 600 --way 5 --shot 1 --query 15]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from deepemd import backbones
from deepemd.data import EpisodeSampler, ImageDataset, build_transform, demo_root, read_layout
from deepemd.eval import mean_ci95
from deepemd.local import global_features


@torch.no_grad()
def embed(backbone: torch.nn.Module, dataset: ImageDataset, batch_size: int, desc: str) -> torch.Tensor:
    backbone.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    return torch.cat([global_features(backbone(x)) for x, _ in tqdm(loader, desc=desc, leave=False)])


def prototype_accuracies(
    features: torch.Tensor, labels: np.ndarray, way: int, shot: int, query: int, episodes: int, seed: int
) -> np.ndarray:
    """Per-episode accuracy of nearest-prototype (cosine) classification."""
    sampler = EpisodeSampler(labels, way, shot, query, episodes, seed)
    feats = F.normalize(features, dim=1)
    target = torch.arange(way).repeat_interleave(query)
    accs = []
    for episode in sampler:
        support = feats[episode[: way * shot]].reshape(way, shot, -1).mean(1)
        scores = feats[episode[way * shot :]] @ F.normalize(support, dim=1).T
        accs.append((scores.argmax(1) == target).float().mean().item())
    return np.asarray(accs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--input-size", type=int, default=None, help="default: the backbone's own (224)")
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    images = read_layout("folder", demo_root(), "test")
    kw = {"input_size": args.input_size} if args.input_size else {}
    rows = []
    for label, pretrained in (("ImageNet weights", True), ("random init", False)):
        net = backbones.create(args.backbone, pretrained=pretrained, **kw)
        dataset = ImageDataset(images, build_transform(net.default_cfg, train=False))
        start = time.perf_counter()
        features = embed(net, dataset, args.batch_size, label)
        seconds = time.perf_counter() - start
        accs = prototype_accuracies(features, images.labels, args.way, args.shot, args.query, args.episodes, args.seed)
        mean, half = mean_ci95(accs * 100)
        rows.append((label, mean, half, len(images) / seconds))
    print(
        f"{args.backbone} @ {net.default_cfg['input_size']} px, Omniglot demo test split "
        f"({len(images.classes)} classes, {len(images)} images), {args.way}-way {args.shot}-shot, "
        f"{args.query} queries/class, {args.episodes} episodes (seed {args.seed}), cosine to prototypes"
    )
    print(f"| {'weights':<17}| accuracy (%)   | images/s |\n|{'-' * 18}|{'-' * 16}|{'-' * 10}|")
    for label, mean, half, ips in rows:
        print(f"| {label:<17}| {mean:5.2f} +- {half:4.2f} | {ips:8.1f} |")
    print(f"pretrained - random: {rows[0][1] - rows[1][1]:+.2f} points")


if __name__ == "__main__":
    main()
