"""What the saddle report holds: per-checkpoint indicators, one summary per run, the report and
its tables (CSV, Markdown, JSON)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from landscape.eigen import saddle_ratio
from landscape.report.settings import ReportSettings
from train.options import OPTIMIZER_LABELS

__all__ = ["GroupIndicators", "RunSummary", "SaddleReport"]


@dataclass(frozen=True)
class GroupIndicators:
    """The saddle indicators of one group at one checkpoint.

    Attributes:
        epoch: the checkpoint's epoch.
        group: the group's name.
        lambda_max, lambda_min: extreme eigenvalues of the group loss's Hessian.
        converged: whether both residuals met the tolerance within the step limit.
        residuals: ``(top, bottom)`` Ritz residuals ``||H x - theta x||``.
        lanczos_steps: Lanczos steps taken (= Hessian-vector products).
        seconds: time the computation took (as recorded when it was computed).

    Example:
        >>> i = GroupIndicators(4, "tail", 2.0, -0.5, True, (1e-9, 1e-9), 30, 0.1)
        >>> i.ratio, GroupIndicators(4, "tail", -1.0, -3.0, True, (0, 0), 30, 0.1).ratio
        (-0.25, nan)
    """

    epoch: int
    group: str
    lambda_max: float
    lambda_min: float
    converged: bool
    residuals: tuple[float, float]
    lanczos_steps: int
    seconds: float

    @property
    def ratio(self) -> float:
        """:func:`landscape.eigen.saddle_ratio` (NaN when ``lambda_max <= 0``)."""
        return saddle_ratio(self.lambda_min, self.lambda_max)

    def to_json(self) -> dict:
        ratio = self.ratio
        return {**asdict(self), "residuals": list(self.residuals),
                "ratio": None if math.isnan(ratio) else ratio}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "GroupIndicators":
        """The inverse of :meth:`to_json` (a stored ``ratio`` is recomputed, not read)."""
        return cls(int(data["epoch"]), str(data["group"]), float(data["lambda_max"]),
                   float(data["lambda_min"]), bool(data["converged"]),
                   tuple(float(r) for r in data["residuals"]), int(data["lanczos_steps"]),
                   float(data["seconds"]))


@dataclass(frozen=True, eq=False)
class RunSummary:
    """One run of the report.

    Attributes:
        label: its name in tables and legends (the optimizer, or the folder if two runs share
            an optimizer).
        run_dir: the run folder.
        optimizer: ``sgd``, ``sam``, ``imbsam`` or ``ssesam``.
        final_epoch: epoch of its last checkpoint.
        switch_epoch: first epoch of SSE-SAM's stage II (``None`` for other optimizers).
        accuracy: test accuracy in % at the final checkpoint: ``acc`` (mean per class),
            ``acc_many``, ``acc_medium``, ``acc_few``, ``acc_head``, ``acc_tail``.
        indicators: one :class:`GroupIndicators` per checkpoint and group, oldest first.
        densities: group -> ``(grid, density)`` at the final checkpoint.
        class_sweep: the per-class sweep of the final checkpoint
            (:class:`landscape.classes.ClassSweep`), or ``None``.
    """

    label: str
    run_dir: str
    optimizer: str
    final_epoch: int
    switch_epoch: Optional[int]
    accuracy: Mapping[str, float]
    indicators: tuple[GroupIndicators, ...]
    densities: Mapping[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    class_sweep: Optional[Any] = None

    def series(self, group: str) -> dict[str, list]:
        """``{"epoch": [...], "lambda_max": [...], "lambda_min": [...], "ratio": [...]}``."""
        rows = [i for i in self.indicators if i.group == group]
        return {"epoch": [i.epoch for i in rows],
                "lambda_max": [i.lambda_max for i in rows],
                "lambda_min": [i.lambda_min for i in rows],
                "ratio": [i.ratio for i in rows]}

    def final(self, group: str) -> Optional[GroupIndicators]:
        found = [i for i in self.indicators if i.group == group and i.epoch == self.final_epoch]
        return found[0] if found else None


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


def _json_value(value):
    """NaN (an undefined ratio, a missing group) as JSON's ``null``."""
    return None if isinstance(value, float) and math.isnan(value) else value


@dataclass(frozen=True, eq=False)
class SaddleReport:
    """The report: every run's summary and the settings used."""

    runs: tuple[RunSummary, ...]
    settings: ReportSettings
    dataset: str
    groups: Mapping[str, list[int]]

    def table_rows(self) -> list[dict[str, Any]]:
        """One row per run, at its final checkpoint: accuracy many / medium / few and each
        group's ``lambda_max``, ``lambda_min`` and ``lambda_min / lambda_max`` (NaN where
        undefined or missing)."""
        rows = []
        for run in self.runs:
            row = {"run": run.label, "optimizer": OPTIMIZER_LABELS.get(run.optimizer,
                                                                       run.optimizer),
                   "epoch": run.final_epoch, "acc": run.accuracy.get("acc"),
                   "many": run.accuracy.get("acc_many"), "medium": run.accuracy.get("acc_medium"),
                   "few": run.accuracy.get("acc_few")}
            for group in self.settings.groups:
                final = run.final(group)
                row[f"{group}_lambda_max"] = final.lambda_max if final else math.nan
                row[f"{group}_lambda_min"] = final.lambda_min if final else math.nan
                row[f"{group}_ratio"] = final.ratio if final else math.nan
            rows.append(row)
        return rows

    def to_csv(self) -> str:
        """The table as CSV, numbers to 6 significant digits (NaN as ``nan``)."""
        rows = self.table_rows()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in row.items()})
        return buffer.getvalue()

    def to_markdown(self) -> str:
        """The table as Markdown: accuracies in %, eigenvalues to 3 significant digits, ``–``
        where a value is undefined."""
        header = ["run", "acc", "many", "medium", "few"]
        for group in self.settings.groups:
            header += [f"{group} λmax", f"{group} λmin", f"{group} λmin/λmax"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.table_rows():
            cells = [row["run"]] + [_fmt(row[k], ".1f") for k in ("acc", "many", "medium", "few")]
            for group in self.settings.groups:
                cells += [_fmt(row[f"{group}_lambda_max"], "#.3g"),
                          _fmt(row[f"{group}_lambda_min"], "#.3g"),
                          _fmt(row[f"{group}_ratio"], ".3f")]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        """``report.json``: dataset, groups, settings, the table (NaN as ``null``) and every
        run's indicators."""
        return {
            "dataset": self.dataset, "groups": dict(self.groups),
            "settings": {**asdict(self.settings), "groups": list(self.settings.groups)},
            "table": [{k: _json_value(v) for k, v in row.items()} for row in self.table_rows()],
            "runs": [{"label": r.label, "run_dir": r.run_dir, "optimizer": r.optimizer,
                      "final_epoch": r.final_epoch, "switch_epoch": r.switch_epoch,
                      "accuracy": dict(r.accuracy),
                      "indicators": [i.to_json() for i in r.indicators],
                      **({"classes": r.class_sweep.to_json()} if r.class_sweep else {})}
                     for r in self.runs],
        }
