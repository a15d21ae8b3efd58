"""deepemd.labels: EMD between label distributions over structured label spaces.

Classes connected by an order (a chain) or a hierarchy (a tree) get a ground distance, the
path length between them; :func:`tree_emd` is the exact EMD under that distance in closed form
(``rho = 1``) or its relaxed form (``rho > 1``), and :class:`TreeEMDLoss` trains with it.
"""

from deepemd.labels.emd import edge_mass_difference, tree_emd
from deepemd.labels.losses import LOSS_NAMES, TreeEMDLoss, build_label_loss
from deepemd.labels.readers import (
    cifar100_hierarchy,
    cub_taxonomy,
    level_table,
    load_hierarchy,
    names_hierarchy,
)
from deepemd.labels.tree import LabelTree, chain

__all__ = [
    "LOSS_NAMES",
    "LabelTree",
    "TreeEMDLoss",
    "build_label_loss",
    "chain",
    "cifar100_hierarchy",
    "cub_taxonomy",
    "edge_mass_difference",
    "level_table",
    "load_hierarchy",
    "names_hierarchy",
    "tree_emd",
]
