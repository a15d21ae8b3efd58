"""The structured FC layer (paper 4.5): fitting lowers the support loss and separates classes."""

import torch
import torch.nn.functional as F

from deepemd.emd.sfc import SFC, SFCFit, fit_sfc


def _separable(way=3, shot=3, nodes=4, dim=8, seed=0, noise=0.3):
    """Class c's sets are noisy copies of a class-specific set of node directions."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(way, nodes, dim, generator=gen)
    labels = torch.arange(way).repeat_interleave(shot)
    sets = centres[labels] + noise * torch.randn(len(labels), nodes, dim, generator=gen)
    return sets, labels, centres


def test_prototypes_start_at_the_class_mean_of_the_support():
    sets, labels, _ = _separable()
    layer = SFC.from_support(sets, labels, 3)
    for c in range(3):
        torch.testing.assert_close(layer.prototypes[c], sets[labels == c].mean(0))


def test_fit_lowers_the_support_loss_and_moves_only_the_prototypes():
    sets, labels, _ = _separable(seed=1, noise=1.5)  # overlapping classes: the mean init is not enough
    layer = SFC.from_support(sets, labels, 3, temperature=5.0)
    with torch.no_grad():
        before = float(F.cross_entropy(layer(sets), labels))
    start = layer.prototypes.detach().clone()
    frozen = sets.clone()
    losses = layer.fit(sets, labels, SFCFit(steps=30, batch_size=4), torch.Generator().manual_seed(0))
    with torch.no_grad():
        after = float(F.cross_entropy(layer(sets), labels))
    assert len(losses) == 30
    assert after < 0.8 * before, (before, after)
    assert not torch.allclose(layer.prototypes, start)
    torch.testing.assert_close(sets, frozen)  # features are constants


def test_fitted_sfc_classifies_held_out_queries_of_a_separable_case():
    sets, labels, centres = _separable(way=3, shot=2, seed=2)
    gen = torch.Generator().manual_seed(5)
    q_labels = torch.arange(3).repeat_interleave(4)
    queries = centres[q_labels] + 0.3 * torch.randn(len(q_labels), 4, 8, generator=gen)
    layer = fit_sfc(sets, labels, 3, SFCFit(steps=20, batch_size=3), torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(layer(queries).argmax(1), q_labels)
