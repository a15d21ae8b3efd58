"""Flow pictures show the image as the network saw it: a non-square image gets its boxes on the
regions its nodes came from (the test transform's resize + centre crop, not a squashed square)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from deepemd.data import ImageList, build_transform
from deepemd.data.transforms import IMAGENET_MEAN, IMAGENET_STD, seen_image
from deepemd.retrieval import figures
from deepemd.retrieval.rerank import RerankSettings

SIZE = 64


def _non_square(path, width=200, height=120, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[:, : width // 10] = (255, 0, 0)  # a red band on the left: cropped away by a centre crop
    Image.fromarray(pixels).save(path)
    return path


def _network_input_as_uint8(path) -> np.ndarray:
    """What the backbone receives, un-normalised back to 0..255 RGB."""
    x = build_transform(SIZE)(Image.open(path).convert("RGB"))
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((x * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def test_seen_image_is_the_transform_output(tmp_path):
    path = _non_square(tmp_path / "wide.png")
    seen = seen_image(path, SIZE)
    assert seen.shape == (SIZE, SIZE, 3) and seen.dtype == np.uint8
    assert np.abs(seen.astype(int) - _network_input_as_uint8(path).astype(int)).max() <= 1


def test_retrieval_figure_draws_the_crop_the_network_saw(tmp_path, monkeypatch):
    paths = [_non_square(tmp_path / f"{i}.png", seed=i) for i in range(4)]
    images = ImageList(paths, np.array([0, 0, 1, 1]), ["a", "b"], tmp_path)
    rng = np.random.default_rng(0)
    glob = rng.normal(size=(4, 8)).astype(np.float32)
    glob /= np.linalg.norm(glob, axis=1, keepdims=True)
    sets = np.abs(rng.normal(size=(4, 4 + 9, 8))).astype(np.float32)  # pyramid level 2 (4 nodes) + 3x3 map
    model = SimpleNamespace(info=SimpleNamespace(image_size=SIZE), specs={"fcn": SimpleNamespace(pyramid=(2,))})
    drawn = []

    def capture(ax, image_a, image_b, boxes_a, boxes_b, flow, *args, **kw):
        drawn.append((image_a, image_b, boxes_a, flow))

    monkeypatch.setattr(figures, "draw_flow", capture)
    figures.save_rerank_figure(
        tmp_path / "flows.png", images, glob, sets, model, RerankSettings(depth=3), count=2, seed=0
    )
    assert (tmp_path / "flows.png").is_file() and len(drawn) == 2
    expected = {tuple(seen_image(p, SIZE).ravel()[:64]) for p in paths}
    for image_a, image_b, boxes, flow in drawn:
        assert image_a.shape == (SIZE, SIZE, 3)
        assert tuple(image_a.ravel()[:64]) in expected and tuple(image_b.ravel()[:64]) in expected
        assert boxes.shape == (13, 4) and flow.shape == (13, 13)
        assert boxes[:, [0, 2]].max() <= SIZE and boxes[:, [1, 3]].max() <= SIZE
    # a squashed square thumbnail (the old drawing) keeps the red band the network never saw
    squashed = np.asarray(Image.open(paths[0]).convert("RGB").resize((SIZE, SIZE)))
    assert (squashed[:, 0] == (255, 0, 0)).all() and not (seen_image(paths[0], SIZE)[:, 0] == (255, 0, 0)).all()
