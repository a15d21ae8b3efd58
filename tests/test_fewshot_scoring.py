"""The batched episode scorer gives deepemd.emd.pairwise_similarity's numbers and gradients."""
import pytest
import torch

from deepemd.emd import pairwise_similarity
from deepemd.errors import DeepEMDError
from deepemd.fewshot.scoring import episode_similarity


@pytest.mark.parametrize("weights", ["cross", "uniform"])
@pytest.mark.parametrize("center", [True, False])
def test_scores_and_gradients_match_pairwise_similarity(weights, center):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, 8, generator=gen, dtype=torch.float64).relu().requires_grad_()
    b = torch.randn(3, 6, 8, generator=gen, dtype=torch.float64).relu().requires_grad_()  # m != n
    ours = episode_similarity(a, b, weights=weights, temperature=12.5, center=center)
    ref = pairwise_similarity(a, b, weights=weights, temperature=12.5, center=center)
    torch.testing.assert_close(ours, ref)
    probe = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    ga, gb = torch.autograd.grad((ours * probe).sum(), (a, b))
    ra, rb = torch.autograd.grad((ref * probe).sum(), (a, b))
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gb, rb)


def test_non_finite_features_are_one_clear_error():
    a = torch.ones(2, 3, 4)
    a[0, 0, 0] = float("nan")
    with pytest.raises(DeepEMDError, match="NaN"):
        episode_similarity(a, torch.ones(1, 3, 4))
