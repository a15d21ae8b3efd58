"""What a new user meets with the few-shot commands' defaults: a random backbone is not
evaluated unasked, a missing-weights error names the flag to pass, and re-running a finished
training run says so instead of exiting silently."""

from pathlib import Path

import pytest
from test_fewshot_cli import write_pattern_folder  # tests/ is on sys.path (pytest prepend mode)

from deepemd.cli import main

TINY = ["--layout", "folder", "--backbone-widths", "4", "4", "4", "8", "--image-size", "32"]
QUICK_TEST = ["--way", "2", "--query", "1", "--episodes", "1", "--methods", "protonet", "--flow-picture", "false"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_pattern_folder(tmp_path_factory.mktemp("fewshot_defaults"), classes=8, per_class=3, size=32)


def test_test_refuses_an_untrained_resnet12(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["fewshot", "test", "--data-root", str(folder), *TINY, *QUICK_TEST, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no pretrained weights" in err and "--checkpoint" in err
    assert "fewshot pretrain" in err and "efficientnet_lite0" in err and "--weights none" in err
    assert not (out / "results.csv").exists()


def test_test_evaluates_a_random_backbone_when_asked(folder, tmp_path):
    out = tmp_path / "out"
    argv = ["fewshot", "test", "--data-root", str(folder), *TINY, *QUICK_TEST, "--weights", "none"]
    assert main([*argv, "--out", str(out)]) == 0
    assert (out / "results.csv").is_file()


def test_imagenet_weights_error_names_the_flags(folder, tmp_path, capsys):
    argv = ["fewshot", "test", "--data-root", str(folder), *TINY, *QUICK_TEST, "--weights", "imagenet"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no packaged ImageNet weights for 'resnet12'" in err
    assert "--backbone efficientnet_lite0" in err and "--weights FILE" in err and "--weights none" in err


@pytest.mark.parametrize(
    ("command", "extra", "name"),
    [
        ("pretrain", ["--batch-size", "8"], "pretrain"),
        ("train", ["--way", "2", "--shot", "1", "--query", "1", "--episodes-per-epoch", "1"], "meta-train"),
    ],
)
def test_rerunning_a_finished_run_says_it_is_complete(folder, tmp_path, capsys, command, extra, name):
    out = tmp_path / command
    argv = ["fewshot", command, "--data-root", str(folder), *TINY, "--weights", "none", *extra]
    argv += ["--val-episodes", "0", "--epochs", "1", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "already complete" in line]
    assert len(lines) == 1
    assert lines[0].startswith(f"{name}: already complete: 1 of 1 epochs done")
    assert str(out / "last.pt") in lines[0] and "raise --epochs above 1" in lines[0]


def test_complete_line_only_for_a_resumed_run_and_names_the_epochs_to_pass(tmp_path, capsys):
    from types import SimpleNamespace

    from deepemd.fewshot.checkpoints import say_if_complete

    say_if_complete("pretrain", 0, SimpleNamespace(epochs=0, out=str(tmp_path)))  # fresh --epochs 0: no last.pt
    say_if_complete("pretrain", 2, SimpleNamespace(epochs=5, out=str(tmp_path)))  # epochs left to train
    assert capsys.readouterr().out == ""
    say_if_complete("pretrain", 5, SimpleNamespace(epochs=3, out=str(tmp_path)))  # --epochs lowered after 5
    line = capsys.readouterr().out.strip()
    assert line.startswith("pretrain: already complete: 5 epochs done, more than --epochs 3")
    assert "raise --epochs above 5" in line
