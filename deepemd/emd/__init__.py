"""The EMD head: Earth Mover's Distance between weighted local feature sets (DeepEMD).

Plain functions over batched torch tensors, POT style::

    cost = cost_matrix(u, v)                    # (B,m,n) = 1 - cosine
    wu, wv = cross_reference_weights(u, v)      # (B,m), (B,n), equal total mass
    dist, flow = solve(cost, wu, wv)            # exact, batched, differentiable
    score = similarity(u, v)                    # (B,)  Eq. 3 score
    scores = pairwise_similarity(a, b)          # (P,Q) every pair of sets

See docs/emd.md for the solvers, the gradient and the speed table.
"""

from deepemd.emd.api import SOLVERS, balance, pairwise_similarity, similarity, solve
from deepemd.emd.features import cost_matrix, cross_reference_weights, equal_mass, uniform_weights

__all__ = [
    "SOLVERS",
    "balance",
    "cost_matrix",
    "cross_reference_weights",
    "equal_mass",
    "pairwise_similarity",
    "similarity",
    "solve",
    "uniform_weights",
]
