"""deepemd.eval: what both jobs report with: confidence intervals, result tables, retrieval
metrics (pml's AccuracyCalculator), and pictures of matching flows."""

from deepemd.eval.ci import mean_ci95
from deepemd.eval.tables import write_results

__all__ = ["mean_ci95", "write_results"]
