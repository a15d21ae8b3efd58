"""The documented usage cannot rot: every code block of the README and docs/ is checked.

- ``python`` blocks run as written (in a temporary folder, with the small data they name), except
  blocks marked ``<!-- snippet: needs-data -->`` just above (they name a user's dataset): those
  must still compile and their imports must resolve.
- ``bash`` blocks: every ``deepemd ...`` command (also under ``torchrun``) is parsed by the real CLI
  and its options are checked like a run would check them (types, choices, bounds, ``--config``
  files); every ``python benchmarks/X.py ...`` line is parsed by that script's own argparse.
"""

from __future__ import annotations

import ast
import os
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- snippet: (?P<mark>[\w-]+) -->\s*\n)?```(?P<lang>\w+)\n(?P<body>.*?)```", re.S)
#: Set-up and tooling lines: CI itself runs them (.ci/run runs the README's test command).
TOOLING = (
    "pip",
    "python3 -m venv",
    "python -m pytest",
    "apt-get",
    ".",
    "source",
    "cd",
    "git",
    "bash",
    "time",
    "mkdocs",
    "ruff",
    "mypy",
    "export",
)


def blocks(lang: str) -> list[tuple[str, str, str]]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in FENCE.finditer(text):
            if match["lang"] == lang:
                line = text[: match.start("body")].count("\n") + 1
                found.append((f"{doc.name}:{line}", match["mark"] or "", match["body"]))
    return found


def commands(body: str) -> list[list[str]]:
    """Shell commands of a block: continuation lines joined, comments dropped, split on && ; |."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"\s*(?:&&|;|\|)\s*", line):
            tokens = shlex.split(part.replace("$(which deepemd)", "deepemd"), comments=True)
            if tokens:
                out.append(tokens)
    return out


def check_deepemd(argv: list[str]) -> None:
    from deepemd.cli import build_parser
    from deepemd.config import config_from_args

    args = build_parser().parse_args(argv)
    cls = getattr(args, "config_class", None)
    if cls is not None:
        cwd = os.getcwd()
        os.chdir(ROOT)  # documented --config paths are relative to the repository
        try:
            config_from_args(cls, args)
        finally:
            os.chdir(cwd)


def check_benchmark(argv: list[str], monkeypatch) -> None:
    script = ROOT / argv[0]
    assert script.is_file(), f"{argv[0]} does not exist"
    monkeypatch.setattr(sys, "argv", [str(script), *argv[1:], "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code in (0, None), f"{' '.join(argv)}: its argparse refused the documented flags"


SHELL = [(where, mark, body) for lang in ("bash", "sh", "shell") for where, mark, body in blocks(lang)]
PYTHON = blocks("python")


@pytest.mark.parametrize("where,mark,body", SHELL, ids=[w for w, _, _ in SHELL])
def test_documented_commands_parse(where, mark, body, monkeypatch, capsys):
    for argv in commands(body):
        if argv[0] == "torchrun":
            argv = argv[argv.index("deepemd") :]
        if argv[0] == "deepemd":
            check_deepemd(argv[1:])
        elif argv[0] == "python" and argv[1].startswith("benchmarks/"):
            check_benchmark(argv[1:], monkeypatch)
        elif argv[0] == "python" and argv[1] == "tests/cli_bad_inputs.py":
            assert (ROOT / argv[1]).is_file()
        else:
            assert " ".join(argv).startswith(TOOLING), f"{where}: no check for `{' '.join(argv)}`"


@pytest.mark.slow
@pytest.mark.parametrize("where,mark,body", PYTHON, ids=[w for w, _, _ in PYTHON])
def test_python_snippets_run(where, mark, body, tmp_path, monkeypatch):
    tree = ast.parse(body, filename=where)
    monkeypatch.chdir(tmp_path)
    if mark == "needs-data":
        imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        exec(compile(ast.Module(imports, []), where, "exec"), {})
        return
    exec(compile(tree, where, "exec"), {"__name__": "__snippet__"})
