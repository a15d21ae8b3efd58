r"""Training losses over a label tree: exact EMD, relaxed EMD, and either mixed with cross-entropy.

One class, one signature (``loss(logits_or_probs, labels_or_distributions)``), so that
``--loss ce | emd | relaxed-emd | ce+relaxed-emd`` are configurations of :class:`TreeEMDLoss`
(:data:`LOSS_NAMES`, :meth:`TreeEMDLoss.from_name`).

Which relaxation: this module implements the *edge-wise* form
:math:`\sum_e w_e |P_e - Q_e|^\rho` (:func:`deepemd.labels.tree_emd`), not :math:`(\mathrm{EMD})^\rho`.
Both vanish only at ``p = q`` and both have shrinking gradients near it, but the edge-wise form
with ``rho = 2`` is a smooth quadratic in ``p`` (no kinks where some :math:`m_e = 0`, which
``EMD^2`` keeps), each edge's pull fades as that edge's mass balances, and on a unit chain it is
the squared-CDF loss of Hou et al. (2016), the form the relaxed-EMD papers train with. The plain
EMD gradient :math:`\sum_{e \ni leaf} w_e\,\mathrm{sign}(m_e)` keeps the same size however close
``p`` is to the target, which makes gradient descent overshoot and oscillate near the optimum
(``benchmarks/label_emd.py`` measures this on a synthetic fit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepemd.errors import DeepEMDError
from deepemd.labels.emd import _check_rho, as_distribution, tree_emd
from deepemd.labels.tree import LabelTree

#: ``--loss`` name -> (rho, emd weight, cross-entropy weight).
LOSS_NAMES: dict[str, tuple[float, float, float]] = {
    "ce": (1.0, 0.0, 1.0),
    "emd": (1.0, 1.0, 0.0),
    "relaxed-emd": (2.0, 1.0, 0.0),
    "ce+relaxed-emd": (2.0, 1.0, 1.0),
}


class TreeEMDLoss(nn.Module):
    r"""``emd_weight * mean_b D_rho(softmax(x_b), y_b) + ce_weight * CE(x, y)``.

    Parameters
    ----------
    tree : the label space (its :attr:`~LabelTree.leaves` are the class order of the logits).
    rho : 1 = exact EMD; > 1 the relaxed edge-wise form (see the module docstring; 2 by
        default for "relaxed-emd").
    from_logits : inputs are logits (softmax applied here) or already probabilities.
    ce_weight : weight of cross-entropy added to the EMD term (0: EMD alone).
    emd_weight : weight of the EMD term (0 with ``ce_weight=1``: plain cross-entropy, so CE
        runs through the same code path as the EMD losses in comparisons).
    reduction : "mean" (a scalar) or "none" (one loss per row, as pml's losses expect).

    Targets are integer labels ``(B,)`` or distributions ``(B, K)`` (soft labels).

    >>> import torch
    >>> from deepemd.labels import chain
    >>> loss = TreeEMDLoss(chain(3), rho=1)
    >>> logits = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    >>> round(loss(logits, torch.tensor([0])).item(), 4)   # (1/3 x 1 + 1/3 x 2)
    1.0
    """

    def __init__(
        self,
        tree: LabelTree,
        rho: float = 1.0,
        from_logits: bool = True,
        ce_weight: float = 0.0,
        emd_weight: float = 1.0,
        reduction: str = "mean",
    ):
        super().__init__()
        if not isinstance(tree, LabelTree):
            raise DeepEMDError(
                f"TreeEMDLoss needs a LabelTree, got {type(tree).__name__}",
                fix="build one with LabelTree.from_parents / from_folders / from_csv or chain(K)",
            )
        self.tree, self.rho = tree, _check_rho(rho)
        self.from_logits = bool(from_logits)
        self.ce_weight, self.emd_weight = float(ce_weight), float(emd_weight)
        if self.ce_weight < 0 or self.emd_weight < 0 or self.ce_weight + self.emd_weight == 0:
            raise DeepEMDError(
                f"loss weights must be >= 0 and not both 0 (ce_weight={ce_weight}, emd_weight={emd_weight})"
            )
        if reduction not in ("mean", "none"):
            raise DeepEMDError(f"unknown reduction '{reduction}'", fix="use mean or none")
        self.reduction = reduction

    @classmethod
    def from_name(
        cls,
        name: str,
        tree: LabelTree,
        rho: float | None = None,
        ce_weight: float | None = None,
        from_logits: bool = True,
        reduction: str = "mean",
    ) -> TreeEMDLoss:
        """The loss ``name`` of :data:`LOSS_NAMES`; ``rho`` / ``ce_weight`` override its defaults."""
        if name not in LOSS_NAMES:
            raise DeepEMDError(f"unknown label loss '{name}'", fix=f"choose one of: {', '.join(LOSS_NAMES)}")
        default_rho, emd_w, ce_w = LOSS_NAMES[name]
        rho = default_rho if rho is None or name in ("ce", "emd") else rho
        ce_w = ce_w if ce_weight is None or name in ("ce", "emd", "relaxed-emd") else ce_weight
        return cls(tree, rho=rho, from_logits=from_logits, ce_weight=ce_w, emd_weight=emd_w, reduction=reduction)

    def forward(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if inputs.dim() != 2 or inputs.shape[1] != self.tree.num_classes:
            raise DeepEMDError(
                f"the loss expects (B, {self.tree.num_classes}) scores, got {tuple(inputs.shape)}",
                fix="the classifier needs one output per class of the hierarchy",
            )
        if self.from_logits:
            log_p = F.log_softmax(inputs, dim=1)
        else:
            log_p = inputs.clamp_min(torch.finfo(inputs.dtype).tiny).log()
        per_row = inputs.new_zeros(inputs.shape[0])
        if self.emd_weight:
            probs = log_p.exp() if self.from_logits else inputs
            per_row = per_row + self.emd_weight * tree_emd(probs, target, self.tree, self.rho)
        if self.ce_weight:
            dist = as_distribution(target, self.tree.num_classes, inputs)
            per_row = per_row + self.ce_weight * -(dist * log_p).sum(1)
        return per_row.mean() if self.reduction == "mean" else per_row

    def extra_repr(self) -> str:
        return f"{self.tree!r}, rho={self.rho}, ce_weight={self.ce_weight}, emd_weight={self.emd_weight}"


def build_label_loss(
    name: str,
    hierarchy: str | None,
    classes,
    data_root=None,
    rho: float | None = None,
    ce_weight: float | None = None,
    reduction: str = "mean",
) -> TreeEMDLoss | None:
    """The training commands' ``--loss NAME --hierarchy SPEC`` for the label order ``classes``:
    ``None`` for plain cross-entropy without a hierarchy (the caller's own CE), else a
    :class:`TreeEMDLoss` over ``load_hierarchy(SPEC, classes, data_root)``."""
    from deepemd.labels.readers import load_hierarchy

    if name not in LOSS_NAMES:
        raise DeepEMDError(f"unknown label loss '{name}'", fix=f"choose one of: {', '.join(LOSS_NAMES)}")
    if not hierarchy:
        if name == "ce":
            return None
        raise DeepEMDError(
            f"loss '{name}' needs a label hierarchy", fix="give --hierarchy chain, names, folders or a CSV file"
        )
    return TreeEMDLoss.from_name(
        name, load_hierarchy(hierarchy, list(classes), data_root), rho, ce_weight, reduction=reduction
    )
