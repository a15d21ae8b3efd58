"""Build a few-shot / retrieval folder from Debian's Openclipart drawings (public domain).

    apt-get install -y openclipart-png
    python benchmarks/build_openclipart.py --out ~/.cache/deepemd/openclipart-96

Every folder of ``/usr/share/openclipart/png`` holding at least ``--min-images`` PNGs directly is
one class (named by its path, ``/`` -> ``__``); at most ``--per-class`` of its images (seeded
choice) are written as ``--size`` px RGB squares: transparent parts on white, the drawing scaled
to fit and centred. Some source PNGs are over 100 megapixels, so each file's size is read from
its header first and files above ``--max-pixels`` are skipped before anything is decoded.
``split.csv`` assigns the classes (seeded shuffle) to test / val / train, so the folder layout
reads ``--split train|val|test`` with no class in two splits.
"""

from __future__ import annotations

import argparse
import csv
import random
import warnings
from pathlib import Path

from PIL import Image


def class_folders(source: Path, min_images: int) -> dict[str, list[Path]]:
    found = {}
    for folder in sorted(p for p in source.rglob("*") if p.is_dir()):
        pngs = sorted(folder.glob("*.png"))
        if len(pngs) >= min_images:
            found[str(folder.relative_to(source)).replace("/", "__")] = pngs
    return found


def square_copy(path: Path, size: int, max_pixels: int) -> Image.Image | None:
    """The drawing on a white ``size`` x ``size`` square, or None when too large or unreadable."""
    try:
        with warnings.catch_warnings():  # PIL warns of "decompression bombs" at the header already
            warnings.simplefilter("ignore")
            with Image.open(path) as img:  # lazy: only the header is read here
                if img.width * img.height > max_pixels:
                    return None
                rgba = img.convert("RGBA")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    rgb.thumbnail((size, size), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(rgb, ((size - rgb.width) // 2, (size - rgb.height) // 2))
    return canvas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path("/usr/share/openclipart/png"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--min-images", type=int, default=20, help="classes need this many readable images")
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--max-pixels", type=int, default=25_000_000, help="skip larger source images undecoded")
    ap.add_argument("--test-classes", type=int, default=20)
    ap.add_argument("--val-classes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    written: dict[str, int] = {}
    skipped = 0
    for name, pngs in class_folders(args.source, args.min_images).items():
        rng.shuffle(pngs)
        kept = 0
        for path in pngs:
            if kept == args.per_class:
                break
            img = square_copy(path, args.size, args.max_pixels)
            if img is None:
                skipped += 1
                continue
            (args.out / name).mkdir(parents=True, exist_ok=True)
            img.save(args.out / name / f"{path.stem}.png")
            kept += 1
        if kept >= args.min_images:
            written[name] = kept
        elif kept:  # too few readable images: drop the partial class
            for f in (args.out / name).iterdir():
                f.unlink()
            (args.out / name).rmdir()
    names = sorted(written)
    rng.shuffle(names)
    n_test, n_val = args.test_classes, args.val_classes
    split = {c: "test" for c in names[:n_test]} | {c: "val" for c in names[n_test : n_test + n_val]}
    split |= {c: "train" for c in names[n_test + n_val :]}
    with open(args.out / "split.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "split"])
        w.writerows(sorted(split.items()))
    counts = {s: sum(v == s for v in split.values()) for s in ("train", "val", "test")}
    print(
        f"{len(names)} classes, {sum(written.values())} images ({skipped} skipped) -> {args.out}; "
        f"classes train {counts['train']} / val {counts['val']} / test {counts['test']}"
    )


if __name__ == "__main__":
    main()
