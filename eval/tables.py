"""Result tables written twice: ``results.csv`` for machines and ``results.md`` for people."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

from deepemd.io import atomic_path


def write_results(
    rows: Iterable[Mapping[str, object]] | pd.DataFrame,
    out_dir: str | Path,
    name: str = "results",
    float_format: str = "%.2f",
) -> pd.DataFrame:
    """Write ``out_dir/name.csv`` and ``out_dir/name.md`` atomically; return the frame."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / f"{name}.csv") as tmp:
        frame.to_csv(tmp, index=False, float_format=float_format)
    with atomic_path(out / f"{name}.md") as tmp:
        tmp.write_text(to_markdown(frame, float_format) + "\n")
    return frame


def to_markdown(frame: pd.DataFrame, float_format: str = "%.2f") -> str:
    """A GitHub markdown table (no ``tabulate`` dependency); a missing value (NaN) is an empty
    cell, as it is in the CSV."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else float_format % v
        return str(v)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])
