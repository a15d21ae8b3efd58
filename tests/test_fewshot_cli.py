"""The outside contract: `deepemd fewshot test --layout folder ... --out OUT` writes results.csv
(method, way, shot, accuracy, ci95; one row per method, all on the same episodes), results.md
and a flow picture; bad input is one clear error."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from deepemd.cli import main


def write_pattern_folder(root: Path, classes: int = 10, per_class: int = 4, size: int = 40) -> Path:
    """Class k: stripes of period 3 + k at angle 18k degrees, in a class colour, plus noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for k in range(classes):
        folder = root / f"class{k:02d}"
        folder.mkdir(parents=True)
        angle = np.deg2rad(18 * k)
        stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / (3 + k)) > 0
        colour = np.array([40 + 20 * k, 200 - 15 * k, 90 + (37 * k) % 150])
        for i in range(per_class):
            img = stripes[..., None] * colour + rng.normal(0, 25, (size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_pattern_folder(tmp_path_factory.mktemp("fewshot_folder"))


def test_contract_command_writes_the_results_table(folder, tmp_path):
    out = tmp_path / "out"
    code = main(
        [
            "fewshot",
            "test",
            "--layout",
            "folder",
            "--data-root",
            str(folder),
            "--backbone",
            "efficientnet_lite0",
            "--way",
            "5",
            "--shot",
            "1",
            "--episodes",
            "3",
            "--query",
            "2",
            "--image-size",
            "64",
            "--finetune-steps",
            "10",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    table = pd.read_csv(out / "results.csv")
    assert list(table.columns[:5]) == ["method", "way", "shot", "accuracy", "ci95"]
    assert {"DeepEMD-FCN", "ProtoNet", "Cosine classifier"} <= set(table["method"])
    assert (table["way"] == 5).all() and (table["shot"] == 1).all() and (table["episodes"] == 3).all()
    assert table["accuracy"].between(0, 100).all() and (table["ci95"] >= 0).all()
    assert (out / "results.md").read_text().startswith("| method |")
    assert (out / "flows.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    per_episode = pd.read_csv(out / "episodes.csv")
    for _, row in table.iterrows():  # the table is the mean of the per-episode accuracies
        assert per_episode[row["method"]].mean() == pytest.approx(row["accuracy"], abs=0.01)


def test_k_shot_run_adds_the_k_shot_rules(folder, tmp_path):
    out = tmp_path / "out5"
    assert (
        main(
            [
                "fewshot",
                "test",
                "--data-root",
                str(folder),
                "--backbone",
                "efficientnet_lite0",
                "--shot",
                "2",
                "--query",
                "1",
                "--episodes",
                "2",
                "--image-size",
                "64",
                "--sfc-steps",
                "3",
                "--methods",
                "emd",
                "emd_nn",
                "emd_fusion",
                "emd_merge",
                "protonet",
                "--flow-picture",
                "false",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    methods = list(pd.read_csv(out / "results.csv")["method"])
    assert methods == ["DeepEMD-FCN+SFC", "DeepEMD-FCN+NN", "DeepEMD-FCN+Fusion", "DeepEMD-FCN+Merge", "ProtoNet"]


def test_bad_input_is_one_clear_error(folder, tmp_path, capsys):
    assert main(["fewshot", "test", "--data-root", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    assert (
        main(
            [
                "fewshot",
                "test",
                "--data-root",
                str(folder),
                "--way",
                "9",
                "--backbone",
                "efficientnet_lite0",
                "--image-size",
                "32",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "9-way" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("shots: 5\n")
    assert main(["fewshot", "test", "--config", str(bad)]) == 2
    assert "did you mean 'shot'" in capsys.readouterr().err
