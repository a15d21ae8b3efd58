"""Safe image loading: size checked from the header before any pixel is decoded.

Real collections hold surprises (Openclipart has PNGs over 100 megapixels; downloads get cut
short). ``load_image`` reads the header, refuses images over ``max_pixels`` (default 50 MP) before
decoding, decodes fully (PIL raises on truncation because ``LOAD_TRUNCATED_IMAGES`` stays off)
and converts to RGB (greyscale and palette images included). Every failure is one
DeepEMDError naming the file. ``ImageDataset(skip_bad=True)`` instead checks every image once
up front and drops the bad ones with one counted warning, so labels and samplers stay aligned.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm import tqdm

from deepemd.data.layouts import ImageList
from deepemd.errors import DeepEMDError

DEFAULT_MAX_PIXELS = 50_000_000


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, bound-check, fully decode and convert ``path`` to an RGB PIL image."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise DeepEMDError(f"image is {w}x{h} = {w * h / 1e6:.1f} MP, over the limit of "
                                       f"{max_pixels / 1e6:g} MP", path,
                                       "shrink or remove the image, raise max_pixels, or skip it with --skip-bad (skip_bad=True in Python)")
                img.load()
                return img.convert("RGB")
    except DeepEMDError:
        raise
    except FileNotFoundError:
        raise DeepEMDError("image not found", path, "restore the file or remove it from the dataset") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DeepEMDError(f"image refused as a decompression bomb ({exc})", path,
                           "shrink or remove the image, or skip it with --skip-bad (skip_bad=True in Python)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DeepEMDError(f"cannot read image: corrupt or truncated ({type(exc).__name__}: {exc})", path,
                           "re-export or remove the file, or skip unreadable images with --skip-bad (skip_bad=True in Python)") from None


def drop_unreadable(image_list: ImageList, max_pixels: int = DEFAULT_MAX_PIXELS
                    ) -> tuple[ImageList, list[tuple[Path, str]]]:
    """Check every image once and keep the usable ones, so labels and samplers built from the
    returned list stay aligned; one warning gives the count. Returns (kept, [(path, reason)])."""
    good, skipped = [], []
    for i, path in enumerate(tqdm(image_list.paths, desc="checking images", leave=False,
                                  disable=len(image_list) < 2000)):
        try:
            load_image(path, max_pixels)
            good.append(i)
        except DeepEMDError as exc:
            skipped.append((Path(path), str(exc).splitlines()[0]))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} of {len(image_list)} images that cannot be used "
                      f"(first: {skipped[0][1]})", stacklevel=2)
    return image_list.subset(good), skipped


class ImageDataset(Dataset):
    """``(transform(image), label)`` pairs over an :class:`ImageList` with safe loading."""

    def __init__(self, image_list: ImageList, transform: Callable | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, skip_bad: bool = False):
        self.transform = transform
        self.max_pixels = int(max_pixels)
        self.skipped: list[tuple[Path, str]] = []
        if skip_bad:
            image_list, self.skipped = drop_unreadable(image_list, self.max_pixels)
        self.image_list = image_list

    @property
    def labels(self):
        return self.image_list.labels

    @property
    def classes(self) -> list[str]:
        return self.image_list.classes

    def __len__(self) -> int:
        return len(self.image_list)

    def __getitem__(self, index: int):
        image = load_image(self.image_list.paths[index], self.max_pixels)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.image_list.labels[index])
