"""mkdocs hook: lay out the ``deepemd`` namespace as the installed wheel has it, for mkdocstrings.

pyproject maps three folders into the package (``retrieval/`` -> ``deepemd.retrieval``, ``fewshot/``
-> ``deepemd.fewshot``, ``eval/`` -> ``deepemd.eval``); griffe reads sources statically and knows
no such mapping. This builds ``build/apisrc/deepemd`` from symbolic links (the core's entries
plus the three job folders) so the API pages document every public module without importing it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "apisrc"
MAPPED = {"retrieval": "retrieval", "fewshot": "fewshot", "eval": "eval"}


def on_startup(**_: Any) -> None:
    package = TREE / "deepemd"
    if TREE.exists():
        shutil.rmtree(TREE)
    package.mkdir(parents=True)
    for entry in (ROOT / "deepemd").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in MAPPED.items():
        (package / name).symlink_to(ROOT / folder)
