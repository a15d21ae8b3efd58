"""Hierarchies users have for the standard sets, and the one resolver the CLI options use.

- :func:`level_table`: a CSV with one row per class and one column per level, coarse to fine
  (the CUB taxonomy ``class,order,family,genus``; CIFAR-100 ``class,superclass``).
- :func:`cub_taxonomy`: that table for CUB-200-2011 (formats in ``docs/data.md``).
- :func:`cifar100_hierarchy`: the 20 superclasses x 5 classes of CIFAR-100, from the python
  version's ``meta`` and ``train`` files.
- :func:`load_hierarchy`: ``--hierarchy folders | names | chain | FILE`` for a list of classes.
"""

from __future__ import annotations

import csv
import pickle
from collections.abc import Sequence
from pathlib import Path

from deepemd.errors import DeepEMDError
from deepemd.labels.tree import IMPLICIT_ROOT, LabelTree, chain

#: Columns of the CUB taxonomy table, coarse to fine, after the class column.
CUB_LEVELS = ("order", "family", "genus")


def level_table(
    path: str | Path, levels: Sequence[str], class_column: str = "class", classes: Sequence[str] | None = None
) -> LabelTree:
    """Tree from a CSV with a header naming ``class_column`` and the ``levels`` (coarse to fine).

    Each row puts its class under ``level_1 / level_2 / ...``; inner nodes are named by their
    path (``Passeriformes/Corvidae``), so equal names at different places stay different. An
    empty cell skips that level for the row. Every edge has length 1.
    """
    path = Path(path)
    if not path.is_file():
        raise DeepEMDError(
            "hierarchy table not found", path, f"give a CSV with columns {class_column},{','.join(levels)}"
        )
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in (class_column, *levels) if c not in header]
        if missing:
            raise DeepEMDError(
                f"hierarchy table lacks the column(s) {', '.join(missing)} (header: {','.join(header)})",
                path,
                f"start the file with the header {class_column},{','.join(levels)}",
            )
        parents: dict[str, str] = {}
        for line, row in enumerate(reader, 2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            cls = row[class_column]
            if not cls:
                raise DeepEMDError(f"line {line}: empty class name", path, "give every row its class")
            node = IMPLICIT_ROOT
            for level in levels:
                if row[level]:
                    child = row[level] if node == IMPLICIT_ROOT else f"{node}/{row[level]}"
                    parents[child] = node
                    node = child
            if cls in parents and parents[cls] != node:
                raise DeepEMDError(
                    f"line {line}: class '{cls}' is listed twice with different ancestors",
                    path,
                    "give each class one row",
                )
            parents[cls] = node
    return LabelTree.from_parents(parents, None, classes, source=path)


def cub_taxonomy(path: str | Path, classes: Sequence[str] | None = None) -> LabelTree:
    """CUB-200-2011 as order -> family -> genus -> species (the 200 classes).

    ``path``: a CSV with the header ``class,order,family,genus`` and one row per class, where
    ``class`` is the class folder name (``001.Black_footed_Albatross``) so the leaves match the
    ``images/`` folders; extra columns (``class_id``, ``species``) are ignored.
    """
    return level_table(path, CUB_LEVELS, "class", classes)


class _PlainUnpickler(pickle.Unpickler):
    """Reads the CIFAR ``meta`` / ``train`` pickles without running code they might name:
    only numpy arrays and plain containers may be rebuilt."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("builtins", "bytes"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DeepEMDError(
            "CIFAR-100 file not found", path, "give the 'cifar-100-python' folder (it holds meta, train, test)"
        )
    try:
        with open(path, "rb") as fh:
            obj = _PlainUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 -- a foreign or truncated pickle raises many types
        raise DeepEMDError(
            f"not a CIFAR-100 python pickle ({type(exc).__name__}: {exc})",
            path,
            "use the files of the python version (cifar-100-python.tar.gz)",
        ) from None
    if not isinstance(obj, dict):
        raise DeepEMDError("not a CIFAR-100 python pickle (no dict inside)", path)
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def cifar100_hierarchy(root: str | Path, classes: Sequence[str] | None = None) -> LabelTree:
    """CIFAR-100 as 20 superclasses x 5 classes, from the python version's files.

    ``root``: the ``cifar-100-python`` folder. ``meta`` gives ``fine_label_names`` and
    ``coarse_label_names``; ``train`` gives each image's ``fine_labels`` and ``coarse_labels``,
    from which each fine class's superclass is read (and checked to be unique). Leaves are the
    fine names (``apple`` ... ``worm``), inner nodes the superclass names. A CSV
    ``class,parent`` (fine,coarse) read by :meth:`LabelTree.from_csv` gives the same tree.
    """
    root = Path(root)
    meta, train = _read_pickle(root / "meta"), _read_pickle(root / "train")
    try:
        fine_names, coarse_names = list(meta["fine_label_names"]), list(meta["coarse_label_names"])
        fine, coarse = list(train["fine_labels"]), list(train["coarse_labels"])
    except KeyError as exc:
        raise DeepEMDError(
            f"CIFAR-100 file lacks the key {exc}",
            root,
            "meta needs fine_label_names / coarse_label_names, train fine_labels / coarse_labels",
        ) from None
    if len(fine) != len(coarse):
        raise DeepEMDError("train has different numbers of fine and coarse labels", root / "train")
    parents: dict[str, str] = {}
    for f, c in zip(fine, coarse):
        name, sup = fine_names[int(f)], coarse_names[int(c)]
        if parents.setdefault(name, sup) != sup:
            raise DeepEMDError(
                f"class '{name}' appears under two superclasses ('{parents[name]}', '{sup}')",
                root / "train",
                "use the original CIFAR-100 files",
            )
    if set(parents.values()) & set(parents):
        raise DeepEMDError("a superclass has the name of a class", root / "meta")
    for sup in set(parents.values()):
        parents[sup] = IMPLICIT_ROOT
    return LabelTree.from_parents(parents, None, classes, source=root)


def names_hierarchy(classes: Sequence[str], separator: str = "_") -> LabelTree:
    """Tree from class names ``<group><sep><member>`` split at the *last* separator (the demo's
    ``Early_Aramaic_character01`` -> alphabet ``Early_Aramaic``); names without it hang from the
    root."""
    parents: dict[str, str] = {}
    for name in classes:
        group = name.rsplit(separator, 1)[0] if separator in name else ""
        if group:
            parents[f"{group}{separator}*"] = IMPLICIT_ROOT
            parents[name] = f"{group}{separator}*"
        else:
            parents[name] = IMPLICIT_ROOT
    return LabelTree.from_parents(parents, None, classes)


def load_hierarchy(spec: str, classes: Sequence[str], data_root: str | Path | None = None) -> LabelTree:
    """The tree for ``--hierarchy SPEC`` over ``classes`` (in that order, the label order).

    ``chain``: the classes in their order, unit gaps. ``names``: groups from the class names
    (:func:`names_hierarchy`). ``folders``: nested folders of ``data_root``
    (:meth:`LabelTree.from_folders`). A ``.csv`` file: a parent table ``class,parent[,edge_length]``,
    or a level table if its header is ``class,order,family,genus`` (CUB). A folder holding
    ``meta`` and ``train``: CIFAR-100's python files.
    """
    if not spec:
        raise DeepEMDError("no hierarchy given", fix="use --hierarchy chain, names, folders or a CSV file")
    if spec == "chain":
        return chain(len(classes), names=classes)
    if spec == "names":
        return names_hierarchy(classes)
    if spec == "folders":
        if not data_root:
            raise DeepEMDError("--hierarchy folders needs the data root", fix="give --data-root")
        return LabelTree.from_folders(data_root, classes)
    path = Path(spec)
    if path.is_dir() and (path / "meta").is_file():
        return cifar100_hierarchy(path, classes)
    if not path.is_file():
        raise DeepEMDError("hierarchy file not found", path, "give a CSV file, or chain / names / folders")
    with open(path, newline="", encoding="utf-8") as fh:
        header = [c.strip().lower() for c in next(csv.reader(fh), [])]
    if "class" in header and all(c in header for c in CUB_LEVELS):
        return cub_taxonomy(path, classes)
    return LabelTree.from_csv(path, classes)
