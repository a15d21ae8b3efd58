"""Arrows only point down: jobs -> eval -> core. Read from the sources' import statements.

- the core (``deepemd/``) imports no job and not ``deepemd.eval``;
- ``deepemd.eval`` imports no job;
- a job never imports the other job;
- no stage of a job imports its job's ``eval``/``test`` command module (the builders live apart).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "deepemd": ROOT / "deepemd",
    "deepemd.retrieval": ROOT / "retrieval",
    "deepemd.fewshot": ROOT / "fewshot",
    "deepemd.eval": ROOT / "eval",
}
JOBS = ("deepemd.retrieval", "deepemd.fewshot")
#: The command modules that run a job's last stage: only the CLI and bench modules may import them.
COMMAND_MODULES = {"deepemd.retrieval": "deepemd.retrieval.evaluate", "deepemd.fewshot": "deepemd.fewshot.evaluate"}


def modules() -> list[tuple[str, str, Path]]:
    found = []
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "deepemd" and parts and parts[0] in ("retrieval", "fewshot", "eval"):
                continue
            found.append((package, name, path))
    return found


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


MODULES = modules()


@pytest.mark.parametrize("package,name,path", MODULES, ids=[m[1] for m in MODULES])
def test_imports_point_down(package, name, path):
    found = imports(path)
    if package == "deepemd":
        forbidden = [*JOBS, "deepemd.eval"]
    elif package == "deepemd.eval":
        forbidden = list(JOBS)
    else:
        forbidden = [job for job in JOBS if job != package]
    bad = sorted(i for i in found if any(_under(i, f) for f in forbidden))
    assert not bad, f"{name} imports {bad}"
    if package in COMMAND_MODULES and not name.endswith((".cli", ".bench", COMMAND_MODULES[package])):
        assert not any(_under(i, COMMAND_MODULES[package]) for i in found), (
            f"{name} imports the command module {COMMAND_MODULES[package]}"
        )


def test_every_package_was_read():
    assert {p for p, _, _ in MODULES} == set(PACKAGES) and len(MODULES) > 40
