"""Few-shot classifiers over cached features. Every method scores a batch of episodes at once,
``method.batch(episodes) -> (E, Q, way)`` class scores (higher = more likely), and one episode as
``method(episode) -> (Q, way)``, so every method is scored on the very same episodes.

DeepEMD (paper 4.2-4.5) and its k-shot alternatives (5.3, Fig. 5), plus the baselines of Table 1
on global and local features. The backbone is frozen in all of them: what differs is only how a
query is compared with the support set.

Why batches: a test run is thousands of small episodes, and one episode at a time spent most of
its time in per-call overhead (an optimizer loop of 100 tiny steps per classifier, a solver call
of a few hundred problems). Stacked, the fine-tuned classifiers of all episodes take their steps
together (Adam and SGD act element by element, and the loss is the SUM of the episodes' mean
losses, so each episode gets exactly its own update), the EMD problems of all episodes go to one
solve, and the node dot products are computed once per batch and shared by EMD and KNN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from deepemd.emd.sfc import SFCFit, minibatches
from deepemd.fewshot.episode_emd import NodeSets, episode_similarity, node_dots, raw_dots, raw_products
from deepemd.fewshot.features import FeatureCache
from deepemd.registry import Registry


@dataclass
class Episode:
    """One N-way K-shot task: support rows are class-major (``support_labels`` = 0..way-1)."""

    way: int
    shot: int
    support: FeatureCache
    query: FeatureCache
    support_labels: torch.Tensor  # (way*shot,)
    query_labels: torch.Tensor  # (Q,)


@dataclass
class MethodOptions:
    """What the methods need from the run's configuration."""

    label: str = "DeepEMD-FCN"
    weights: str = "cross"
    solver: str = "exact"
    temperature: float = 12.5
    center: bool = True
    sfc: SFCFit = SFCFit()
    finetune_steps: int = 100
    knn_k: int = 3
    seed: int = 0


@dataclass
class EpisodeBatch:
    """``E`` episodes of one task shape over the features of a run's images: rows of
    ``support_idx (E, way*shot)`` / ``query_idx (E, Q)`` index ``images``. Supports are
    class-major in every episode, so the support labels are shared; ``query_labels`` is
    ``(E, Q)``. Methods read gathered rows (:meth:`rows`, :meth:`nodes`); ``per_image`` keeps
    work done once per image for the whole run (centred nodes, norms), ``memo`` what several
    methods of this batch share (node dot products, EMD scores)."""

    way: int
    shot: int
    images: FeatureCache
    support_idx: torch.Tensor  # (E, way*shot) long
    query_idx: torch.Tensor  # (E, Q) long
    query_labels: torch.Tensor  # (E, Q)
    per_image: dict = field(default_factory=dict, repr=False)
    memo: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, ep: Episode) -> "EpisodeBatch":
        """A batch of the one episode ``ep`` (its supports and queries are the images)."""
        s, q = ep.support, ep.query
        cells = torch.cat([s.cells, q.cells])
        local = cells if (s.local is s.cells and q.local is q.cells) else torch.cat([s.local, q.local])
        images = FeatureCache(
            torch.cat([s.global_, q.global_]),
            cells,
            local,
            np.concatenate([np.asarray(s.labels), np.asarray(q.labels)]),
        )
        n = s.global_.shape[0]
        return cls(
            ep.way,
            ep.shot,
            images,
            torch.arange(n)[None],
            torch.arange(n, images.global_.shape[0])[None],
            ep.query_labels[None],
        )

    @property
    def size(self) -> int:
        return int(self.query_idx.shape[0])

    @property
    def support_labels(self) -> torch.Tensor:
        return torch.arange(self.way).repeat_interleave(self.shot)

    def shared(self, key: tuple, make: Callable[[], object]):
        """``make()``, computed once per batch for every method that asks with ``key``."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def _index(self, side: str) -> torch.Tensor:
        return self.support_idx if side == "support" else self.query_idx

    def rows(self, side: str, view: str) -> torch.Tensor:
        """``(E, n, ...)``: the ``view`` (global_, cells, local) of the ``side``'s images."""
        return self.shared(("rows", side, view), lambda: getattr(self.images, view)[self._index(side)])

    def nodes(self, side: str, view: str, center: bool) -> NodeSets:
        """The ``side``'s :class:`NodeSets` of ``view`` (cells or local); the per-set work is
        done once per image of the run, then gathered."""
        key = ("nodes", view, center)
        if key not in self.per_image:
            self.per_image[key] = NodeSets.of(getattr(self.images, view), center)
        return self.shared(("nodes", side, view, center), lambda: self.per_image[key].take(self._index(side)))

    @property
    def local_is_cells(self) -> bool:
        return self.images.local is self.images.cells


class Method:
    """A few-shot classifier: ``batch(EpisodeBatch) -> (E, Q, way)`` scores; calling it on one
    :class:`Episode` scores that episode alone, ``-> (Q, way)``."""

    def __init__(self, batch: Callable[[EpisodeBatch], torch.Tensor]):
        self.batch = batch

    def __call__(self, ep: Episode) -> torch.Tensor:
        return self.batch(EpisodeBatch.of(ep))[0]


def _emd(a: NodeSets, b: NodeSets, o: MethodOptions, dots: torch.Tensor | None = None) -> torch.Tensor:
    return episode_similarity(a, b, weights=o.weights, solver=o.solver, temperature=o.temperature, dots=dots)


def _local_dots(eb: EpisodeBatch, o: MethodOptions) -> torch.Tensor:
    """Node dot products of every query set with every support set (centred when the EMD cost
    is), once per batch: EMD to each support and KNN (when the local sets are the cells) share them."""
    return eb.shared(
        ("local_dots", o.center),
        lambda: node_dots(eb.nodes("query", "local", o.center), eb.nodes("support", "local", o.center)),
    )


def _to_each_support(eb: EpisodeBatch, o: MethodOptions) -> torch.Tensor:
    """``(E, Q, way*shot)`` EMD scores of every query to every support image, computed once per
    batch and shared by NN and Fusion (the expensive part of both)."""
    key = ("to_each_support", o.weights, o.solver, o.temperature, o.center)
    return eb.shared(
        key,
        lambda: _emd(
            eb.nodes("query", "local", o.center), eb.nodes("support", "local", o.center), o, _local_dots(eb, o)
        ),
    )


def _per_class(scores: torch.Tensor, eb: EpisodeBatch) -> torch.Tensor:
    """``(E, Q, way*shot) -> (E, Q, way, shot)`` using the class-major support order."""
    return scores.reshape(*scores.shape[:2], eb.way, eb.shot)


def emd_nn(o: MethodOptions) -> Method:
    """EMD to every support image; a class scores its nearest support (1-shot: plain DeepEMD)."""
    return Method(lambda eb: _per_class(_to_each_support(eb, o), eb).amax(dim=3))


def emd_fusion(o: MethodOptions) -> Method:
    """EMD to every support image, fused per class (mean similarity = summed distance)."""
    return Method(lambda eb: _per_class(_to_each_support(eb, o), eb).mean(dim=3))


def emd_merge(o: MethodOptions) -> Method:
    """The K support sets of a class merged into one set of K*m nodes, one EMD per class."""

    def run(eb: EpisodeBatch) -> torch.Tensor:
        sets = eb.rows("support", "local")
        merged = NodeSets.of(sets.reshape(eb.size, eb.way, eb.shot * sets.shape[2], sets.shape[3]), o.center)
        return _emd(eb.nodes("query", "local", o.center), merged, o)

    return Method(run)


def sfc_prototypes(eb: EpisodeBatch, o: MethodOptions) -> torch.Tensor:
    """``(E, way, m, d)``: the SFC (:class:`deepemd.emd.sfc.SFC`) of every episode fitted at once.

    The same as ``fit_sfc`` per episode: prototypes start at the node-wise class mean, every
    episode walks the same seeded mini-batch order (each episode's generator had the same seed),
    and one SGD over the stacked prototypes on the SUM of the episodes' mean losses gives each
    episode its own update; each step's EMD problems of all episodes are one solve."""
    sets = eb.rows("support", "local")
    e, s, m, d = sets.shape
    protos = sets.reshape(e, eb.way, eb.shot, m, d).mean(dim=2).clone().requires_grad_(True)
    opt = torch.optim.SGD([protos], lr=o.sfc.lr, momentum=o.sfc.momentum, dampening=o.sfc.dampening)
    labels = eb.support_labels
    with torch.enable_grad():
        for idx in minibatches(s, o.sfc, torch.Generator().manual_seed(o.seed)):
            logits = _emd(NodeSets.of(sets[:, idx], o.center), NodeSets.of(protos, o.center), o)  # (E, batch, way)
            loss = F.cross_entropy(logits.reshape(-1, eb.way), labels[idx].repeat(e), reduction="sum") / len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return protos.detach()


def emd_sfc(o: MethodOptions) -> Method:
    """The structured FC layer fitted on the support (paper's DeepEMD for K > 1)."""
    return Method(
        lambda eb: _emd(eb.nodes("query", "local", o.center), NodeSets.of(sfc_prototypes(eb, o), o.center), o)
    )


def deepemd(o: MethodOptions) -> Method:
    """The paper's DeepEMD: direct EMD at 1-shot, SFC at K > 1."""
    nn_, sfc = emd_nn(o), emd_sfc(o)
    return Method(lambda eb: nn_.batch(eb) if eb.shot == 1 else sfc.batch(eb))


def _class_means(x: torch.Tensor, eb: EpisodeBatch) -> torch.Tensor:
    return x.reshape(eb.size, eb.way, eb.shot, *x.shape[2:]).mean(dim=2)


def protonet(o: MethodOptions) -> Method:
    """Prototypical network: class mean of the global vectors, negative squared Euclidean."""
    return Method(
        lambda eb: -torch.cdist(eb.rows("query", "global_"), _class_means(eb.rows("support", "global_"), eb)).pow(2)
    )


def matchingnet(o: MethodOptions) -> Method:
    """Matching network (no FCE): softmax attention over cosine to every support, summed per class."""

    def run(eb: EpisodeBatch) -> torch.Tensor:
        cos = F.normalize(eb.rows("query", "global_"), dim=2) @ F.normalize(
            eb.rows("support", "global_"), dim=2
        ).transpose(1, 2)
        attention = torch.softmax(cos * o.temperature, dim=2)
        return torch.log(_per_class(attention, eb).sum(dim=3) + 1e-12)

    return Method(run)


#: The fine-tuned classifiers' optimiser: Adam (torch's betas and eps) with L2 weight decay.
ADAM_LR, ADAM_BETAS, ADAM_EPS, WEIGHT_DECAY = 1e-2, (0.9, 0.999), 1e-8, 1e-3


class _Adam:
    """The update of ``torch.optim.Adam(params, lr=ADAM_LR, weight_decay=WEIGHT_DECAY)``, in numpy
    for stacked parameters whose gradients the caller computes in closed form. Why numpy: these
    arrays are a few episodes x 5 x 1280 floats, where torch's per-op overhead, autograd graph and
    (above 32k elements) an OpenMP region per op cost far more than the arithmetic; on a busy
    machine each such region waits milliseconds for its second thread."""

    def __init__(self, params: list[np.ndarray]):
        self.params = params
        self.avg = [np.zeros_like(p) for p in params]
        self.avg_sq = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: list[np.ndarray]) -> None:
        self.t += 1
        beta1, beta2 = ADAM_BETAS
        step_size = ADAM_LR / (1 - beta1**self.t)
        correction2 = math.sqrt(1 - beta2**self.t)
        for p, g, avg, avg_sq in zip(self.params, grads, self.avg, self.avg_sq):
            g += WEIGHT_DECAY * p
            avg += (1 - beta1) * (g - avg)
            avg_sq *= beta2
            avg_sq += (1 - beta2) * g * g
            p -= step_size * avg / (np.sqrt(avg_sq) / correction2 + ADAM_EPS)


def _mean_ce_grad(logits: np.ndarray, onehot: np.ndarray) -> np.ndarray:
    """d(mean cross-entropy over the support)/d logits, per episode: ``(E, S, way)``."""
    z = np.exp(logits - logits.max(axis=2, keepdims=True))
    z /= z.sum(axis=2, keepdims=True)
    z -= onehot
    z /= logits.shape[1]
    return z


def _global_arrays(eb: EpisodeBatch, normalise: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Support and query global vectors (unit length if ``normalise``) and the one-hot support
    labels, as float32 numpy arrays for the closed-form fits."""
    s, q = eb.rows("support", "global_").float(), eb.rows("query", "global_").float()
    if normalise:
        s, q = F.normalize(s, dim=2), F.normalize(q, dim=2)
    onehot = F.one_hot(eb.support_labels.long(), eb.way).float()
    return s.numpy(), q.numpy(), onehot.numpy()


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def fc_dot(o: MethodOptions) -> Method:
    """A linear (dot-product) classifier fitted on the support's global vectors (Chen et al.):
    full-support Adam on cross-entropy from zero weights; the features are constants."""

    def run(eb: EpisodeBatch) -> torch.Tensor:
        x, q, onehot = _global_arrays(eb, normalise=False)
        weight = np.zeros((eb.size, eb.way, x.shape[2]), dtype=np.float32)
        bias = np.zeros((eb.size, 1, eb.way), dtype=np.float32)
        adam = _Adam([weight, bias])
        for _ in range(o.finetune_steps):
            g = _mean_ce_grad(x @ weight.transpose(0, 2, 1) + bias, onehot)
            adam.step([g.transpose(0, 2, 1) @ x, g.sum(axis=1, keepdims=True)])
        return _t(q @ weight.transpose(0, 2, 1) + bias)

    return Method(run)


#: Scale of the cosine classifier's logits (Chen et al.'s baseline++ uses 10 for small ways).
COSINE_SCALE = 10.0


def _unit_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w`` with unit rows (last axis) and the row norms, floored as F.normalize does."""
    norm = np.maximum(np.sqrt((w * w).sum(axis=2, keepdims=True)), 1e-12)
    return w / norm, norm


def cosine_classifier(o: MethodOptions) -> Method:
    """A cosine classifier initialised from the class means and fine-tuned on the support
    (Adam on cross-entropy, the gradient through the weight normalisation in closed form)."""

    def run(eb: EpisodeBatch) -> torch.Tensor:
        x, q, onehot = _global_arrays(eb, normalise=True)
        means = _class_means(eb.rows("support", "global_").float(), eb)
        weight = F.normalize(means, dim=2).numpy().copy()  # (E, way, C)
        adam = _Adam([weight])
        for _ in range(o.finetune_steps):
            unit, norm = _unit_rows(weight)
            g_logits = _mean_ce_grad(COSINE_SCALE * (x @ unit.transpose(0, 2, 1)), onehot)
            g = COSINE_SCALE * (g_logits.transpose(0, 2, 1) @ x)  # d loss / d unit
            g -= unit * (unit * g).sum(axis=2, keepdims=True)
            g /= norm
            adam.step([g])
        return _t(COSINE_SCALE * (q @ _unit_rows(weight)[0].transpose(0, 2, 1)))

    return Method(run)


def _cell_norms(eb: EpisodeBatch, side: str) -> torch.Tensor:
    """``(E, n, hw)`` norms of the raw cells with F.normalize's floor (KNN and fusion), computed
    once per image of the run."""
    if "cell_norms" not in eb.per_image:
        eb.per_image["cell_norms"] = torch.linalg.vector_norm(eb.images.cells, dim=2).clamp_min(1e-12)
    return eb.shared(("cell_norms", side), lambda: eb.per_image["cell_norms"][eb._index(side)])


def knn_local(o: MethodOptions) -> Method:
    """Local-descriptor KNN (Li et al.): each query cell's top-k cosine to a class's support cells,
    summed over k and over the query's cells."""

    def run(eb: EpisodeBatch) -> torch.Tensor:
        dots = None
        if eb.local_is_cells:  # the EMD's node dots are these cells'
            dots = raw_dots(
                _local_dots(eb, o), eb.nodes("query", "local", o.center), eb.nodes("support", "local", o.center)
            )
        if dots is None:
            dots = node_dots(eb.nodes("query", "cells", False), eb.nodes("support", "cells", False))
        cos = dots / (_cell_norms(eb, "query")[:, :, :, None, None] * _cell_norms(eb, "support")[:, None, None])
        e, nq, m, _, n = cos.shape
        pool = cos.reshape(e, nq, m, eb.way, eb.shot * n)  # a class's support cells, class-major
        return pool.topk(min(o.knn_k, pool.shape[4]), dim=4).values.sum(dim=(2, 4))

    return Method(run)


def prediction_fusion(o: MethodOptions) -> Method:
    """Dense classification (Lifchitz et al.): every query cell predicts a class (cosine to the
    class means), the predicted probabilities are averaged over cells."""

    def run(eb: EpisodeBatch) -> torch.Tensor:
        protos = F.normalize(_class_means(eb.rows("support", "global_"), eb), dim=2)  # (E, way, C)
        if eb.local_is_cells:  # from the EMD's gathered sets, without a raw copy of the cells
            nodes = eb.nodes("query", "local", o.center)
            products = raw_products(nodes, protos.transpose(1, 2))
        else:
            cells = eb.rows("query", "cells")
            products = cells.flatten(1, 2) @ protos.transpose(1, 2)
        e, nq, m = _cell_norms(eb, "query").shape
        cos = products.reshape(e, nq, m, eb.way)
        probs = torch.softmax(COSINE_SCALE * cos / _cell_norms(eb, "query")[..., None], dim=3).mean(dim=2)
        return torch.log(probs + 1e-12)

    return Method(run)


@dataclass(frozen=True)
class MethodSpec:
    build: Callable[[MethodOptions], Method]
    kshot_only: bool
    summary: str

    def label(self, key: str, o: MethodOptions, shot: int) -> str:
        if key == "emd":
            return o.label if shot == 1 else f"{o.label}+SFC"
        return _LABELS[key].format(label=o.label)


#: Every few-shot method by name (``--methods``); all of them score the same seeded episodes.
METHODS: Registry[MethodSpec] = Registry("few-shot method")
METHODS.add("emd", MethodSpec(deepemd, False, "DeepEMD: EMD to the support (1-shot), SFC (k-shot)"))
METHODS.add("emd_nn", MethodSpec(emd_nn, True, "EMD + nearest support image"))
METHODS.add("emd_fusion", MethodSpec(emd_fusion, True, "EMD averaged over each class's supports"))
METHODS.add("emd_merge", MethodSpec(emd_merge, True, "EMD to each class's merged support set"))
METHODS.add("protonet", MethodSpec(protonet, False, "ProtoNet: global class mean, Euclidean"))
METHODS.add("matchingnet", MethodSpec(matchingnet, False, "MatchingNet: cosine attention on global vectors"))
METHODS.add("fc", MethodSpec(fc_dot, False, "fine-tuned linear (dot) classifier on global vectors"))
METHODS.add("cosine", MethodSpec(cosine_classifier, False, "fine-tuned cosine classifier on global vectors"))
METHODS.add("knn", MethodSpec(knn_local, False, "KNN on local features (top-k cells)"))
METHODS.add("fusion", MethodSpec(prediction_fusion, False, "prediction fusion over local features"))
_LABELS = {
    "emd_nn": "{label}+NN",
    "emd_fusion": "{label}+Fusion",
    "emd_merge": "{label}+Merge",
    "protonet": "ProtoNet",
    "matchingnet": "MatchingNet",
    "fc": "FC (dot)",
    "cosine": "Cosine classifier",
    "knn": "KNN (local)",
    "fusion": "Prediction fusion (local)",
}


def default_methods(shot: int) -> tuple[str, ...]:
    """Everything that applies to this shot count."""
    return tuple(k for k, spec in METHODS.items() if shot > 1 or not spec.kshot_only)


def select(keys: tuple[str, ...] | list[str], shot: int) -> list[str]:
    """Validate method names for this shot count (k-shot-only methods are skipped at 1-shot)."""
    keys = [METHODS.key(k) for k in keys] or list(default_methods(shot))
    return [k for k in keys if shot > 1 or not METHODS[k].kshot_only]
