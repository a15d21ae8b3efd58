"""deepemd: the Earth Mover's Distance between local CNN features (DeepEMD) as a toolkit.

Subpackages: ``deepemd.emd`` (the EMD head), ``deepemd.backbones`` (registry of feature-map
networks), ``deepemd.local`` (local feature sets), ``deepemd.data`` (dataset layouts, samplers,
the bundled demo set), and the jobs ``deepemd.retrieval`` and ``deepemd.fewshot`` on top of
``deepemd.eval``.
"""

from deepemd.errors import DeepEMDError

__version__ = "0.1.0"
__all__ = ["DeepEMDError", "__version__"]
