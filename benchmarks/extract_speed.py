"""Images per second of local-feature extraction, per extractor and backbone, on this machine.

Every extractor runs the backbone once per batch; grid and sampling push m crops per image at
the backbone's input size through it, so their cost is roughly m times FCN's. The table shows
that ratio as measured (same process, same inputs, after one warm-up batch). On a shared
machine the extractors are timed interleaved, round after round, and each keeps its fastest
round (as ``timeit`` advises): other load only ever slows a round down.

    python benchmarks/extract_speed.py [--backbones efficientnet_lite0 resnet12 --batch-size 4 --rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from deepemd import backbones, local

EXTRACTORS = {
    "fcn": ("fcn", {}),
    "fcn+pyramid(3,2,1)": ("fcn", {"pyramid": (3, 2, 1)}),
    "grid(3)": ("grid", {"levels": (3,)}),
    "grid+pyramid(3,2),r2": ("grid", {"levels": (3, 2), "ratio": 2.0}),
    "sampling(25)": ("sampling", {"num_patches": 25}),
}


@torch.no_grad()
def seconds_per_batch(extractor: torch.nn.Module, images: torch.Tensor) -> float:
    start = time.perf_counter()
    extractor(images)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet12"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    from deepemd.device import default_device

    device = default_device(args.device)
    torch.manual_seed(0)
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, "
        f"best of {args.rounds} interleaved rounds after 1 warm-up"
    )
    print("| backbone | input px | extractor | m | images/s | x fcn |\n|---|---|---|---|---|---|")
    for name in args.backbones:
        net = backbones.create(name, pretrained=name in ("efficientnet_lite0", "mobilenetv2")).to(device).eval()
        size = net.default_cfg["input_size"]
        images = torch.randn(args.batch_size, 3, size, size, device=device)
        extractors = {label: local.create(kind, net, **kw) for label, (kind, kw) in EXTRACTORS.items()}
        for extractor in extractors.values():
            seconds_per_batch(extractor, images)  # warm-up: allocator and first-call overheads
        best = dict.fromkeys(extractors, float("inf"))
        for _ in range(args.rounds):
            for label, extractor in extractors.items():
                best[label] = min(best[label], seconds_per_batch(extractor, images))
        base = args.batch_size / best["fcn"]
        for label, extractor in extractors.items():
            ips = args.batch_size / best[label]
            print(f"| {name} | {size} | {label} | {extractor.num_nodes} | {ips:.1f} | {ips / base:.3f} |", flush=True)


if __name__ == "__main__":
    main()
