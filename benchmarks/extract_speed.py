"""Images per second of local-feature extraction, per extractor and backbone, on this machine.

Every extractor runs the backbone once per batch; grid and sampling push m crops per image at
the backbone's input size through it, so their cost is roughly m times FCN's. The table shows
that ratio as measured (same process, same inputs, after one warm-up batch).

    python benchmarks/extract_speed.py [--backbones efficientnet_lite0 resnet12 --batch-size 4 --repeats 2]
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
def images_per_second(extractor: torch.nn.Module, images: torch.Tensor, repeats: int) -> float:
    extractor(images)  # warm-up (allocator, first-call overheads)
    start = time.perf_counter()
    for _ in range(repeats):
        extractor(images)
    return repeats * images.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet12"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    from deepemd.device import default_device

    device = default_device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"{args.repeats} timed batches after 1 warm-up")
    print("| backbone | input px | extractor | m | images/s | x fcn |\n|---|---|---|---|---|---|")
    for name in args.backbones:
        net = backbones.create(name, pretrained=name in ("efficientnet_lite0", "mobilenetv2")).to(device).eval()
        size = net.default_cfg["input_size"]
        images = torch.randn(args.batch_size, 3, size, size, device=device)
        base = None
        for label, (kind, kw) in EXTRACTORS.items():
            extractor = local.create(kind, net, **kw)
            ips = images_per_second(extractor, images, args.repeats)
            base = base or ips
            print(f"| {name} | {size} | {label} | {extractor.num_nodes} | {ips:.1f} | {ips / base:.3f} |", flush=True)


if __name__ == "__main__":
    main()
