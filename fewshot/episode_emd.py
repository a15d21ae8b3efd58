"""EMD scores of many episodes at once: the numbers of :func:`deepemd.emd.pairwise_similarity`
on each episode's (queries x supports) block, from one batched matmul and ONE solve for all.

Two things pairwise_similarity, called once per episode, cannot share across episodes:

- the per-set work (channel centring, node norms, set means): a test run samples the same few
  thousand images into thousands of episodes, so :class:`NodeSets` does it once per image and
  episodes gather rows of it;
- the solve: an episode is a few hundred small LPs; a batch of episodes hands the solver's
  threads thousands at once, and pays the call's set-up once.

``a (E,P,m,d)`` against ``b (E,Q,n,d)`` scores every set of ``a[e]`` against every set of
``b[e]``, never across episodes (a plain pairwise call on the stacked sets would solve ``E``
times too many problems).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepemd.emd import solve
from deepemd.emd.checks import require_finite
from deepemd.emd.features import WEIGHT_EPS, centred, equal_mass, safe_norms, working_dtype
from deepemd.errors import DeepEMDError


@dataclass
class NodeSets:
    """Local feature sets ``(..., m, d)`` with what the EMD cost and weights need of each set,
    computed once per set: ``feats`` (what the cost's dot products are taken of: channel-centred
    when ``center``, scaled per node where their norms would leave the dtype's safe range, as
    pairwise_similarity does), ``norms`` (theirs), ``set_means`` (``(..., d)`` raw mean node),
    ``means`` (``(..., m)`` each node's raw channel mean when centred, else None) and
    ``scaled`` (whether ``feats`` were rescaled: then raw products need the raw features).
    The raw features themselves are gathered only if asked for (:attr:`raw`): products with
    them follow from ``feats`` and ``means`` (:func:`raw_products`)."""

    feats: torch.Tensor
    norms: torch.Tensor
    set_means: torch.Tensor
    means: torch.Tensor | None
    scaled: bool
    raw_rows: tuple[torch.Tensor, torch.Tensor | slice]  # (all raw features, this set's rows)

    @classmethod
    def of(cls, x: torch.Tensor, center: bool) -> "NodeSets":
        x = x.to(working_dtype(x))
        f = centred(x) if center else x
        norms = torch.linalg.vector_norm(f, dim=-1)
        require_finite("local features", x, norms)
        safe, norms = safe_norms(f, norms)
        return cls(safe, norms, x.mean(dim=-2), x.mean(dim=-1) if center else None, safe is not f, (x, slice(None)))

    @property
    def raw(self) -> torch.Tensor:
        source, rows = self.raw_rows
        return source[rows]

    def take(self, idx: torch.Tensor) -> "NodeSets":
        """Rows ``idx`` of the leading axis (``(E, n)`` indices give ``(E, n, ...)`` sets)."""
        if not isinstance(self.raw_rows[1], slice):
            raise DeepEMDError("NodeSets.take indexes the sets of a whole run, not a selection")
        return NodeSets(
            self.feats[idx],
            self.norms[idx],
            self.set_means[idx],
            None if self.means is None else self.means[idx],
            self.scaled,
            (self.raw_rows[0], idx),
        )


def raw_products(x: NodeSets, w: torch.Tensor) -> torch.Tensor:
    """``raw (E,P,m,d) @ w (E,d,k) -> (E,P*m,k)``, from the cost features when they are the raw
    ones centred: ``raw = feats + mean``, so ``raw @ w = feats @ w + mean * w.sum(d)`` (exact up to
    rounding, and the raw features are never gathered)."""
    e, p, m, d = x.feats.shape
    if x.scaled:
        return torch.bmm(x.raw.reshape(e, p * m, d), w)
    out = torch.bmm(x.feats.reshape(e, p * m, d), w)
    if x.means is not None:
        out = out + x.means.reshape(e, p * m, 1) * w.sum(dim=1, keepdim=True)
    return out


def node_dots(a: NodeSets, b: NodeSets) -> torch.Tensor:
    """``(E,P,m,d), (E,Q,n,d) -> (E,P,m,Q,n)``: dot products of the cost features of every node
    pair of every set pair within each episode, one batched matmul (the expensive part)."""
    e, p, m, d = a.feats.shape
    q, n = b.feats.shape[1:3]
    return torch.bmm(a.feats.reshape(e, p * m, d), b.feats.reshape(e, q * n, d).transpose(1, 2)).reshape(e, p, m, q, n)


def raw_dots(dots: torch.Tensor, a: NodeSets, b: NodeSets) -> torch.Tensor | None:
    """The raw features' dot products from :func:`node_dots`, or None where they do not follow
    (rescaled nodes). Centred: ``u . v = uc . vc + d * mean(u) * mean(v)``, a sum of terms no
    larger than ``|u| |v|``, so no precision is lost (the other way round would cancel)."""
    if a.scaled or b.scaled:
        return None
    if a.means is None or b.means is None:
        return dots
    d = a.feats.shape[-1]
    return dots + d * a.means[:, :, :, None, None] * b.means[:, None, None, :, :]


def episode_similarity(
    a: NodeSets,
    b: NodeSets,
    weights: str = "cross",
    solver: str = "exact",
    temperature: float = 1.0,
    dots: torch.Tensor | None = None,
    **opts,
) -> torch.Tensor:
    """``(E,P,m,d), (E,Q,n,d) -> (E,P,Q)``: ``pairwise_similarity(a[e], b[e], ...)`` for every
    episode ``e`` (same weights, cost, solver and score; centred if the sets were made so),
    differentiable w.r.t. the features the sets were made from.

    ``dots``: :func:`node_dots` ``(a, b)`` when the caller already has them.
    """
    if weights not in ("cross", "uniform"):
        raise DeepEMDError(f"unknown weights {weights!r} for pairwise scoring", fix="use one of ['cross', 'uniform']")
    sa, sb = a.feats.shape, b.feats.shape
    if len(sa) != 4 or len(sb) != 4 or sa[0] != sb[0] or sa[3] != sb[3]:
        raise DeepEMDError(
            f"episode sets must be (episodes, sets, nodes, channels) with equal episodes and "
            f"channels, got {tuple(sa)} and {tuple(sb)}"
        )
    e, p, m, d = sa
    q, n = sb[1:3]
    if dots is None:
        dots = node_dots(a, b)
    cos = dots / (a.norms[:, :, :, None, None] * b.norms[:, None, None, :, :])
    cost = (1.0 - cos).permute(0, 1, 3, 2, 4).reshape(e * p * q, m, n)
    total = equal_mass(m, n)
    if weights == "cross":  # relu(u_i . mean_j v_j) + eps: matmuls against the other side's set means
        su = raw_products(a, b.set_means.transpose(1, 2)).reshape(e, p, m, q)
        sv = raw_products(b, a.set_means.transpose(1, 2)).reshape(e, q, n, p)
        su = torch.relu(su.permute(0, 1, 3, 2)) + WEIGHT_EPS  # (E,P,Q,m)
        sv = torch.relu(sv.permute(0, 3, 1, 2)) + WEIGHT_EPS  # (E,P,Q,n)
        wu = (su * (total / su.sum(dim=-1, keepdim=True))).reshape(e * p * q, m)
        wv = (sv * (total / sv.sum(dim=-1, keepdim=True))).reshape(e * p * q, n)
    else:
        wu = torch.full((e * p * q, m), total / m, dtype=cost.dtype, device=cost.device)
        wv = torch.full((e * p * q, n), total / n, dtype=cost.dtype, device=cost.device)
    dist, _ = solve(cost, wu, wv, solver=solver, **opts)
    mass = 0.5 * (wu.sum(dim=-1) + wv.sum(dim=-1)).to(dist.dtype)
    return (temperature * (mass - dist) / mass).reshape(e, p, q)
