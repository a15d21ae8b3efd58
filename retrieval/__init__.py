"""deepemd.retrieval: image retrieval with a FAISS shortlist reranked by DeepEMD (paper 5.8).

Python API (the CLI `deepemd retrieval train | index | search | eval` wraps the same calls):

- :func:`run_eval` (``EvalConfig``): leave-one-out P@1 / RP / MAP@R, raw vs +DeepEMD.
- :func:`train` (``TrainConfig``): a pytorch-metric-learning loss, resumable, DDP under torchrun.
- :class:`Gallery`: ``Gallery.open(path).search(images, k)`` -- a built gallery with the network
  that built it (rebuilt from the options it records), FAISS shortlist + DeepEMD rerank.
- :func:`run_index` / :func:`run_search` (``IndexConfig`` / ``SearchConfig``): build a gallery
  (FAISS index + local-feature store), or a store for your own FAISS index, and query it.
- :class:`Reranker` / :class:`Shortlist`: rescore any shortlist (e.g. a FAISS search of your own
  index) with DeepEMD, exactly, pruning the LPs that cannot reach the top k.
- :class:`DeepEMDSimilarity`: DeepEMD as a pml distance (pair losses train through it).

Submodules are imported lazily so `import deepemd.retrieval.index` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "run_eval": "deepemd.retrieval.evaluate",
    "train": "deepemd.retrieval.train",
    "run_index": "deepemd.retrieval.search",
    "run_search": "deepemd.retrieval.search",
    "Reranker": "deepemd.retrieval.rerank",
    "Shortlist": "deepemd.eval.shortlist",
    "rerank": "deepemd.retrieval.rerank",
    "RerankSettings": "deepemd.retrieval.rerank",
    "DeepEMDSimilarity": "deepemd.retrieval.distance",
    "flatten_sets": "deepemd.retrieval.distance",
    "Gallery": "deepemd.retrieval.gallery",
    "open_gallery": "deepemd.retrieval.gallery",
    "search_gallery": "deepemd.retrieval.gallery",
    "build_foreign_store": "deepemd.retrieval.gallery",
    "EvalConfig": "deepemd.retrieval.config",
    "TrainConfig": "deepemd.retrieval.config",
    "IndexConfig": "deepemd.retrieval.config",
    "SearchConfig": "deepemd.retrieval.config",
    "DemoConfig": "deepemd.retrieval.config",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'deepemd.retrieval' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
