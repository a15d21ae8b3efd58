"""The CLI answers every bad input with one message, exit code 2 and no traceback.

The cases live in ``tests/cli_bad_inputs.py``, which also prints the README's table of them.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from cli_bad_inputs import CASES, cannot_run, run_case


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_gets_one_clear_error(case, tmp_path):
    if cannot_run(case):
        pytest.skip(cannot_run(case))
    code, stderr, names = run_case(case, tmp_path)
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert "deepemd: error:" in stderr
    message = stderr[stderr.index("deepemd: error:") :]  # tqdm bars may precede it on stderr
    assert case.expect.lower() in message.lower()
    assert names in message
    assert len(message.splitlines()) <= 3  # the message and its fix, not a wall


def test_console_script_exit_code_and_debug(tmp_path):
    missing = tmp_path / "nope"
    argv = [
        sys.executable,
        "-m",
        "deepemd.cli",
        "retrieval",
        "eval",
        "--layout",
        "folder",
        "--data-root",
        str(missing),
        "--out",
        str(tmp_path / "o"),
    ]
    plain = subprocess.run(argv, capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and str(missing) in plain.stderr
    debug = subprocess.run(argv[:3] + ["--debug"] + argv[3:], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_help_lists_both_jobs():
    out = subprocess.run([sys.executable, "-m", "deepemd.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("retrieval", "fewshot", "demo", "bench"):
        assert command in out.stdout


def test_skip_bad_turns_the_corrupt_image_error_into_a_counted_skip(tmp_path):
    from cli_bad_inputs import _corrupt_image

    argv, bad = _corrupt_image(tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 of 12 images"):
        from deepemd.cli import main

        code = main(argv + ["--methods", "fcn", "--flow-queries", "0", "--skip-bad"])
    assert code == 0
    import pandas as pd

    frame = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(frame["method"]) == ["raw", "+DeepEMD-FCN"]


def test_fewshot_skip_bad_drops_the_truncated_image(tmp_path):
    from cli_bad_inputs import _fewshot_test, _truncated_image

    from deepemd.cli import main

    argv, _ = _truncated_image(tmp_path)
    root = argv[argv.index("--data-root") + 1]
    with pytest.warns(UserWarning, match="skipped 1 of"):
        code = main(_fewshot_test(root, tmp_path / "fs", "--methods", "protonet", "--skip-bad"))
    assert code == 0 and (tmp_path / "fs" / "results.csv").is_file()
