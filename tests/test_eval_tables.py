"""deepemd.eval: the 95% interval by hand, and the csv/markdown pair."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from deepemd.eval import mean_ci95, write_results


def test_ci95_matches_hand_computation():
    values = [0.6, 0.8, 0.4, 1.0]
    mean = 0.7
    std = math.sqrt(((0.1) ** 2 + (0.1) ** 2 + (0.3) ** 2 + (0.3) ** 2) / 4)  # population std
    got_mean, got_half = mean_ci95(values)
    assert got_mean == pytest.approx(mean)
    assert got_half == pytest.approx(1.96 * std / 2.0)


def test_ci95_rejects_empty():
    with pytest.raises(ValueError):
        mean_ci95([])


def test_write_results_csv_and_markdown(tmp_path):
    rows = [{"method": "raw", "P@1": 61.834}, {"method": "+DeepEMD-FCN", "P@1": 63.4}]
    write_results(rows, tmp_path)
    frame = pd.read_csv(tmp_path / "results.csv")
    assert list(frame["method"]) == ["raw", "+DeepEMD-FCN"]
    assert frame["P@1"].tolist() == [61.83, 63.40]
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[0] == "| method | P@1 |" and md[2] == "| raw | 61.83 |"
