"""Safe image loading: size checked from the header before any pixel is decoded.

Real collections hold surprises (Openclipart has PNGs over 100 megapixels; downloads get cut
short). ``load_image`` reads the header, refuses images over ``max_pixels`` (default 50 MP) before
decoding, decodes fully (PIL raises on truncation because ``LOAD_TRUNCATED_IMAGES`` stays off)
and converts to 8-bit RGB (greyscale and palette images included). Every failure is one
DeepEMDError naming the file.

High bit depths: PIL opens 16-bit greyscale PNG/TIFF as ``I;16*`` and PGM/32-bit TIFF as ``I`` or
``F``, and its ``convert("RGB")`` clips those values at 255, turning a 16-bit image white. They
are rescaled here instead (:func:`to_rgb8`). 48/64-bit RGB(A) and 16-bit grey+alpha PNGs need
nothing: PIL already decodes them to 8 bits per channel.

``ImageDataset(skip_bad=True)`` instead checks every image once up front and drops the bad ones
with one counted warning, so labels and samplers stay aligned.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm import tqdm

from deepemd.data.layouts import ImageList
from deepemd.errors import DeepEMDError

DEFAULT_MAX_PIXELS = 50_000_000
#: Full white of a 16-bit sample.
_SIXTEEN_BIT_MAX = 65535


def to_rgb8(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB, scaling high-bit-depth greyscale instead of clipping it.

    ``I;16*`` (and ``I`` holding 0..65535, as PIL gives for PGM and most TIFFs) map 65535 to 255
    (``round(v / 257)``, so an 8-bit image stored as 16 bits comes back unchanged). ``F`` in
    [0, 1] maps 1.0 to 255. ``I`` or ``F`` outside those ranges carry no declared white level,
    so their own min..max is stretched to 0..255 (NaN counts as the minimum).
    """
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img.convert("RGB")
    values = np.asarray(img).astype(np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and low >= 0 and high <= _SIXTEEN_BIT_MAX):
        scaled = values * (255 / _SIXTEEN_BIT_MAX)
    elif img.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255
    else:
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    grey = np.clip(np.rint(np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, bound-check, fully decode and convert ``path`` to an RGB PIL image."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise DeepEMDError(
                        f"image is {w}x{h} = {w * h / 1e6:.1f} MP, over the limit of {max_pixels / 1e6:g} MP",
                        path,
                        "shrink or remove the image, raise max_pixels, or skip it with --skip-bad (skip_bad=True in Python)",
                    )
                img.load()
                return to_rgb8(img)
    except DeepEMDError:
        raise
    except FileNotFoundError:
        raise DeepEMDError("image not found", path, "restore the file or remove it from the dataset") from None
    except PermissionError:  # an OSError, but no sign of a corrupt file
        raise DeepEMDError(
            "cannot read image: permission denied",
            path,
            "make it readable for this user (chmod a+r), or skip it with --skip-bad (skip_bad=True in Python)",
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DeepEMDError(
            f"image refused as a decompression bomb ({exc})",
            path,
            "shrink or remove the image, or skip it with --skip-bad (skip_bad=True in Python)",
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DeepEMDError(
            f"cannot read image: corrupt or truncated ({type(exc).__name__}: {exc})",
            path,
            "re-export or remove the file, or skip unreadable images with --skip-bad (skip_bad=True in Python)",
        ) from None


def drop_unreadable(
    image_list: ImageList, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[ImageList, list[tuple[Path, str]]]:
    """Check every image once and keep the usable ones, so labels and samplers built from the
    returned list stay aligned; one warning gives the count. Returns (kept, [(path, reason)])."""
    good, skipped = [], []
    for i, path in enumerate(
        tqdm(image_list.paths, desc="checking images", leave=False, disable=len(image_list) < 2000)
    ):
        try:
            load_image(path, max_pixels)
            good.append(i)
        except DeepEMDError as exc:
            skipped.append((Path(path), str(exc).splitlines()[0]))
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} of {len(image_list)} images that cannot be used (first: {skipped[0][1]})",
            stacklevel=2,
        )
    return image_list.subset(good), skipped


class ImageDataset(Dataset):
    """``(transform(image), label)`` pairs over an :class:`ImageList` with safe loading."""

    def __init__(
        self,
        image_list: ImageList,
        transform: Callable | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        skip_bad: bool = False,
    ):
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
