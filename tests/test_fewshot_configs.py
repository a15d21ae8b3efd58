"""Every shipped few-shot config parses into its command's dataclass (unknown keys are errors)
and names things that exist (layout, backbone, local set, methods, solver)."""

from pathlib import Path

import pytest

from deepemd.backbones import list_backbones
from deepemd.config import build_config, read_yaml
from deepemd.data import LAYOUTS
from deepemd.emd import SOLVERS
from deepemd.fewshot.config import BUILTIN_ROOTS, EvalConfig, PretrainConfig, TrainConfig
from deepemd.fewshot.methods import select

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "fewshot"
COMMAND = {"pretrain": PretrainConfig, "train": TrainConfig, "test": EvalConfig}
FILES = sorted(CONFIGS.glob("*/*.yaml"))


def test_every_config_lives_in_a_command_folder():
    assert FILES, "no configs found"
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == [], "configs go in pretrain/, train/ or test/"
    assert {p.parent.name for p in FILES} == set(COMMAND)


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses_into_its_dataclass(path):
    cfg = build_config(COMMAND[path.parent.name], read_yaml(path), str(path))
    assert cfg.layout.replace("_", "-") in LAYOUTS
    assert cfg.data_root in BUILTIN_ROOTS or cfg.layout != "folder" or Path(cfg.data_root).name
    assert cfg.backbone in list_backbones()
    assert cfg.local in ("fcn", "grid", "sampling")
    assert cfg.solver in SOLVERS and cfg.node_weights in ("cross", "uniform")
    if isinstance(cfg, EvalConfig):
        select(cfg.methods, cfg.shot)  # raises on an unknown method


def test_the_protocol_defaults_are_the_papers():
    one, five = EvalConfig(shot=1), EvalConfig(shot=5)
    assert (one.num_episodes(), five.num_episodes(), one.query, one.temperature) == (5000, 600, 15, 12.5)


def test_configs_written_before_the_option_rename_get_told_the_new_names():
    """``pretrained`` became ``weights`` and the old ``weights`` (cross/uniform) ``node_weights``."""
    from deepemd.errors import DeepEMDError
    from deepemd.fewshot.build import create_backbone

    with pytest.raises(DeepEMDError) as renamed:
        build_config(EvalConfig, {"pretrained": "none"}, "old.yaml")
    assert "renamed" in str(renamed.value) and "node_weights" in str(renamed.value)
    old_meaning = build_config(EvalConfig, {"weights": "uniform", "backbone": "resnet12"})
    with pytest.raises(DeepEMDError, match="names EMD node weights") as err:
        create_backbone(old_meaning)
    assert "node_weights: uniform" in str(err.value)
