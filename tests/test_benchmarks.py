"""Every script in benchmarks/ imports against the current package and answers ``--help``:
they print the README's speed tables, so an API change must not leave one behind."""

import runpy
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.py"))


def test_there_are_benchmark_scripts():
    assert len(SCRIPTS) >= 5


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_imports_and_prints_help(script, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", [script.name, "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(script), run_name="__main__")
    assert stop.value.code == 0
    assert "usage" in capsys.readouterr().out


def deepemd_command(*argv: str) -> str:
    """The installed command in its own process (it sets the process's malloc options)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "from deepemd.cli import main; raise SystemExit(main())", *argv],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(f"| {first_cell}")
    ]


def test_bench_pipeline_runs_the_eval_beside_its_floors_on_real_images():
    out = deepemd_command(
        "bench", "pipeline", "--max-classes", "3", "--per-class", "4", "--image-size", "64",
        "--patch-size", "32", "--methods", "fcn", "grid", "--rerank-queries", "4", "--threads", "1",
    )  # fmt: skip
    for kind in ("fcn", "grid"):
        (row,) = table_rows(out, f"{kind} |")
        ours, floor, ratio = float(row[1]), float(row[2].split()[0]), float(row[3])
        assert ours > 0 and floor > 0 and 0 < ratio < 100  # seconds print to 3 digits: no exact ratio
    reranks = table_rows(out, "+DeepEMD-")
    assert [r[0].split()[0] for r in reranks] == ["+DeepEMD-FCN", "+DeepEMD-Grid"]
    assert all(float(r[1]) > 0 and float(r[3]) > 0 for r in reranks)
    assert "whole eval: ours" in out and "ours / floor" in out


def test_bench_episodes_times_fewshot_test_beside_the_emd_work():
    out = deepemd_command("bench", "episodes", "--episodes", "2", "--image-size", "32", "--threads", "1")
    assert "EMD work alone" in out
    (row,) = table_rows(out, "DeepEMD-FCN |")
    assert float(row[1]) > 0 and float(row[2]) > 0
