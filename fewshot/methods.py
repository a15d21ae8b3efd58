"""Few-shot classifiers over cached features, all with one signature: ``method(episode) -> (Q, way)``
class scores (higher = more likely), so every method is scored on the very same episodes.

DeepEMD (paper 4.2-4.5) and its k-shot alternatives (5.3, Fig. 5), plus the baselines of Table 1
on global and local features. The backbone is frozen in all of them: what differs is only how a
query is compared with the support set.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from deepemd.emd import pairwise_similarity
from deepemd.emd.sfc import SFCFit, fit_sfc
from deepemd.errors import DeepEMDError
from deepemd.fewshot.features import FeatureCache


@dataclass
class Episode:
    """One N-way K-shot task: support rows are class-major (``support_labels`` = 0..way-1)."""

    way: int
    shot: int
    support: FeatureCache
    query: FeatureCache
    support_labels: torch.Tensor  # (way*shot,)
    query_labels: torch.Tensor  # (Q,)
    memo: dict = field(default_factory=dict, repr=False)  # results shared by methods of this episode


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


Method = Callable[[Episode], torch.Tensor]


def _emd(a: torch.Tensor, b: torch.Tensor, o: MethodOptions) -> torch.Tensor:
    return pairwise_similarity(a, b, weights=o.weights, solver=o.solver, temperature=o.temperature,
                               center=o.center)


def _to_each_support(ep: Episode, o: MethodOptions) -> torch.Tensor:
    """``(Q, way*shot)`` EMD scores of every query to every support image, computed once per
    episode and shared by NN and Fusion (the expensive part of both)."""
    key = ("to_each_support", o.weights, o.solver, o.temperature, o.center)
    if key not in ep.memo:
        ep.memo[key] = _emd(ep.query.local, ep.support.local, o)
    return ep.memo[key]


def _per_class(scores: torch.Tensor, ep: Episode) -> torch.Tensor:
    """``(Q, way*shot) -> (Q, way, shot)`` using the class-major support order."""
    return scores.reshape(scores.shape[0], ep.way, ep.shot)


def emd_nn(o: MethodOptions) -> Method:
    """EMD to every support image; a class scores its nearest support (1-shot: plain DeepEMD)."""
    def run(ep: Episode) -> torch.Tensor:
        return _per_class(_to_each_support(ep, o), ep).amax(dim=2)
    return run


def emd_fusion(o: MethodOptions) -> Method:
    """EMD to every support image, fused per class (mean similarity = summed distance)."""
    def run(ep: Episode) -> torch.Tensor:
        return _per_class(_to_each_support(ep, o), ep).mean(dim=2)
    return run


def emd_merge(o: MethodOptions) -> Method:
    """The K support sets of a class merged into one set of K*m nodes, one EMD per class."""
    def run(ep: Episode) -> torch.Tensor:
        sets = ep.support.local
        merged = sets.reshape(ep.way, ep.shot * sets.shape[1], sets.shape[2])
        return _emd(ep.query.local, merged, o)
    return run


def emd_sfc(o: MethodOptions) -> Method:
    """The structured FC layer fitted on the support (paper's DeepEMD for K > 1)."""
    def run(ep: Episode) -> torch.Tensor:
        gen = torch.Generator().manual_seed(o.seed)
        layer = fit_sfc(ep.support.local, ep.support_labels, ep.way, o.sfc, gen, weights=o.weights,
                        solver=o.solver, temperature=o.temperature, center=o.center)
        with torch.no_grad():
            return layer(ep.query.local)
    return run


def deepemd(o: MethodOptions) -> Method:
    """The paper's DeepEMD: direct EMD at 1-shot, SFC at K > 1."""
    nn_, sfc = emd_nn(o), emd_sfc(o)
    return lambda ep: nn_(ep) if ep.shot == 1 else sfc(ep)


def _class_means(x: torch.Tensor, ep: Episode) -> torch.Tensor:
    return x.reshape(ep.way, ep.shot, *x.shape[1:]).mean(dim=1)


def protonet(o: MethodOptions) -> Method:
    """Prototypical network: class mean of the global vectors, negative squared Euclidean."""
    def run(ep: Episode) -> torch.Tensor:
        return -torch.cdist(ep.query.global_, _class_means(ep.support.global_, ep)).pow(2)
    return run


def matchingnet(o: MethodOptions) -> Method:
    """Matching network (no FCE): softmax attention over cosine to every support, summed per class."""
    def run(ep: Episode) -> torch.Tensor:
        cos = F.normalize(ep.query.global_, dim=1) @ F.normalize(ep.support.global_, dim=1).T
        attention = torch.softmax(cos * o.temperature, dim=1)
        return torch.log(_per_class(attention, ep).sum(dim=2) + 1e-12)
    return run


def _finetune(weight: torch.Tensor, bias: torch.Tensor | None, logits_of: Callable, ep: Episode,
              steps: int) -> None:
    """Full-support Adam on cross-entropy; the backbone features are constants."""
    params = [p for p in (weight, bias) if p is not None]
    opt = torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3)
    x, y = ep.support.global_, ep.support_labels
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(logits_of(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def fc_dot(o: MethodOptions) -> Method:
    """A linear (dot-product) classifier fitted on the support's global vectors (Chen et al.)."""
    def run(ep: Episode) -> torch.Tensor:
        c = ep.support.global_.shape[1]
        weight = torch.zeros(ep.way, c, requires_grad=True)
        bias = torch.zeros(ep.way, requires_grad=True)
        _finetune(weight, bias, lambda x: x @ weight.T + bias, ep, o.finetune_steps)
        with torch.no_grad():
            return ep.query.global_ @ weight.T + bias
    return run


#: Scale of the cosine classifier's logits (Chen et al.'s baseline++ uses 10 for small ways).
COSINE_SCALE = 10.0


def cosine_classifier(o: MethodOptions) -> Method:
    """A cosine classifier initialised from the class means and fine-tuned on the support."""
    def run(ep: Episode) -> torch.Tensor:
        weight = F.normalize(_class_means(ep.support.global_, ep), dim=1).clone().requires_grad_(True)
        def logits(x: torch.Tensor) -> torch.Tensor:
            return COSINE_SCALE * F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T
        _finetune(weight, None, logits, ep, o.finetune_steps)
        with torch.no_grad():
            return logits(ep.query.global_)
    return run


def knn_local(o: MethodOptions) -> Method:
    """Local-descriptor KNN (Li et al.): each query cell's top-k cosine to a class's support cells,
    summed over k and over the query's cells."""
    def run(ep: Episode) -> torch.Tensor:
        q = F.normalize(ep.query.cells, dim=2)  # (Q, m, C)
        s = F.normalize(ep.support.cells, dim=2)
        pool = s.reshape(ep.way, ep.shot * s.shape[1], s.shape[2])  # (way, K*m, C)
        sims = torch.einsum("qmc,wnc->qwmn", q, pool)
        k = min(o.knn_k, pool.shape[1])
        return sims.topk(k, dim=3).values.sum(dim=(2, 3))
    return run


def prediction_fusion(o: MethodOptions) -> Method:
    """Dense classification (Lifchitz et al.): every query cell predicts a class (cosine to the
    class means), the predicted probabilities are averaged over cells."""
    def run(ep: Episode) -> torch.Tensor:
        protos = F.normalize(_class_means(ep.support.global_, ep), dim=1)
        cos = F.normalize(ep.query.cells, dim=2) @ protos.T  # (Q, m, way)
        probs = torch.softmax(COSINE_SCALE * cos, dim=2).mean(dim=1)
        return torch.log(probs + 1e-12)
    return run


@dataclass(frozen=True)
class MethodSpec:
    build: Callable[[MethodOptions], Method]
    kshot_only: bool
    summary: str

    def label(self, key: str, o: MethodOptions, shot: int) -> str:
        if key == "emd":
            return o.label if shot == 1 else f"{o.label}+SFC"
        return _LABELS[key].format(label=o.label)


METHODS: dict[str, MethodSpec] = {
    "emd": MethodSpec(deepemd, False, "DeepEMD: EMD to the support (1-shot), SFC (k-shot)"),
    "emd_nn": MethodSpec(emd_nn, True, "EMD + nearest support image"),
    "emd_fusion": MethodSpec(emd_fusion, True, "EMD averaged over each class's supports"),
    "emd_merge": MethodSpec(emd_merge, True, "EMD to each class's merged support set"),
    "protonet": MethodSpec(protonet, False, "ProtoNet: global class mean, Euclidean"),
    "matchingnet": MethodSpec(matchingnet, False, "MatchingNet: cosine attention on global vectors"),
    "fc": MethodSpec(fc_dot, False, "fine-tuned linear (dot) classifier on global vectors"),
    "cosine": MethodSpec(cosine_classifier, False, "fine-tuned cosine classifier on global vectors"),
    "knn": MethodSpec(knn_local, False, "KNN on local features (top-k cells)"),
    "fusion": MethodSpec(prediction_fusion, False, "prediction fusion over local features"),
}
_LABELS = {
    "emd_nn": "{label}+NN", "emd_fusion": "{label}+Fusion", "emd_merge": "{label}+Merge",
    "protonet": "ProtoNet", "matchingnet": "MatchingNet", "fc": "FC (dot)",
    "cosine": "Cosine classifier", "knn": "KNN (local)", "fusion": "Prediction fusion (local)",
}


def default_methods(shot: int) -> tuple[str, ...]:
    """Everything that applies to this shot count."""
    return tuple(k for k, spec in METHODS.items() if shot > 1 or not spec.kshot_only)


def select(keys: tuple[str, ...] | list[str], shot: int) -> list[str]:
    """Validate method names for this shot count (k-shot-only methods are skipped at 1-shot)."""
    keys = list(keys) or list(default_methods(shot))
    unknown = [k for k in keys if k not in METHODS]
    if unknown:
        raise DeepEMDError(f"unknown few-shot method '{unknown[0]}'", None,
                           f"choose from: {', '.join(METHODS)}")
    return [k for k in keys if shot > 1 or not METHODS[k].kshot_only]
