"""Datasets: layouts on disk, safe image loading, transforms, samplers and the bundled demo set.

- :func:`read_layout` -> :class:`ImageList` (paths, labels, classes, root) for the layouts in
  ``docs/data.md``; :class:`ImageDataset` loads them safely (pixel bound, corrupt/truncated files).
- :func:`build_transform` (torchvision.transforms.v2) from a backbone's ``default_cfg``.
- :class:`EpisodeSampler` (N-way K-shot batch sampler), :func:`class_balanced_sampler` (pml).
- :func:`demo_root` (bundled Omniglot, folder layout), :func:`export_fashion_mnist`.
"""

from deepemd.data.cache import cache_dir
from deepemd.data.demo import demo_root
from deepemd.data.fashion_mnist import export_fashion_mnist
from deepemd.data.images import DEFAULT_MAX_PIXELS, ImageDataset, drop_unreadable, load_image
from deepemd.data.layouts import LAYOUTS, ImageList, read_layout
from deepemd.data.samplers import DistributedMPerClassSampler, EpisodeSampler, class_balanced_sampler
from deepemd.data.transforms import build_transform

__all__ = [
    "ImageList",
    "read_layout",
    "LAYOUTS",
    "ImageDataset",
    "drop_unreadable",
    "load_image",
    "DEFAULT_MAX_PIXELS",
    "build_transform",
    "EpisodeSampler",
    "DistributedMPerClassSampler",
    "class_balanced_sampler",
    "demo_root",
    "export_fashion_mnist",
    "cache_dir",
]
