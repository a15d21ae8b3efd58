"""--inference-dtype bfloat16: the backbone's inference forwards under autocast, in both jobs.

Features come back float32 and close to float32's (the pretrained EfficientNet-Lite0 on real demo
images), but not equal (the autocast really ran); training forwards are untouched; few-shot's
feature cache keys the dtype, so a cache made in one precision is not served for the other.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from deepemd import device as device_module
from deepemd.build import read_images
from deepemd.device import inference_autocast
from deepemd.errors import DeepEMDError


@pytest.fixture(scope="module")
def demo_batch():
    from deepemd.retrieval.config import EvalConfig

    cfg = EvalConfig(data_root="demo", max_classes=2, per_class=2, image_size=96)
    images = read_images(cfg, cfg.split, cfg.seed)
    from deepemd.retrieval.build import local_specs, make_embedder, make_loader

    model = make_embedder(cfg, local_specs(cfg, ["fcn"]))
    batch, _ = next(iter(make_loader(images, model, 4, 0)))
    return batch


def embed(batch: torch.Tensor, dtype: str, train: bool = False):
    from deepemd.retrieval.build import local_specs, make_embedder
    from deepemd.retrieval.config import EvalConfig

    cfg = EvalConfig(data_root="demo", image_size=96, methods=("fcn", "grid"), inference_dtype=dtype)
    model = make_embedder(cfg, local_specs(cfg, ["fcn", "grid"]))
    model.for_inference(torch.device("cpu"))
    if train:
        model.train()
    torch.manual_seed(0)  # training forwards drop paths at random (stochastic depth)
    with torch.no_grad():
        return model(batch), model.fingerprint("fcn")


def test_bfloat16_features_are_float32_close_to_and_not_equal_to_float32s(demo_batch):
    (g32, s32), fp32 = embed(demo_batch, "float32")
    (g16, s16), fp16 = embed(demo_batch, "bfloat16")
    assert g16.dtype == torch.float32 and all(s.dtype == torch.float32 for s in s16.values())
    assert F.cosine_similarity(g32, g16).min() > 0.98
    for kind in ("fcn", "grid"):
        assert F.cosine_similarity(s32[kind], s16[kind], dim=-1).min() > 0.97
        assert not torch.equal(s32[kind], s16[kind])  # the convolutions did run in bfloat16
    assert "inference_dtype" not in fp32 and fp16["inference_dtype"] == "bfloat16"


def test_training_forwards_stay_float32(demo_batch):
    (g32, _), _ = embed(demo_batch, "float32", train=True)
    (g16, _), _ = embed(demo_batch, "bfloat16", train=True)
    assert torch.equal(g32, g16)


def test_fewshot_extract_and_its_cache_key_follow_the_dtype(tmp_path):
    from deepemd.fewshot import build
    from deepemd.fewshot.config import EvalConfig
    from deepemd.fewshot.evaluate import feature_key
    from deepemd.fewshot.features import extract

    caches, keys = {}, {}
    for dtype in ("float32", "bfloat16"):
        cfg = EvalConfig(
            data_root="demo",
            max_classes=2,
            per_class=2,
            image_size=64,
            backbone="efficientnet_lite0",
            weights="imagenet",
            inference_dtype=dtype,
        )
        images = build.read_split(cfg, cfg.split)
        net = build.create_backbone(cfg, cfg.checkpoint)
        extractor = build.create_extractor(cfg, net)
        data = build.dataset(images, cfg, net, train=False)
        caches[dtype] = extract(data, net, extractor, cfg.local, progress=False, inference_dtype=dtype)
        keys[dtype] = feature_key(cfg, images)
    a, b = caches["float32"], caches["bfloat16"]
    assert b.local.dtype == torch.float32
    assert F.cosine_similarity(a.local, b.local, dim=-1).min() > 0.97 and not torch.equal(a.local, b.local)
    assert keys["float32"] != keys["bfloat16"]


def test_float32_is_no_autocast_and_an_unknown_dtype_is_one_error():
    with inference_autocast("cpu"):
        x = torch.ones(2, 2) @ torch.ones(2, 2)
    assert x.dtype == torch.float32
    with pytest.raises(DeepEMDError, match="float16"):
        inference_autocast("cpu", "float16")


def test_emulated_bfloat16_warns_once(monkeypatch):
    monkeypatch.setattr(device_module, "native_bfloat16", lambda device: False)
    monkeypatch.setattr(device_module, "_WARNED", set())
    with pytest.warns(UserWarning, match="emulated"):
        with inference_autocast("cpu", "bfloat16"):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with inference_autocast("cpu", "bfloat16"):
            pass
