"""deepemd.config: unknown keys and wrong types are errors; precedence default < YAML < flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from deepemd.config import add_dataclass_arguments, build_config, config_from_args, read_yaml
from deepemd.errors import DeepEMDError


@dataclass
class Example:
    backbone: str = "resnet12"
    way: int = 5
    lr: float = 0.1
    pyramid: tuple[int, ...] = ()
    resume: bool = False
    checkpoint: str | None = None


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_dataclass_arguments(parser, Example)
    return parser.parse_args(argv)


def test_unknown_key_names_file_and_suggests(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backbne: resnet50\n")
    with pytest.raises(DeepEMDError) as err:
        config_from_args(Example, _parse(["--config", str(cfg)]))
    msg = str(err.value)
    assert "unknown config key 'backbne'" in msg and str(cfg) in msg and "backbone" in msg


def test_wrong_type_is_an_error():
    with pytest.raises(DeepEMDError, match="'way' must be int"):
        build_config(Example, {"way": "five"})
    with pytest.raises(DeepEMDError, match="'lr'"):
        build_config(Example, {"lr": [1, 2]})


def test_precedence_default_yaml_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("way: 10\nlr: 0.5\npyramid: [3, 2, 1]\n")
    out = config_from_args(Example, _parse(["--config", str(cfg), "--lr", "0.01"]))
    assert out == Example(way=10, lr=0.01, pyramid=(3, 2, 1))
    assert config_from_args(Example, _parse(["--pyramid", "2", "1", "--resume", "true"])) == Example(
        pyramid=(2, 1), resume=True
    )
    assert config_from_args(Example, _parse(["--resume"])).resume is True
    assert config_from_args(Example, _parse(["--resume", "false"])).resume is False


def test_optional_and_scalar_to_tuple():
    assert build_config(Example, {"checkpoint": None, "pyramid": 3}) == Example(pyramid=(3,))
    assert build_config(Example, {"checkpoint": "a.pt"}).checkpoint == "a.pt"


def test_bad_yaml_files(tmp_path):
    with pytest.raises(DeepEMDError, match="config file not found"):
        read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(DeepEMDError, match="not valid YAML"):
        read_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(DeepEMDError, match="mapping"):
        read_yaml(listy)
