"""Label spaces with a ground distance: a rooted tree whose leaves are the classes.

A hierarchy (WordNet, a bird taxonomy, alphabet -> character, nested folders) and an order
(ages, sizes, counts: a *chain*) are both trees with weighted edges; the distance between two
classes is the length of the path between their leaves. :func:`deepemd.labels.tree_emd` needs
only, for every edge, which leaves lie below it, so that is what this type stores.

Construction validates the input once and raises one :class:`~deepemd.errors.DeepEMDError` per
problem: a cycle, several roots, an unknown class, a class that is an inner node, a negative or
non-finite edge length.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from deepemd.errors import DeepEMDError

#: Parent given to top-level nodes whose parent cell is empty in a CSV parent table.
IMPLICIT_ROOT = "(root)"
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _check_length(name: str, value: float | str, where: str | Path | None) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise DeepEMDError(
            f"edge length of '{name}' is not a number: {value!r}",
            where,
            "give a non-negative number (or leave it empty for 1)",
        ) from None
    if not math.isfinite(w) or w < 0:
        raise DeepEMDError(
            f"negative or non-finite edge length {value!r} above '{name}'",
            where,
            "edge lengths must be finite and >= 0",
        )
    return w


class LabelTree:
    """A rooted tree whose leaves, in :attr:`leaves` order, are the classes.

    Build it with :meth:`from_parents`, :meth:`from_folders`, :meth:`from_csv` or :func:`chain`.
    ``w_v`` is the length of the edge above node ``v`` (default 1); the ground distance
    ``d(a, b)`` is the summed length of the edges on the path between leaves ``a`` and ``b``.

    >>> t = LabelTree.from_parents({"cat": "animal", "dog": "animal", "car": "thing",
    ...                             "animal": "root", "thing": "root"})
    >>> t.leaves
    ('car', 'cat', 'dog')
    >>> t.distance_matrix().tolist()
    [[0.0, 4.0, 4.0], [4.0, 0.0, 2.0], [4.0, 2.0, 0.0]]
    """

    def __init__(
        self,
        nodes: Sequence[str],
        parent: Sequence[int],
        length: Sequence[float] | np.ndarray,
        leaves: Sequence[int],
        chain_spacing: Sequence[float] | np.ndarray | None = None,
    ):
        # Internal: the public constructors validate; here nodes[i]'s parent is parent[i] (-1: root).
        self._nodes = tuple(nodes)
        self._parent = np.asarray(parent, dtype=np.int64)
        self._length = np.asarray(length, dtype=np.float64)
        self._leaf_nodes = np.asarray(leaves, dtype=np.int64)
        self._chain = None if chain_spacing is None else np.asarray(chain_spacing, dtype=np.float64)
        self.leaves: tuple[str, ...] = tuple(self._nodes[i] for i in self._leaf_nodes)
        self._index = {name: k for k, name in enumerate(self.leaves)}
        edges = np.flatnonzero(self._parent >= 0)
        self._edge_of_node = np.full(len(self._nodes), -1, dtype=np.int64)
        self._edge_of_node[edges] = np.arange(len(edges))
        self._edge_length = self._length[edges]
        pair_edge, pair_leaf, depth = [], [], np.zeros(len(self.leaves))
        if self._chain is not None:  # chains use CDFs; their O(K^2) leaf-edge pairs are never built
            depth = np.concatenate([[0.0], np.cumsum(self._chain)])
        for k, v in enumerate(self._leaf_nodes if self._chain is None else ()):  # O(K x depth)
            while self._parent[v] >= 0:
                e = self._edge_of_node[v]
                depth[k] += self._length[v]
                if self._length[v] > 0:  # zero-length edges add nothing to any distance
                    pair_edge.append(e)
                    pair_leaf.append(k)
                v = self._parent[v]
        self._pair_edge = torch.as_tensor(np.asarray(pair_edge, dtype=np.int64))
        self._pair_leaf = torch.as_tensor(np.asarray(pair_leaf, dtype=np.int64))
        self._depth = depth  # weighted depth of each leaf
        self._cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_parents(
        cls,
        parents: Mapping[str, str],
        lengths: Mapping[str, float] | None = None,
        classes: Sequence[str] | None = None,
        source: str | Path | None = None,
    ) -> LabelTree:
        """Tree from ``{child: parent}``; ``lengths={child: w}`` sets the edge above ``child``
        (default 1). Leaves are the classes, sorted by name unless ``classes`` gives them (then
        only those leaves are kept, in that order: see :meth:`restrict`). ``source`` names the
        file in error messages."""
        if not parents:
            raise DeepEMDError("the hierarchy is empty", source, "give at least one 'class,parent' pair")
        parents = {str(c): str(p) for c, p in parents.items()}
        for child, par in parents.items():
            if child == par:
                raise DeepEMDError(
                    f"cycle in the hierarchy: '{child}' is its own parent",
                    source,
                    "every node needs a parent higher up; the root has none",
                )
        names = list(dict.fromkeys([*parents.keys(), *parents.values()]))
        roots = [n for n in names if n not in parents]
        _check_acyclic(parents, source)
        if len(roots) != 1:  # acyclic and finite, so at least one root exists
            shown = ", ".join(repr(r) for r in roots[:5]) + (" ..." if len(roots) > 5 else "")
            raise DeepEMDError(
                f"the hierarchy has {len(roots)} roots ({shown})", source, "give the top-level nodes one common parent"
            )
        index = {n: i for i, n in enumerate(names)}
        length = [1.0] * len(names)
        for name, w in (lengths or {}).items():
            name = str(name)
            if name not in index:
                raise DeepEMDError(
                    f"edge length given for unknown class '{name}'", source, "name a node of the hierarchy"
                )
            if name == roots[0]:
                raise DeepEMDError(
                    f"edge length given for the root '{name}', which has no edge above it", source, "drop that length"
                )
            length[index[name]] = _check_length(name, w, source)
        parent = [index[parents[n]] if n in parents else -1 for n in names]
        length[index[roots[0]]] = 0.0
        has_child = set(parents.values())
        leaves = sorted((n for n in names if n not in has_child), key=str)
        tree = cls(names, parent, length, [index[n] for n in leaves])
        return tree if classes is None else tree.restrict(classes, source)

    @classmethod
    def from_csv(cls, path: str | Path, classes: Sequence[str] | None = None) -> LabelTree:
        """Tree from a parent table: one row ``class,parent[,edge_length]`` per edge, an optional
        header row ``class,parent[,edge_length]``; an empty parent means "under the root" and an
        empty length means 1."""
        path = Path(path)
        if not path.is_file():
            raise DeepEMDError("hierarchy file not found", path, "give a CSV with rows 'class,parent[,edge_length]'")
        parents: dict[str, str] = {}
        lengths: dict[str, float] = {}
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["class", "parent"]:
            rows = rows[1:]
        for line, row in enumerate(rows, 1):
            cells = [c.strip() for c in row]
            if len(cells) < 2 or len(cells) > 3 or not cells[0]:
                raise DeepEMDError(
                    f"row {line} is {row!r}, not 'class,parent[,edge_length]'",
                    path,
                    "one edge per row: child name, parent name, optional length",
                )
            child, par = cells[0], cells[1] or IMPLICIT_ROOT
            if child in parents and parents[child] != par:
                raise DeepEMDError(
                    f"'{child}' has two parents ('{parents[child]}' and '{par}')",
                    path,
                    "a tree gives every node one parent",
                )
            parents[child] = par
            if len(cells) == 3 and cells[2]:
                lengths[child] = _check_length(child, cells[2], path)
        return cls.from_parents(parents, lengths, classes, source=path)

    @classmethod
    def from_folders(cls, root: str | Path, classes: Sequence[str] | None = None) -> LabelTree:
        """Tree of nested class folders ``<root>/<a>/<b>/<image>``: every folder that holds images
        is a class, named by its path below ``root`` (``a/b``); its ancestors are the folders
        above it. A folder may hold images or sub-folders, not both (a class is a leaf)."""
        root = Path(root)
        if not root.is_dir():
            raise DeepEMDError("hierarchy folder not found", root, "give the root of <root>/<a>/<b>/<image>")
        parents: dict[str, str] = {}
        for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
            rel = folder.relative_to(root)
            if any(part.startswith(".") for part in rel.parts):
                continue
            subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
            images = [p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES]
            if images and subdirs:
                raise DeepEMDError(
                    "folder holds both images and class folders",
                    folder,
                    "move the images into a sub-folder of their own: classes must be leaves",
                )
            if not images and not subdirs:
                continue
            parents[rel.as_posix()] = rel.parent.as_posix()  # the root itself is "."
        # drop inner folders that lead to no image folder
        keep = set()
        for name in parents:
            if name not in parents.values():
                node = name
                while node in parents and node not in keep:
                    keep.add(node)
                    node = parents[node]
        parents = {c: p for c, p in parents.items() if c in keep}
        if not parents:
            raise DeepEMDError(
                "no class folders with images below the root", root, "lay out the images as <root>/<a>/<b>/<image>"
            )
        return cls.from_parents(parents, None, classes, source=root)

    # ----------------------------------------------------------------- queries
    @property
    def num_classes(self) -> int:
        return len(self.leaves)

    @property
    def is_chain(self) -> bool:
        """Built by :func:`chain`: :func:`tree_emd` then uses CDFs (O(K))."""
        return self._chain is not None

    def parent_of(self, name: str) -> str | None:
        """Name of a node's parent (``None`` for the root)."""
        i = self._nodes.index(name)
        return None if self._parent[i] < 0 else self._nodes[self._parent[i]]

    def index(self, name: str) -> int:
        """Position of class ``name`` in :attr:`leaves`."""
        if name not in self._index:
            raise DeepEMDError(
                f"unknown class '{name}': not a leaf of the hierarchy",
                fix="check the class name, or add it to the hierarchy",
            )
        return self._index[name]

    def restrict(self, classes: Iterable[str], source: str | Path | None = None) -> LabelTree:
        """The tree over ``classes`` only (in that order): leaves not named are pruned, and inner
        nodes left with no leaf below them too; distances between kept classes are unchanged.
        Every name must be a leaf: a name missing from the hierarchy or naming an inner node is
        an error."""
        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise DeepEMDError("a class is named twice", source, "give each class once")
        if not classes:
            raise DeepEMDError("no classes given", source, "name at least one class")
        node_index = {n: i for i, n in enumerate(self._nodes)}
        for c in classes:
            if c not in node_index:
                raise DeepEMDError(
                    f"class '{c}' is missing from the hierarchy",
                    source,
                    "add a row '<class>,<parent>' for it (or fix the name)",
                )
            if c not in self._index:
                raise DeepEMDError(
                    f"class '{c}' is an inner node of the hierarchy, not a leaf",
                    source,
                    "classes must be leaves: give the class its own leaf, or rename the inner node",
                )
        keep = np.zeros(len(self._nodes), dtype=bool)
        for c in classes:
            v = node_index[c]
            while v >= 0 and not keep[v]:
                keep[v] = True
                v = self._parent[v]
        new_index = -np.ones(len(self._nodes), dtype=np.int64)
        new_index[keep] = np.arange(int(keep.sum()))
        nodes = [n for n, k in zip(self._nodes, keep) if k]
        parent = [int(new_index[p]) if p >= 0 else -1 for p, k in zip(self._parent, keep) if k]
        length = self._length[keep]
        spacing = None
        if self._chain is not None:
            pos = np.sort([self._index[c] for c in classes])
            if [self.leaves[i] for i in pos] != classes:
                raise DeepEMDError(
                    "classes of a chain must keep the chain's order",
                    source,
                    f"give them in the order {', '.join(self.leaves)}",
                )
            cum = np.concatenate([[0.0], np.cumsum(self._chain)])
            spacing = np.diff(cum[pos])
        return LabelTree(nodes, parent, length, [int(new_index[node_index[c]]) for c in classes], spacing)

    def incidence(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, w)``: dense ``(E, K)`` 0/1 matrix, ``B[e, k] = 1`` if leaf ``k`` is below edge ``e``
        (zero-length edges omitted), and the ``(E,)`` edge lengths."""
        if self._chain is not None:  # edge i (gap i) lies above classes i+1 .. K-1
            K = self.num_classes
            inc = torch.triu(torch.ones(K - 1, K, dtype=dtype), diagonal=1)
            return inc, torch.as_tensor(self._chain, dtype=dtype)
        used = np.unique(self._pair_edge.numpy())
        remap = {int(e): i for i, e in enumerate(used)}
        inc = torch.zeros(len(used), self.num_classes, dtype=dtype)
        for e, k in zip(self._pair_edge.tolist(), self._pair_leaf.tolist()):
            inc[remap[e], k] = 1
        return inc, torch.as_tensor(self._edge_length[used], dtype=dtype)

    def distance_matrix(
        self, dtype: torch.dtype = torch.float64, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """``(K, K)`` path lengths between classes: ``d(a, b) = depth(a) + depth(b) - 2 depth(lca)``
        with ``depth`` the weighted depth; ``depth(lca(a, b)) = sum_e w_e B[e, a] B[e, b]``."""
        if self._chain is not None:
            cum = np.concatenate([[0.0], np.cumsum(self._chain)])
            d = np.abs(cum[:, None] - cum[None, :])
        else:
            inc, w = self.incidence(torch.float64)
            shared = (inc.T * w) @ inc
            depth = torch.as_tensor(self._depth)
            d = (depth[:, None] + depth[None, :] - 2 * shared).clamp_min(0).numpy()
        return torch.as_tensor(d, dtype=dtype, device=device)

    def _pairs(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(edge of pair, leaf of pair, edge lengths) on ``device``, cached per device and dtype."""
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = (
                self._pair_edge.to(device),
                self._pair_leaf.to(device),
                torch.as_tensor(self._edge_length, dtype=dtype, device=device),
            )
        return self._cache[key]

    def _chain_spacing(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = ("chain", str(device), dtype)
        if key not in self._cache:
            self._cache[key] = (torch.as_tensor(self._chain, dtype=dtype, device=device),)
        return self._cache[key][0]

    @property
    def num_edges(self) -> int:
        return len(self._edge_length)

    def __repr__(self) -> str:
        kind = "chain" if self.is_chain else "tree"
        return f"LabelTree({kind}, {self.num_classes} classes, {len(self._nodes)} nodes)"


def _check_acyclic(parents: Mapping[str, str], source: str | Path | None) -> None:
    done: set[str] = set()
    for start in parents:
        path: list[str] = []
        seen: set[str] = set()
        node = start
        while node in parents and node not in done:
            if node in seen:
                loop = path[path.index(node) :] + [node]
                raise DeepEMDError(
                    f"cycle in the hierarchy: {' -> '.join(loop)}",
                    source,
                    "every node needs a parent higher up; the root has none",
                )
            seen.add(node)
            path.append(node)
            node = parents[node]
        done.update(path)


def chain(K: int, spacing: float | Sequence[float] = 1.0, names: Sequence[str] | None = None) -> LabelTree:
    """Ordered classes ``0 .. K-1`` (or ``names``) with ``spacing`` between neighbours (one
    number, or the ``K-1`` gaps). Stored as a tree (a spine of inner nodes, each class hung
    from its spine node by a zero-length edge) so every function accepts it, and flagged so
    that :func:`tree_emd` uses CDF differences: O(K).

    >>> chain(4, spacing=[1, 2, 1]).distance_matrix()[0].tolist()
    [0.0, 1.0, 3.0, 4.0]
    """
    if int(K) != K or K < 2:
        raise DeepEMDError(f"a chain needs at least 2 classes, got {K}", fix="give K >= 2")
    K = int(K)
    gaps = np.asarray(spacing, dtype=np.float64)
    if gaps.ndim == 0:
        gaps = np.full(K - 1, float(gaps))
    if gaps.shape != (K - 1,):
        raise DeepEMDError(
            f"a chain of {K} classes has {K - 1} gaps, got {gaps.size} spacings", fix="give one number or K-1 numbers"
        )
    for i, g in enumerate(gaps):
        _check_length(f"gap {i}", g, None)
    names = [str(i) for i in range(K)] if names is None else [str(n) for n in names]
    if len(names) != K or len(set(names)) != K:
        raise DeepEMDError(f"a chain of {K} classes needs {K} distinct names", fix="give one name per class")
    spine = [f"(spine {i})" for i in range(K)]
    nodes = spine + names
    parent = [-1] + list(range(K - 1)) + list(range(K))
    length = [0.0, *gaps, *([0.0] * K)]
    return LabelTree(nodes, parent, length, list(range(K, 2 * K)), gaps)
