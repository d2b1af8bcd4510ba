r"""The saddle report: head and tail Hessian extremes over training, across optimizers.

For every run (one optimizer each: SGD, SAM, ImbSAM, SSE-SAM) and every chosen checkpoint, and
for each group :math:`G` (``head``, ``tail``), the extreme eigenvalues of the Hessian of the
group's mean training loss (:mod:`landscape.hvp`, float64, eval mode, no augmentation) are
found by Lanczos (:func:`landscape.hessian.hessian_summary`), and the saddle indicator

.. math::  r_G = \lambda_{\min}(H_G) / \lambda_{\max}(H_G)

is reported: :math:`r_G < 0` means negative curvature, a saddle of that group's loss, and
:math:`|r_G|` how strong it is relative to the sharpest direction (Rangwani et al. 2022).
At the final checkpoint of each run the head and tail spectral densities are estimated by SLQ
(:func:`landscape.hessian.spectral_densities`).

Results are cached per checkpoint, next to it (:mod:`landscape.report.cache`): a report rerun
with the same settings recomputes nothing; new settings add entries.

The package: :mod:`~landscape.report.settings` (what is computed), :mod:`~landscape.report.cache`
(per-checkpoint results), :mod:`~landscape.report.build` (runs, checkpoints, the report),
:mod:`~landscape.report.results` (what it holds, its tables) and
:mod:`~landscape.report.render` (the files).

>>> report = build_report([run_dir], ReportSettings(steps=30, probes=2, every=3), device="cpu")
>>> row = report.table_rows()[0]                  # also to_markdown(), to_csv(), to_json()
>>> row["run"], row["epoch"], row["tail_lambda_max"] > 0
('SSE-SAM', 3, True)
>>> import tempfile
>>> files = write_report(report, tempfile.mkdtemp())   # tables, report.json, PNG + HTML figures
"""

from landscape.report.build import build_report, check_runs, select_checkpoints
from landscape.report.cache import CACHE_FORMAT, group_density, group_indicators
from landscape.report.render import write_report
from landscape.report.results import GroupIndicators, RunSummary, SaddleReport
from landscape.report.settings import ReportSettings

__all__ = ["ReportSettings", "GroupIndicators", "RunSummary", "SaddleReport", "check_runs",
           "select_checkpoints", "group_indicators", "group_density", "build_report",
           "write_report", "CACHE_FORMAT"]
