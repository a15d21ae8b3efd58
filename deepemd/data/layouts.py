"""Readers for the dataset layouts users already have on disk; each returns an :class:`ImageList`.

Layouts (trees in ``docs/data.md``):

- ``folder``: ``<root>/<class>/<image>``. Split ``train`` / ``test`` = first / second half of the
  classes sorted by name (the first half gets the extra class when the count is odd), ``all`` =
  every class; a ``<root>/split.csv`` (header ``class,split``; split one of train/val/test)
  overrides the halves, and then ``val`` works too.
- ``miniimagenet`` and ``cub``: ``<root>/images/`` + ``<root>/split/{train,val,test}.csv``
  (header, then ``filename,label`` rows; filename relative to ``images/``).
- ``tieredimagenet``, ``fc100``: ``<root>/{train,val,test}/<class>/<image>``.
- ``cifarfs``: ``<root>/{meta-train,meta-val,meta-test}/<class>/<image>``.
- ``cub-retrieval``: CUB-200-2011 (``images.txt``, ``image_class_labels.txt``, ``classes.txt``,
  ``images/``): classes 1-100 = train, 101-200 = test, ``all`` = both.

Listing rules, the same in every layout that lists folders: an image is a regular file with an
image suffix (a folder named ``x.png`` is not one), hidden names are skipped, and anything inside
an ``exclude`` folder (the command's ``--out``, when it lies inside the data root) is never listed,
so a run's own output never becomes an image or a class of the next run.

Every failure (missing root, split file, class folder, listed image) is one DeepEMDError naming it.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepemd.errors import DeepEMDError
from deepemd.registry import Registry

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
SPLIT_FILE = "split.csv"


@dataclass
class ImageList:
    """Image paths with int64 labels indexing ``classes``; ``root`` is where they were read from."""

    paths: list[Path]
    labels: np.ndarray
    classes: list[str]
    root: Path

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices) -> ImageList:
        idx = np.asarray(indices, dtype=np.int64)
        return ImageList([self.paths[i] for i in idx], self.labels[idx], self.classes, self.root)


def _build(items: list[tuple[Path, str]], root: Path, classes: list[str] | None = None) -> ImageList:
    classes = classes if classes is not None else sorted({c for _, c in items})
    index = {c: i for i, c in enumerate(classes)}
    return ImageList([p for p, _ in items], np.array([index[c] for _, c in items], dtype=np.int64), classes, root)


def _require_dir(path: Path, what: str, fix: str) -> None:
    if not path.is_dir():
        raise DeepEMDError(f"{what} not found", path, fix)


def is_image_file(path: Path) -> bool:
    """A regular file (or a link to one) with an image suffix and a name that is not hidden."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


class _Excluded:
    """Folders whose contents are never listed (resolved once, compared by resolved path)."""

    def __init__(self, folders: Iterable[str | Path | None] = ()):
        self.folders = {Path(f).expanduser().resolve() for f in folders if f}

    def __call__(self, path: Path) -> bool:
        if not self.folders:
            return False
        resolved = path.resolve()
        return any(resolved == f or f in resolved.parents for f in self.folders)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def _class_dirs(root: Path, excluded: _Excluded) -> list[Path]:
    """Class folders: listing is one level deep, so an excluded folder matters only as a class
    (one inside a class folder never adds images) and is checked once per class, not per image."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and not excluded(p))


def _read_class_folders(root: Path, class_names: list[str]) -> ImageList:
    if not class_names:
        raise DeepEMDError("folder has no class sub-folders", root, "the layout is <folder>/<class>/<image>")
    items = []
    for name in class_names:
        images = _images_in(root / name)
        if not images:
            raise DeepEMDError(
                "class folder holds no images",
                root / name,
                f"add images ({', '.join(sorted(IMAGE_SUFFIXES))}) or remove the folder",
            )
        items += [(p, name) for p in images]
    return _build(items, root, class_names)


def read_split_file(path: Path) -> dict[str, str]:
    """``class,split`` CSV -> {class: split}."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["class", "split"]:
        raise DeepEMDError(
            "split file must start with the header 'class,split'",
            path,
            "write one 'class,split' header, then one '<class folder>,<train|val|test>' row per class",
        )
    out = {}
    for n, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2 or row[1].strip() not in ("train", "val", "test"):
            raise DeepEMDError(f"line {n}: expected '<class>,<train|val|test>', got {','.join(row)!r}", path)
        out[row[0].strip()] = row[1].strip()
    return out


def read_folder(
    root: Path, split: str, split_file: Path | None = None, exclude: Iterable[str | Path | None] = ()
) -> ImageList:
    _require_dir(root, "dataset root", "give the folder that holds one sub-folder per class")
    excluded = _Excluded(exclude)
    classes = [p.name for p in _class_dirs(root, excluded)]
    if split_file is not None and not Path(split_file).is_file():
        raise DeepEMDError("split file not found", split_file, "check the path; its format is 'class,split' rows")
    split_file = Path(split_file) if split_file is not None else root / SPLIT_FILE
    if split == "all":
        return _read_class_folders(root, classes)
    if split_file.is_file():
        assignment = read_split_file(split_file)
        missing = [c for c in assignment if c not in classes]
        if missing:
            raise DeepEMDError(
                f"split file names class '{missing[0]}' which has no folder",
                split_file,
                "fix the class name or create the folder",
            )
        chosen = [c for c in classes if assignment.get(c) == split]
        if not chosen:
            raise DeepEMDError(
                f"split file assigns no class to split '{split}'", split_file, f"add rows '<class>,{split}'"
            )
        return _read_class_folders(root, chosen)
    if split not in ("train", "test"):
        raise DeepEMDError(
            f"split '{split}' needs a split file",
            split_file,
            "without split.csv the folder layout has only 'train' (first half of the sorted "
            "classes), 'test' (second half) and 'all'",
        )
    half = (len(classes) + 1) // 2
    return _read_class_folders(root, classes[:half] if split == "train" else classes[half:])


def _read_csv_split(root: Path, split: str, layout: str) -> ImageList:
    images = root / "images"
    csv_path = root / "split" / f"{split}.csv"
    _require_dir(root, "dataset root", f"give the {layout} folder that holds images/ and split/")
    _require_dir(images, "images folder", f"the {layout} layout keeps every image under <root>/images/")
    if not csv_path.is_file():
        raise DeepEMDError(
            f"split file for '{split}' not found",
            csv_path,
            "the layout needs split/{train,val,test}.csv with rows 'filename,label'",
        )
    with open(csv_path, newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and "".join(r).strip()][1:]  # first row is the header
    items = []
    for n, row in enumerate(rows, start=2):
        if len(row) < 2:
            raise DeepEMDError(f"line {n}: expected 'filename,label'", csv_path)
        items.append((images / row[0].strip(), row[1].strip()))
    if not items:
        raise DeepEMDError("split file lists no images", csv_path, "add 'filename,label' rows below the header")
    missing = next((p for p, _ in items if not p.is_file()), None)
    if missing is not None:
        raise DeepEMDError(f"image listed in {csv_path.name} not found", missing, "restore the file or remove its row")
    return _build(items, root)


def _read_split_folders(root: Path, split: str, names: dict[str, str], layout: str, excluded: _Excluded) -> ImageList:
    _require_dir(root, "dataset root", f"give the {layout} folder that holds {', '.join(names.values())}/")
    if split not in names:
        raise DeepEMDError(f"unknown split '{split}' for layout {layout}", fix=f"choose one of: {', '.join(names)}")
    folder = root / names[split]
    _require_dir(folder, f"split folder for '{split}'", f"the {layout} layout is <root>/{names[split]}/<class>/<image>")
    return _read_class_folders(folder, [p.name for p in _class_dirs(folder, excluded)])


def _read_table(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise DeepEMDError(
            "CUB-200-2011 file not found",
            path,
            "give the CUB_200_2011 folder holding images.txt, image_class_labels.txt, classes.txt, images/",
        )
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise DeepEMDError(f"line {n}: expected '<id> <value>'", path)
            rows.append((parts[0], parts[1].strip()))
    return rows


def read_cub_retrieval(root: Path, split: str) -> ImageList:
    _require_dir(root, "dataset root", "give the CUB_200_2011 folder")
    images = dict(_read_table(root / "images.txt"))
    labels = dict(_read_table(root / "image_class_labels.txt"))
    class_names = {int(k): v for k, v in _read_table(root / "classes.txt")}
    wanted = {"train": range(1, 101), "test": range(101, 201), "all": range(1, 201)}
    if split not in wanted:
        raise DeepEMDError(f"unknown split '{split}' for layout cub-retrieval", fix="choose train, test or all")
    keep = set(wanted[split])
    items = [
        (root / "images" / rel, class_names[int(labels[i])]) for i, rel in images.items() if int(labels[i]) in keep
    ]
    if not items:
        raise DeepEMDError(f"no images of classes {min(keep)}-{max(keep)}", root / "image_class_labels.txt")
    missing = next((p for p, _ in items if not p.is_file()), None)
    if missing is not None:
        raise DeepEMDError("image listed in images.txt not found", missing, "restore the file")
    ordered = [class_names[c] for c in sorted(keep) if c in class_names and class_names[c] in {n for _, n in items}]
    return _build(items, root, ordered)


_STANDARD_SPLITS = {"train": "train", "val": "val", "test": "test"}
_CIFARFS_SPLITS = {"train": "meta-train", "val": "meta-val", "test": "meta-test"}

#: ``reader(root, split, excluded) -> ImageList``: one per layout a user may have on disk.
Reader = Callable[[Path, str, "_Excluded"], ImageList]
#: Every dataset layout by name (``--layout``); a split file is the folder layout's alone.
LAYOUTS: Registry[Reader] = Registry("dataset layout", normalise=lambda name: name.lower().replace("_", "-"))
LAYOUTS.add("folder", lambda root, split, excluded: read_folder(root, split, None, excluded.folders))
LAYOUTS.add("miniimagenet", lambda root, split, excluded: _read_csv_split(root, split, "miniimagenet"))
LAYOUTS.add(
    "tieredimagenet",
    lambda root, split, excluded: _read_split_folders(root, split, _STANDARD_SPLITS, "tieredimagenet", excluded),
)
LAYOUTS.add(
    "cifarfs", lambda root, split, excluded: _read_split_folders(root, split, _CIFARFS_SPLITS, "cifarfs", excluded)
)
LAYOUTS.add(
    "fc100", lambda root, split, excluded: _read_split_folders(root, split, _STANDARD_SPLITS, "fc100", excluded)
)
LAYOUTS.add("cub", lambda root, split, excluded: _read_csv_split(root, split, "cub"))
LAYOUTS.add("cub-retrieval", lambda root, split, excluded: read_cub_retrieval(root, split))


def read_layout(
    layout: str,
    root: str | Path,
    split: str,
    split_file: str | Path | None = None,
    exclude: Iterable[str | Path | None] = (),
) -> ImageList:
    """Read ``split`` of the dataset at ``root`` stored in ``layout`` (see the module docstring);
    nothing inside an ``exclude`` folder (pass the command's output folder) is listed."""
    root = Path(root).expanduser()
    key = LAYOUTS.key(layout)
    if key == "folder" and split_file:
        return read_folder(root, split, Path(split_file), exclude)
    if split_file is not None:
        raise DeepEMDError(f"a split file is only read by the folder layout, not {key}", split_file)
    return LAYOUTS.get(key)(root, split, _Excluded(exclude))
