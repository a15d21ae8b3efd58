"""Shared fixtures: a private cache dir, tiny image folders, and a tiny backbone.

Kept small on purpose: anything one test module alone needs lives in that module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_worker():
    """CI runs two xdist workers on two cores: a second torch/FAISS thread per worker only
    oversubscribes the cores (measured: a training test ran 10x slower with two threads)."""
    import faiss

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Demo extraction and exports go to a per-session folder, never the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPEMD_CACHE", str(tmp_path_factory.mktemp("deepemd-cache")))
        yield


def write_image(path: Path, size: tuple[int, int] = (24, 20), seed: int = 0, mode: str = "RGB") -> Path:
    """A small random image (``size`` = width, height) in the format of ``path``'s suffix."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


#: CLI flags of a random 8-channel ResNet-12 at 32 px: a retrieval job in seconds, for tests of
#: behaviour (not accuracy).
TINY = "--backbone resnet12 --backbone-widths 8 8 8 8 --weights none --image-size 32 --pyramid 2 1".split()


def make_class_folders(root: Path, classes: list[str], per_class: int, suffix: str = ".png") -> Path:
    """``<root>/<class>/<i>.png`` for every class; image content differs per file."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"img{i:02d}{suffix}", seed=100 * c + i)
    return root


@pytest.fixture
def folder_dataset(tmp_path) -> Path:
    """Generic layout with 5 classes x 6 images (odd class count on purpose)."""
    return make_class_folders(tmp_path / "folder", [f"class_{c}" for c in "abcde"], 6)


class TinyBackbone(nn.Module):
    """Two strided convs, 8 channels, 4x4 map at 16 px: for tests where weights do not matter."""

    def __init__(self, input_size: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        )
        self.out_channels = 8
        self.default_cfg = {"input_size": input_size, "mean": (0.5,) * 3, "std": (0.5,) * 3}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture
def tiny_backbone() -> nn.Module:
    torch.manual_seed(0)
    return TinyBackbone()
