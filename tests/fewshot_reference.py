"""The few-shot methods as they were before batching over episodes: one episode at a time,
torch.optim per episode, one ``pairwise_similarity`` per episode. Kept in tests only, as the
slow oracle that the batched code in ``deepemd.fewshot.methods`` must agree with."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from deepemd.emd import pairwise_similarity
from deepemd.emd.sfc import fit_sfc
from deepemd.fewshot.methods import COSINE_SCALE, Episode, MethodOptions


def _emd(a, b, o: MethodOptions):
    return pairwise_similarity(a, b, weights=o.weights, solver=o.solver, temperature=o.temperature, center=o.center)


def _per_class(scores, ep: Episode):
    return scores.reshape(scores.shape[0], ep.way, ep.shot)


def _class_means(x, ep: Episode):
    return x.reshape(ep.way, ep.shot, *x.shape[1:]).mean(dim=1)


def emd_nn(ep: Episode, o: MethodOptions):
    return _per_class(_emd(ep.query.local, ep.support.local, o), ep).amax(dim=2)


def emd_fusion(ep: Episode, o: MethodOptions):
    return _per_class(_emd(ep.query.local, ep.support.local, o), ep).mean(dim=2)


def emd_merge(ep: Episode, o: MethodOptions):
    sets = ep.support.local
    return _emd(ep.query.local, sets.reshape(ep.way, ep.shot * sets.shape[1], sets.shape[2]), o)


def emd_sfc(ep: Episode, o: MethodOptions):
    gen = torch.Generator().manual_seed(o.seed)
    layer = fit_sfc(
        ep.support.local,
        ep.support_labels,
        ep.way,
        o.sfc,
        gen,
        weights=o.weights,
        solver=o.solver,
        temperature=o.temperature,
        center=o.center,
    )
    with torch.no_grad():
        return layer(ep.query.local)


def deepemd(ep: Episode, o: MethodOptions):
    return emd_nn(ep, o) if ep.shot == 1 else emd_sfc(ep, o)


def protonet(ep: Episode, o: MethodOptions):
    return -torch.cdist(ep.query.global_, _class_means(ep.support.global_, ep)).pow(2)


def matchingnet(ep: Episode, o: MethodOptions):
    cos = F.normalize(ep.query.global_, dim=1) @ F.normalize(ep.support.global_, dim=1).T
    attention = torch.softmax(cos * o.temperature, dim=1)
    return torch.log(_per_class(attention, ep).sum(dim=2) + 1e-12)


def _finetune(weight, bias, logits_of: Callable, ep: Episode, steps: int) -> None:
    params = [p for p in (weight, bias) if p is not None]
    opt = torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3)
    x, y = ep.support.global_, ep.support_labels
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(logits_of(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def fc_dot(ep: Episode, o: MethodOptions):
    c = ep.support.global_.shape[1]
    weight = torch.zeros(ep.way, c, requires_grad=True)
    bias = torch.zeros(ep.way, requires_grad=True)
    _finetune(weight, bias, lambda x: x @ weight.T + bias, ep, o.finetune_steps)
    with torch.no_grad():
        return ep.query.global_ @ weight.T + bias


def cosine_classifier(ep: Episode, o: MethodOptions):
    weight = F.normalize(_class_means(ep.support.global_, ep), dim=1).clone().requires_grad_(True)

    def logits(x):
        return COSINE_SCALE * F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T

    _finetune(weight, None, logits, ep, o.finetune_steps)
    with torch.no_grad():
        return logits(ep.query.global_)


def knn_local(ep: Episode, o: MethodOptions):
    q = F.normalize(ep.query.cells, dim=2)
    s = F.normalize(ep.support.cells, dim=2)
    pool = s.reshape(ep.way, ep.shot * s.shape[1], s.shape[2])
    sims = torch.einsum("qmc,wnc->qwmn", q, pool)
    k = min(o.knn_k, pool.shape[1])
    return sims.topk(k, dim=3).values.sum(dim=(2, 3))


def prediction_fusion(ep: Episode, o: MethodOptions):
    protos = F.normalize(_class_means(ep.support.global_, ep), dim=1)
    cos = F.normalize(ep.query.cells, dim=2) @ protos.T
    probs = torch.softmax(COSINE_SCALE * cos, dim=2).mean(dim=1)
    return torch.log(probs + 1e-12)


REFERENCE = {
    "emd": deepemd,
    "emd_nn": emd_nn,
    "emd_fusion": emd_fusion,
    "emd_merge": emd_merge,
    "protonet": protonet,
    "matchingnet": matchingnet,
    "fc": fc_dot,
    "cosine": cosine_classifier,
    "knn": knn_local,
    "fusion": prediction_fusion,
}
