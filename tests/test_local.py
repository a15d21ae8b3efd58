"""Local feature sets: (B, m, d) for each setting, one backbone pass per batch, node values
checked against hand computations (pooling by hand, crops through an identity backbone)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepemd import local
from deepemd.errors import DeepEMDError
from deepemd.local.grid import grid_boxes
from deepemd.local.sampling import sample_boxes


class CountingBackbone(nn.Module):
    """Wraps a backbone and records the batch size of every forward call."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, []
        self.out_channels, self.default_cfg = inner.out_channels, inner.default_cfg

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.inner(x)


class PixelBackbone(nn.Module):
    """Identity 'backbone': the feature map is the image, so a crop's node is its mean colour."""

    out_channels = 3
    default_cfg = {"input_size": 32, "mean": (0.0,) * 3, "std": (1.0,) * 3}

    def forward(self, x):
        return x


@pytest.mark.parametrize(
    "kind,kw,m",
    [
        ("fcn", {}, 16),
        ("fcn", {"pyramid": (3, 2, 1)}, 9 + 4 + 1 + 16),
        ("fcn", {"pyramid": (2,)}, 4 + 16),
        ("grid", {}, 9),
        ("grid", {"levels": (3, 2), "ratio": 2.0}, 13),
        ("grid", {"levels": (1, 2, 4)}, 21),
        ("sampling", {}, 25),
        ("sampling", {"num_patches": 9}, 9),
    ],
)
def test_shapes_and_one_forward_per_batch(tiny_backbone, kind, kw, m):
    counted = CountingBackbone(tiny_backbone)
    extractor = local.create(kind, counted, **kw)
    counted.calls.clear()  # fcn measures its map size once at construction
    out = extractor(torch.randn(3, 3, 16, 16))
    assert out.shape == (3, m, 8) and extractor.num_nodes == m
    crops = 1 if kind == "fcn" else m
    assert counted.calls == [3 * crops]


def test_fcn_nodes_are_the_cells_and_the_pooled_levels(tiny_backbone):
    fcn = local.create("fcn", tiny_backbone, pyramid=(2, 1))
    fmap = torch.randn(2, 8, 4, 4)
    nodes = fcn.from_feature_map(fmap)
    quadrant = fmap[:, :, :2, 2:].mean(dim=(2, 3))  # level-2 cell (row 0, col 1)
    torch.testing.assert_close(nodes[:, 1], quadrant)
    torch.testing.assert_close(nodes[:, 4], fmap.mean(dim=(2, 3)))  # the 1x1 level
    torch.testing.assert_close(nodes[:, 5 + 4 * 2 + 3], fmap[:, :, 2, 3])  # raw cell (2, 3)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fcn(x), fcn.from_feature_map(tiny_backbone(x)))


def test_global_features_is_the_average_pool():
    fmap = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(local.global_features(fmap), F.adaptive_avg_pool2d(fmap, 1).flatten(1))


def test_grid_boxes_by_hand():
    boxes = grid_boxes(60, 90, (2,), ratio=1.0)
    expected = [[0, 0, 45, 30], [45, 0, 90, 30], [0, 30, 45, 60], [45, 30, 90, 60]]
    torch.testing.assert_close(boxes, torch.tensor(expected, dtype=torch.float32))
    enlarged = grid_boxes(60, 90, (3,), ratio=2.0)
    torch.testing.assert_close(enlarged[4], torch.tensor([15.0, 10.0, 75.0, 50.0]))  # centre cell doubled
    torch.testing.assert_close(enlarged[0], torch.tensor([0.0, 0.0, 45.0, 30.0]))  # corner cell clipped


def test_grid_nodes_are_the_mean_colour_of_each_cell():
    image = torch.zeros(1, 3, 64, 64)
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    for i, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        image[0, :, 32 * r : 32 * (r + 1), 32 * c : 32 * (c + 1)] = colours[i][:, None, None]
    nodes = local.create("grid", PixelBackbone(), levels=(2, 1))(image)
    torch.testing.assert_close(nodes[0, :4], colours, atol=0.03, rtol=0)  # bilinear blend at the border only
    torch.testing.assert_close(nodes[0, 4], colours.mean(0), atol=1e-5, rtol=0)


def test_sampling_is_seeded_and_reseedable(tiny_backbone):
    x = torch.randn(2, 3, 16, 16)
    a = local.create("sampling", tiny_backbone, num_patches=5, seed=3)
    b = local.create("sampling", tiny_backbone, num_patches=5, seed=3)
    c = local.create("sampling", tiny_backbone, num_patches=5, seed=4)
    first = a(x)
    assert torch.equal(first, b(x)) and not torch.equal(first, c(x))
    assert not torch.equal(first, a(x))  # the generator moves on
    a.reseed(3)
    assert torch.equal(first, a(x))


def test_sampled_boxes_follow_random_resized_crop_rules():
    g = torch.Generator().manual_seed(0)
    scale, ratio = (0.2, 0.6), (0.5, 2.0)
    boxes = sample_boxes(4, 200, 60, 80, scale, ratio, g).reshape(-1, 4)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 80).all() and (boxes[:, 3] <= 60).all()
    area = w * h / (60 * 80)
    slack = 0.02  # integer rounding of width and height
    assert (area >= scale[0] - slack).all() and (area <= scale[1] + slack).all()
    log_aspect = torch.log(w / h)
    assert (log_aspect >= math.log(ratio[0]) - 0.1).all() and (log_aspect <= math.log(ratio[1]) + 0.1).all()
    assert len({tuple(b.tolist()) for b in boxes}) > 150  # genuinely random, not one box repeated


def test_sampling_fallback_is_the_central_crop():
    g = torch.Generator().manual_seed(0)
    # a 1x100 strip can never hold a crop of aspect ratio <= 4/3 and area >= 50%: central fallback
    boxes = sample_boxes(1, 3, 1, 100, (0.5, 1.0), (3 / 4, 4 / 3), g)
    # torchvision's rule: width round(1 * 4/3) = 1, height 1, placed at ((100 - 1) // 2, 0)
    assert boxes[0].tolist() == [[49.0, 0.0, 50.0, 1.0]] * 3


def test_sampling_on_a_flat_image_gives_its_colour():
    image = torch.full((2, 3, 40, 30), 0.25)
    nodes = local.create("sampling", PixelBackbone(), num_patches=7)(image)
    torch.testing.assert_close(nodes, torch.full((2, 7, 3), 0.25))


def test_unknown_kind_is_a_clear_error(tiny_backbone):
    with pytest.raises(DeepEMDError, match="unknown local feature kind 'grids'"):
        local.create("grids", tiny_backbone)


def test_backbone_in_pieces_gives_the_same_maps(tiny_backbone):
    from deepemd.local.crops import forward_chunks

    counted = CountingBackbone(tiny_backbone).eval()
    x = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        whole = tiny_backbone(x)
        pieces = forward_chunks(counted, x, pixels=3 * 16 * 16)
    assert counted.calls == [3, 3, 1]
    torch.testing.assert_close(pieces, whole)
