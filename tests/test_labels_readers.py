"""Readers of users' hierarchies (CUB taxonomy table, CIFAR-100 python pickles) on tiny fixtures
made here, and the --hierarchy resolver."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from deepemd.errors import DeepEMDError
from deepemd.labels import (
    LabelTree,
    cifar100_hierarchy,
    cub_taxonomy,
    load_hierarchy,
    names_hierarchy,
)

CUB_ROWS = """class_id,class,order,family,genus,species
1,001.Black_footed_Albatross,Procellariiformes,Diomedeidae,Phoebastria,nigripes
2,002.Laysan_Albatross,Procellariiformes,Diomedeidae,Phoebastria,immutabilis
3,023.Brandt_Cormorant,Suliformes,Phalacrocoracidae,Phalacrocorax,penicillatus
4,029.American_Crow,Passeriformes,Corvidae,Corvus,brachyrhynchos
5,030.Fish_Crow,Passeriformes,Corvidae,Corvus,ossifragus
6,073.Blue_Jay,Passeriformes,Corvidae,Cyanocitta,cristata
"""


def test_cub_taxonomy(tmp_path):
    path = tmp_path / "cub_taxonomy.csv"
    path.write_text(CUB_ROWS)
    tree = cub_taxonomy(path)
    assert tree.leaves[0] == "001.Black_footed_Albatross" and tree.num_classes == 6
    d = tree.distance_matrix()
    i = {c: tree.index(c) for c in tree.leaves}
    assert d[i["029.American_Crow"], i["030.Fish_Crow"]] == 2  # same genus
    assert d[i["029.American_Crow"], i["073.Blue_Jay"]] == 4  # same family
    assert d[i["001.Black_footed_Albatross"], i["073.Blue_Jay"]] == 8  # only the root shared
    assert load_hierarchy(str(path), tree.leaves).leaves == tree.leaves
    (tmp_path / "short.csv").write_text("class,order,family\n001.A,X,Y\n")
    with pytest.raises(DeepEMDError, match="lacks the column"):
        cub_taxonomy(tmp_path / "short.csv")


def _cifar_fixture(root, coarse_of=(0, 0, 1, 1)):
    root.mkdir()
    meta = {"fine_label_names": ["apple", "pear", "bee", "wasp"], "coarse_label_names": ["fruit", "insects"]}
    fine = np.array([0, 1, 2, 3, 0, 2])
    train = {
        "fine_labels": fine.tolist(),
        "coarse_labels": [coarse_of[f] for f in fine],
        "data": np.zeros((6, 12), np.uint8),
    }
    (root / "meta").write_bytes(pickle.dumps(meta))
    (root / "train").write_bytes(pickle.dumps(train))
    return root


def test_cifar100_hierarchy(tmp_path):
    root = _cifar_fixture(tmp_path / "cifar-100-python")
    tree = cifar100_hierarchy(root)
    assert tree.leaves == ("apple", "bee", "pear", "wasp")
    assert tree.distance_matrix().tolist() == [[0, 4, 2, 4], [4, 0, 4, 2], [2, 4, 0, 4], [4, 2, 4, 0]]
    assert load_hierarchy(str(root), ["pear", "apple"]).leaves == ("pear", "apple")
    # a fine class under two superclasses is refused
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta").write_bytes((root / "meta").read_bytes())
    (bad / "train").write_bytes(pickle.dumps({"fine_labels": [0, 0], "coarse_labels": [0, 1]}))
    with pytest.raises(DeepEMDError, match="two superclasses"):
        cifar100_hierarchy(bad)


def test_cifar_pickle_that_names_code_is_refused(tmp_path):
    root = tmp_path / "evil"
    root.mkdir()

    class Boom:
        def __reduce__(self):
            return (print, ("ran",))

    (root / "meta").write_bytes(pickle.dumps({"fine_label_names": Boom()}))
    (root / "train").write_bytes(pickle.dumps({}))
    with pytest.raises(DeepEMDError, match="refusing to load"):
        cifar100_hierarchy(root)


def test_resolver_specs(tmp_path):
    classes = ["Early_Aramaic_character01", "Early_Aramaic_character02", "Greek_character01"]
    tree = load_hierarchy("names", classes)
    assert tree.leaves == tuple(classes)
    assert tree.distance_matrix().tolist() == [[0, 2, 4], [2, 0, 4], [4, 4, 0]]
    assert names_hierarchy(classes).num_classes == 3
    c = load_hierarchy("chain", ["small", "medium", "large"])
    assert c.is_chain and c.distance_matrix()[0].tolist() == [0, 1, 2]
    (tmp_path / "h.csv").write_text("class,parent\nx,g\ny,g\n")
    assert load_hierarchy(str(tmp_path / "h.csv"), ["y", "x"]).leaves == ("y", "x")
    with pytest.raises(DeepEMDError, match="missing from the hierarchy"):
        load_hierarchy(str(tmp_path / "h.csv"), ["x", "z"])
    with pytest.raises(DeepEMDError, match="not found"):
        load_hierarchy(str(tmp_path / "none.csv"), ["x"])
    assert isinstance(load_hierarchy("chain", ["a", "b"]), LabelTree)
