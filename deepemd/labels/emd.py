r"""EMD between label distributions on a tree (and a chain), in closed form.

On a tree metric the optimal transport plan never has to be searched for: every unit of mass
that crosses edge ``e`` must cross it, and the amount that must cross is the mass difference
below it. So, with :math:`P_e` the mass of ``p`` on the leaves below edge ``e``,

.. math::  \mathrm{EMD}(p, q) = \sum_e w_e \, |P_e - Q_e|

(Evans and Matsen 2012; Martinez et al. 2016, arXiv 1611.07573). On a chain the edges are
the gaps between neighbours and :math:`P_e - Q_e` is a difference of CDFs. This costs
``O(K x depth)`` per pair instead of a ``K x K`` linear program.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepemd.errors import DeepEMDError
from deepemd.labels.tree import LabelTree


def _check_rho(rho: float) -> float:
    try:
        rho = float(rho)
    except (TypeError, ValueError):
        raise DeepEMDError(
            f"rho must be a number, got {rho!r}", fix="use rho = 1 (exact EMD) or rho > 1 (relaxed)"
        ) from None
    if not rho > 0 or rho == float("inf"):
        raise DeepEMDError(
            f"rho must be a finite number > 0, got {rho}", fix="use rho = 1 (exact EMD) or rho > 1 (relaxed, e.g. 2)"
        )
    return rho


def as_distribution(target: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    """``target`` as ``(B, K)`` masses in ``like``'s dtype: integer labels become one-hot rows
    (an out-of-range label is an error), float rows are returned as they are."""
    if target.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        if target.shape != like.shape[:-1]:
            raise DeepEMDError(
                f"integer labels of shape {tuple(target.shape)} do not match predictions {tuple(like.shape)}",
                fix="give one label per row of predictions",
            )
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
            raise DeepEMDError(
                f"unknown class index in labels (range {int(target.min())}..{int(target.max())}, "
                f"the hierarchy has {num_classes} classes)",
                fix="labels must index tree.leaves (0 .. K-1)",
            )
        return F.one_hot(target.long(), num_classes).to(like.dtype)
    if not target.is_floating_point():
        raise DeepEMDError(f"targets must be integer labels or float distributions, got {target.dtype}")
    if target.shape != like.shape:
        raise DeepEMDError(
            f"target distributions of shape {tuple(target.shape)} do not match predictions {tuple(like.shape)}",
            fix="give (B, K) rows over tree.leaves",
        )
    return target.to(like.dtype)


def edge_mass_difference(p: torch.Tensor, q: torch.Tensor, tree: LabelTree) -> torch.Tensor:
    """``(..., E)``: :math:`m_e = P_e - Q_e`, the mass difference below each edge (a segment sum
    of ``p - q`` over the (edge, leaf-below-it) pairs; on a chain, the CDF difference)."""
    diff = p - q
    if tree.is_chain:
        return torch.cumsum(diff, dim=-1)[..., :-1]
    pair_edge, pair_leaf, _ = tree._pairs(diff.device, diff.dtype)
    flat = diff.reshape(-1, diff.shape[-1])
    out = flat.new_zeros(flat.shape[0], tree.num_edges)
    out = out.index_add(1, pair_edge, flat.index_select(1, pair_leaf))
    return out.reshape(*diff.shape[:-1], tree.num_edges)


def tree_emd(p: torch.Tensor, q: torch.Tensor, tree: LabelTree, rho: float = 1.0) -> torch.Tensor:
    r"""EMD between ``p`` and ``q`` under the tree's path metric (``rho=1``), or its relaxed form.

    .. math::  D_\rho(p, q) = \sum_{e} w_e \, |P_e - Q_e|^{\rho}

    where :math:`P_e` is the mass of ``p`` on the leaves below edge ``e`` and :math:`w_e` the
    edge's length. ``rho = 1`` is the exact EMD (the optimal transport cost with the tree's
    shortest-path cost; equal to POT's ``ot.emd2(p, q, tree.distance_matrix())``). ``rho > 1``
    is the *relaxed* form: same minimiser (``p = q``), zero and smooth there, so its gradient
    :math:`\rho\, w_e\, \mathrm{sign}(m_e)|m_e|^{\rho-1}` shrinks near the optimum, where the
    exact EMD's (sub)gradient keeps its size. On a chain with unit gaps, ``rho = 2`` is the
    squared-CDF ("squared EMD", RPS-like) loss. It is *not* :math:`W_\rho^\rho` with cost
    :math:`d^\rho`.

    Parameters
    ----------
    p : (B, K) or (K,) tensor, masses over ``tree.leaves`` (any float dtype, any device).
    q : same shape as ``p``, or (B,) / () integer labels (one-hot targets).
        ``p`` and ``q`` must carry the same total mass (the formula assumes balanced mass).
    tree : :class:`LabelTree` (:func:`chain` for ordered classes).
    rho : float > 0.

    Returns
    -------
    (B,) tensor (a scalar for 1-D input); differentiable: autograd gives the exact gradient
    where every :math:`m_e \ne 0` and a valid subgradient (``sign(0) = 0``) elsewhere.

    Examples
    --------
    >>> import torch
    >>> from deepemd.labels import LabelTree, chain, tree_emd
    >>> t = LabelTree.from_parents({"cat": "animal", "dog": "animal", "car": "root", "animal": "root"})
    >>> t.leaves
    ('car', 'cat', 'dog')
    >>> p = torch.tensor([[0.0, 0.5, 0.5]], dtype=torch.float64)
    >>> tree_emd(p, torch.tensor([1]), t)     # half the mass moves dog -> cat (path 2)
    tensor([1.], dtype=torch.float64)
    >>> tree_emd(torch.tensor([1.0, 0, 0]), torch.tensor([0, 0, 1.0]), chain(3))
    tensor(2.)
    """
    rho = _check_rho(rho)
    if not p.is_floating_point():
        raise DeepEMDError(
            f"predictions must be floating point, got {p.dtype}", fix="pass probabilities, e.g. softmax(logits)"
        )
    if p.dim() not in (1, 2) or p.shape[-1] != tree.num_classes:
        raise DeepEMDError(
            f"predictions of shape {tuple(p.shape)} do not fit a hierarchy of {tree.num_classes} classes",
            fix="give (B, K) or (K,) rows over tree.leaves",
        )
    q = as_distribution(q, tree.num_classes, p)
    m = edge_mass_difference(p, q, tree)
    w = tree._chain_spacing(m.device, m.dtype) if tree.is_chain else tree._pairs(m.device, m.dtype)[2]
    a = m.abs()
    if rho == 1.0:
        cost = a
    elif rho > 1.0:
        cost = a.pow(rho)
    else:  # 0 < rho < 1: |m|^rho has an infinite slope at 0; use the subgradient 0 there
        nz = a > 0
        cost = torch.where(nz, torch.where(nz, a, torch.ones_like(a)).pow(rho), torch.zeros_like(a))
    return (cost * w).sum(-1)
