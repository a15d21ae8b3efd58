"""deepemd.fewshot: few-shot classification with DeepEMD (paper sections 4-5).

Commands (``deepemd fewshot ...``): ``pretrain`` (linear classifier + optional rotation loss),
``train`` (episodic meta-training through the differentiable EMD layer), ``test`` (seeded
episodes over features extracted once; every method on the same episodes; mean and 95% CI).
Python entry points: :func:`deepemd.fewshot.pretrain.pretrain`,
:func:`deepemd.fewshot.metatrain.meta_train`, :func:`deepemd.fewshot.evaluate.run_test`;
the k-shot methods live in :mod:`deepemd.fewshot.methods`, the SFC in :mod:`deepemd.emd.sfc`.
"""

from deepemd.fewshot.config import EvalConfig, PretrainConfig, TrainConfig

__all__ = ["EvalConfig", "PretrainConfig", "TrainConfig"]
