"""Fashion-MNIST (Debian ``dataset-fashion-mnist``) written once as a folder layout of PNGs.

Class folders are named ``<label>_<name>`` (``0_T-shirt_top`` ... ``9_Ankle_boot``) so that the
folder layout's default split (first half of the sorted classes = train) gives labels 0-4 for
train and 5-9 for test. The train and t10k files are merged (7,000 images per class);
``per_class=k`` keeps the first k of each class in file order.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from deepemd.data.cache import atomic_dir
from deepemd.errors import DeepEMDError

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")
_MARKER = ".deepemd-export.json"


def _read_idx(path: Path, offset: int) -> np.ndarray:
    if not path.is_file():
        raise DeepEMDError("Fashion-MNIST file not found", path, "apt-get install dataset-fashion-mnist")
    try:
        with gzip.open(path, "rb") as fh:
            return np.frombuffer(fh.read(), dtype=np.uint8, offset=offset)
    except (OSError, EOFError) as exc:
        raise DeepEMDError(f"cannot read idx file ({exc})", path, "reinstall dataset-fashion-mnist") from None


def load_fashion_mnist(source: Path = SOURCE) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 images ``(n, 28, 28) uint8`` and labels ``(n,)`` (train first, then t10k)."""
    images, labels = [], []
    for part in ("train", "t10k"):
        x = _read_idx(source / f"{part}-images-idx3-ubyte.gz", 16)
        y = _read_idx(source / f"{part}-labels-idx1-ubyte.gz", 8)
        if x.size != y.size * 28 * 28:
            raise DeepEMDError(f"{y.size} labels but {x.size / 784:g} images", source / f"{part}-images-idx3-ubyte.gz")
        images.append(x.reshape(-1, 28, 28))
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def export_fashion_mnist(out_dir: str | Path, per_class: int | None = None, source: str | Path = SOURCE) -> Path:
    """Write ``<out_dir>/<label>_<name>/<index>.png`` once (atomically); return ``out_dir``."""
    out_dir = Path(out_dir).expanduser()
    settings = {"dataset": "fashion-mnist", "per_class": per_class}
    marker = out_dir / _MARKER
    if out_dir.exists():
        if marker.is_file() and json.loads(marker.read_text()) == settings:
            return out_dir
        raise DeepEMDError(
            "folder exists but is not a Fashion-MNIST export with these settings",
            out_dir,
            "choose another --out folder, or delete this one",
        )
    images, labels = load_fashion_mnist(Path(source))
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    with atomic_dir(out_dir) as tmp:
        for label, name in enumerate(CLASS_NAMES):
            (tmp / f"{label}_{name}").mkdir()
        for i in tqdm(keep, desc="writing Fashion-MNIST PNGs", leave=False, disable=len(keep) < 5000):
            label = int(labels[i])
            Image.fromarray(images[i], mode="L").save(tmp / f"{label}_{CLASS_NAMES[label]}" / f"{i:05d}.png")
        (tmp / _MARKER).write_text(json.dumps(settings))
    return out_dir
