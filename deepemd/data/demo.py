"""The bundled demo set: Omniglot "background small" sets 1 and 2 (MIT, Brenden Lake), shipped
as the original zips in ``deepemd/data/demo/`` and extracted once into the cache as a folder
layout, so every job can run a real few-shot or retrieval demo with no download.

Classes: each character is a class named ``<alphabet>_<character>`` (e.g. ``Greek_character01``),
20 drawings each, 105x105 greyscale PNG (the loader converts to RGB). The two zips share the
alphabets Greek and Latin with identical files; those are kept once. Split (``split.csv``, see
the folder layout): alphabets of set 1 (Balinese, Early_Aramaic, Greek, Korean, Latin: 136
classes) are ``train``; alphabets only in set 2 (Japanese_(katakana), Sanskrit, Tagalog: 106
classes) are ``test``, so test characters come from alphabets never seen in training.
"""

from __future__ import annotations

import csv
import hashlib
import zipfile
from importlib import resources
from pathlib import Path

from deepemd.data.cache import atomic_dir, cache_dir
from deepemd.data.layouts import SPLIT_FILE
from deepemd.errors import DeepEMDError

ZIPS = ("images_background_small1.zip", "images_background_small2.zip")
TRAIN_ZIP = ZIPS[0]


def _bundled(name: str) -> Path:
    path = Path(str(resources.files("deepemd.data") / "demo" / name))
    if not path.is_file():
        raise DeepEMDError(
            "bundled demo file is missing", path, "reinstall deepemd (pip install -e . / pip install deepemd)"
        )
    return path


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for name in ZIPS:
        digest.update(_bundled(name).read_bytes())
    return digest.hexdigest()[:12]


def _extract(out: Path) -> None:
    split: dict[str, str] = {}
    for name in ZIPS:
        with zipfile.ZipFile(_bundled(name)) as archive:
            for member in archive.namelist():
                parts = member.split("/")
                if len(parts) != 4 or not parts[3].endswith(".png"):
                    continue
                _, alphabet, character, filename = parts
                cls = f"{alphabet}_{character}"
                split.setdefault(cls, "train" if name == TRAIN_ZIP else "test")
                target = out / cls / filename
                if not target.exists():
                    target.parent.mkdir(exist_ok=True)
                    target.write_bytes(archive.read(member))
    with open(out / SPLIT_FILE, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", "split"])
        writer.writerows(sorted(split.items()))
    (out / "LICENSE").write_bytes(_bundled("LICENSE").read_bytes())


def demo_root() -> Path:
    """Folder-layout root of the demo set (read it with ``read_layout("folder", root, split)``)."""
    final = cache_dir() / f"omniglot-demo-{_fingerprint()}"
    if not final.is_dir():
        with atomic_dir(final) as tmp:
            _extract(tmp)
    return final
