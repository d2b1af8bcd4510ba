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

Results are cached per checkpoint, next to it: ``RUN_DIR/hessian/epoch_NNNN_GROUP.json`` holds
one entry per set of settings (kind, group classes, split, loss, Lanczos limits, seed, and the
checkpoint's SHA-256 from the run's manifest), and the densities go to
``RUN_DIR/hessian/epoch_NNNN_GROUP_slq_KEY.npz``. A report rerun with the same settings
recomputes nothing; new settings add entries.

>>> report = build_report(["runs/sgd", "runs/sam", "runs/imbsam", "runs/ssesam"])
>>> write_report(report, "report/")     # table.csv, table.md, report.json, PNG + HTML figures
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from landscape.errors import AnalysisError
from train import checkpoint as ckpt
from train.io import atomic_write_bytes, atomic_write_json

__all__ = ["ReportSettings", "GroupIndicators", "RunSummary", "SaddleReport", "check_runs",
           "select_checkpoints", "group_indicators", "group_density", "build_report",
           "write_report", "CACHE_FORMAT"]

CACHE_FORMAT = "landscape-hessian-cache/1"
OPTIMIZER_NAMES = {"sgd": "SGD", "sam": "SAM", "imbsam": "ImbSAM", "ssesam": "SSE-SAM"}
PathLike = Union[str, Path]


@dataclass(frozen=True)
class ReportSettings:
    """What the report computes.

    Attributes:
        every: use checkpoints whose epoch is a multiple of ``every`` (and always the last).
        steps: Lanczos steps at most for the extremes, and per SLQ probe.
        probes: SLQ probes for the densities.
        seed: seed of Lanczos's start vector and of the SLQ probes.
        tol: relative residual tolerance of the extreme eigenpairs.
        split: the groups' samples, ``train`` or ``test``.
        groups: the groups compared.
        densities: whether to estimate the final checkpoints' spectral densities.
    """

    every: int = 1
    steps: int = 100
    probes: int = 10
    seed: int = 0
    tol: float = 1e-4
    split: str = "train"
    groups: tuple[str, ...] = ("head", "tail")
    densities: bool = True

    def __post_init__(self) -> None:
        for name in ("every", "steps", "probes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AnalysisError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise AnalysisError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not (isinstance(self.tol, (int, float)) and 0 < self.tol < 1):
            raise AnalysisError(f"tol must be in (0, 1), got {self.tol!r}")
        if self.split not in ("train", "test"):
            raise AnalysisError(f"split must be train or test, got {self.split!r}")
        if not self.groups:
            raise AnalysisError("no groups to compare")


@dataclass(frozen=True)
class GroupIndicators:
    """The saddle indicators of one group at one checkpoint.

    Attributes:
        epoch: the checkpoint's epoch.
        group: the group's name.
        lambda_max, lambda_min: extreme eigenvalues of the group loss's Hessian.
        ratio: ``lambda_min / lambda_max`` (NaN when ``lambda_max`` is 0).
        converged: whether both residuals met the tolerance within the step limit.
        residuals: ``(top, bottom)`` Ritz residuals ``||H x - theta x||``.
        lanczos_steps: Lanczos steps taken (= Hessian-vector products).
        seconds: time the computation took (as recorded when it was computed).
    """

    epoch: int
    group: str
    lambda_max: float
    lambda_min: float
    ratio: float
    converged: bool
    residuals: tuple[float, float]
    lanczos_steps: int
    seconds: float

    def to_json(self) -> dict:
        return {**asdict(self), "residuals": list(self.residuals)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "GroupIndicators":
        return cls(int(data["epoch"]), str(data["group"]), float(data["lambda_max"]),
                   float(data["lambda_min"]), float(data["ratio"]), bool(data["converged"]),
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
    """

    label: str
    run_dir: str
    optimizer: str
    final_epoch: int
    switch_epoch: Optional[int]
    accuracy: Mapping[str, float]
    indicators: tuple[GroupIndicators, ...]
    densities: Mapping[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

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


TABLE_COLUMNS = ("run", "optimizer", "epoch", "acc", "many", "medium", "few")


@dataclass(frozen=True, eq=False)
class SaddleReport:
    """The report: every run's summary and the settings used."""

    runs: tuple[RunSummary, ...]
    settings: ReportSettings
    dataset: str
    groups: Mapping[str, list[int]]

    def table_rows(self) -> list[dict[str, Any]]:
        """One row per run, at its final checkpoint: accuracy many / medium / few and each
        group's ``lambda_max``, ``lambda_min`` and ``lambda_min / lambda_max``."""
        rows = []
        for run in self.runs:
            row = {"run": run.label, "optimizer": OPTIMIZER_NAMES.get(run.optimizer, run.optimizer),
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
        rows = self.table_rows()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in row.items()})
        return buffer.getvalue()

    def to_markdown(self) -> str:
        """The table as Markdown: accuracies in %, eigenvalues to 3 significant digits."""
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
        return {
            "dataset": self.dataset, "groups": dict(self.groups),
            "settings": {**asdict(self.settings), "groups": list(self.settings.groups)},
            "table": self.table_rows(),
            "runs": [{"label": r.label, "run_dir": r.run_dir, "optimizer": r.optimizer,
                      "final_epoch": r.final_epoch, "switch_epoch": r.switch_epoch,
                      "accuracy": dict(r.accuracy),
                      "indicators": [i.to_json() for i in r.indicators]} for r in self.runs],
        }


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


# --------------------------------------------------------------------------------------------
# Runs and checkpoints


def check_runs(run_dirs: Sequence[PathLike]) -> list[tuple[Path, dict]]:
    """Reads each run's ``config.json`` and checks that the runs can be compared.

    Raises:
        AnalysisError: no runs, a run given twice, a run without checkpoints, or runs of
            different datasets, imbalance or head / tail groups.
        train.checkpoint.CheckpointError: a missing or unreadable ``config.json``.
    """
    if not run_dirs:
        raise AnalysisError("no run folders given")
    found, seen = [], {}
    for run_dir in run_dirs:
        path = Path(run_dir)
        resolved = path.resolve()
        if resolved in seen:
            raise AnalysisError(f"{path}: given twice")
        seen[resolved] = path
        config = ckpt.read_config(path)
        if not ckpt.list_checkpoints(path):
            raise AnalysisError(f"{path}: no epoch_NNNN.pt checkpoints in this run folder")
        found.append((path, config))
    first_path, first = found[0]

    def facts(config: dict) -> dict:
        derived = config.get("derived", {})
        return {"dataset": config.get("dataset"), "imb_factor": config.get("imb_factor"),
                "selection": config.get("selection"), "groups": derived.get("groups")}

    for path, config in found[1:]:
        a, b = facts(first), facts(config)
        for key in a:
            if a[key] != b[key]:
                raise AnalysisError(f"runs cannot be compared: {first_path} has {key} "
                                    f"{a[key]}, {path} has {b[key]}")
    return found


def select_checkpoints(run_dir: PathLike, every: int = 1) -> list[tuple[int, Path]]:
    """The run's checkpoints whose epoch is a multiple of ``every``, and always the last."""
    found = ckpt.list_checkpoints(run_dir)
    if not found:
        raise AnalysisError(f"{run_dir}: no epoch_NNNN.pt checkpoints in this run folder")
    chosen = [(e, p) for e, p in found if e % every == 0]
    if not chosen or chosen[-1][0] != found[-1][0]:
        chosen.append(found[-1])
    return chosen


# --------------------------------------------------------------------------------------------
# Cached computations


def _checkpoint_digest(path: Path) -> Optional[str]:
    try:
        manifest = json.loads((path.parent / ckpt.MANIFEST).read_text())
        return manifest[path.name]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cache_key(run, group: str, kind: str, settings: ReportSettings) -> dict:
    """Everything that determines a cached result."""
    key = {"kind": kind, "group": group, "classes": run.classes(group), "split": settings.split,
           "loss": run.config.loss, "seed": settings.seed, "steps": settings.steps,
           "dtype": "float64", "checkpoint_sha256": _checkpoint_digest(run.path)}
    if kind == "extremes":
        key["tol"] = settings.tol
    else:
        key["probes"] = settings.probes
    return key


def _key_id(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _cache_folder(run) -> Path:
    return run.run_dir / "hessian"


def _read_entries(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return {}  # another tool's file or a damaged one: recompute (and rewrite) it
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def group_indicators(run, group: str, settings: ReportSettings = ReportSettings(),
                     cache: bool = True) -> GroupIndicators:
    """``lambda_max``, ``lambda_min`` and their ratio for ``group`` at ``run``'s checkpoint,
    read from ``RUN_DIR/hessian/epoch_NNNN_GROUP.json`` when computed before with the same
    settings, else computed (:func:`landscape.hessian.hessian_summary`, float64) and added to
    that file with the whole summary."""
    from landscape.hessian import hessian_summary

    key = _cache_key(run, group, "extremes", settings)
    key_id = _key_id(key)
    path = _cache_folder(run) / f"epoch_{run.epoch:04d}_{group}.json"
    entries = _read_entries(path) if cache else {}
    if key_id in entries and entries[key_id].get("key") == key:
        return GroupIndicators.from_json(entries[key_id]["result"])
    summary = hessian_summary(run, group, top=1, bottom=1, seed=settings.seed,
                              split=settings.split, tol=settings.tol, max_steps=settings.steps)
    indicators = GroupIndicators(
        epoch=run.epoch, group=group, lambda_max=summary.top[0], lambda_min=summary.bottom[0],
        ratio=math.nan if summary.ratio is None else summary.ratio,
        converged=summary.converged,
        residuals=(float(summary.residuals["top"][0]), float(summary.residuals["bottom"][0])),
        lanczos_steps=summary.lanczos_steps, seconds=summary.seconds)
    if cache:
        path.parent.mkdir(exist_ok=True)
        entries = _read_entries(path)  # re-read: another process may have added entries
        entries[key_id] = {"key": key, "result": indicators.to_json(),
                           "summary": summary.to_json()}
        atomic_write_json(path, {"format": CACHE_FORMAT, "entries": entries})
    return indicators


def group_density(run, group: str, settings: ReportSettings = ReportSettings(),
                  cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(grid, density)``: the SLQ spectral density of ``group``'s Hessian at ``run``'s
    checkpoint, cached in ``RUN_DIR/hessian/epoch_NNNN_GROUP_slq_KEY.npz``."""
    from landscape.hessian import spectral_densities

    key = _cache_key(run, group, "slq", settings)
    path = _cache_folder(run) / f"epoch_{run.epoch:04d}_{group}_slq_{_key_id(key)}.npz"
    if cache and path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                if json.loads(str(f["key"])) == key:
                    return f["grid"], f["density"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            pass  # damaged: recompute
    density = spectral_densities(run, [group], probes=settings.probes, steps=settings.steps,
                                 seed=settings.seed, split=settings.split)[group]
    if cache:
        path.parent.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, grid=density.grid, density=density.density, nodes=density.nodes,
                 weights=density.weights, key=np.array(json.dumps(key, sort_keys=True)))
        atomic_write_bytes(path, buffer.getvalue())
    return density.grid, density.density


# --------------------------------------------------------------------------------------------
# The report


def _final_accuracy(run) -> dict[str, float]:
    """Test accuracy at the checkpoint: from ``metrics.jsonl`` (what training measured), or
    evaluated now when the run has no line for that epoch (e.g. epoch 0)."""
    for row in ckpt.read_metrics(run.run_dir):
        if row.get("epoch") == run.epoch:
            return {k: float(v) for k, v in row.items() if k.startswith("acc")}
    from train.loop import evaluate

    return evaluate(run.model, run.data, run.groups, tta=run.config.tta)


def _labels(found: Sequence[tuple[Path, dict]]) -> list[str]:
    names = [OPTIMIZER_NAMES.get(c.get("opt"), str(c.get("opt"))) for _, c in found]
    return [name if names.count(name) == 1 else f"{name} ({path.name})"
            for name, (path, _) in zip(names, found)]


def build_report(run_dirs: Sequence[PathLike], settings: ReportSettings = ReportSettings(),
                 device=None, progress: Optional[Callable[[str], object]] = None,
                 cache: bool = True) -> SaddleReport:
    """Computes (or reads from the caches) everything the report shows.

    Args:
        run_dirs: run folders to compare (same dataset and groups).
        settings: see :class:`ReportSettings`.
        device: where to compute (default: CUDA if available).
        progress: called with a short description after each checkpoint and group.
        cache: read and write the per-checkpoint caches.
    """
    from landscape.load import load

    found = check_runs(run_dirs)
    known = found[0][1].get("derived", {}).get("groups", {})
    for group in settings.groups:  # a bad group fails before any computation
        if group != "all" and not known.get(group):
            raise AnalysisError(f"group {group!r} is unknown or empty in these runs (they have "
                                + ", ".join(f"{g}: {len(c)} classes" for g, c in known.items())
                                + ")")
    summaries = []
    for (run_dir, config), label in zip(found, _labels(found)):
        indicators = []
        run = None
        data = None
        for epoch, path in select_checkpoints(run_dir, settings.every):
            run = load(path, device=device)
            if data is None:
                data = run.data
            # The dataset does not depend on the epoch: build it once per run.
            run = dataclasses.replace(run, _data=data)
            for group in settings.groups:
                indicators.append(group_indicators(run, group, settings, cache))
                if progress is not None:
                    progress(f"{label} epoch {epoch} {group}")
        densities = {}
        if settings.densities:
            for group in settings.groups:
                densities[group] = group_density(run, group, settings, cache)
                if progress is not None:
                    progress(f"{label} density {group}")
        derived = config.get("derived", {})
        switch = derived.get("switch_epoch") if config.get("opt") == "ssesam" else None
        summaries.append(RunSummary(label, str(run_dir), str(config.get("opt")), run.epoch,
                                    switch, _final_accuracy(run), tuple(indicators), densities))
    first = found[0][1]
    return SaddleReport(tuple(summaries), settings, str(first.get("dataset")),
                        dict(first.get("derived", {}).get("groups", {})))


def write_report(report: SaddleReport, out: PathLike) -> list[Path]:
    """Writes ``table.csv``, ``table.md``, ``report.json``, ``report.md`` and the figures
    (``indicators.png/.html``, ``densities.png/.html``) into ``out``; returns the paths."""
    from landscape import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    series = {r.label: {g: r.series(g) for g in report.settings.groups} for r in report.runs}
    switches = {r.label: r.switch_epoch for r in report.runs if r.switch_epoch is not None}
    groups = report.settings.groups
    written.append(plots.plot_indicators_png(series, out / "indicators.png", switches, groups))
    written.append(plots.plot_indicators_html(series, out / "indicators.html", switches, groups))
    densities = {r.label: dict(r.densities) for r in report.runs if r.densities}
    epochs = {r.label: r.final_epoch for r in report.runs}
    if densities:
        written.append(plots.plot_group_densities_png(densities, out / "densities.png", epochs))
        written.append(plots.plot_group_densities_html(densities, out / "densities.html",
                                                       epochs))
    table = report.to_markdown()
    for name, text in (("table.csv", report.to_csv()), ("table.md", table),
                       ("report.md", _report_markdown(report, table, densities))):
        atomic_write_bytes(out / name, text.encode("utf-8"))
        written.append(out / name)
    atomic_write_json(out / "report.json", report.to_json())
    written.append(out / "report.json")
    return written


def _report_markdown(report: SaddleReport, table: str, densities) -> str:
    s = report.settings
    groups = ", ".join(f"{g} = classes {report.groups.get(g)}" for g in s.groups)
    lines = [
        f"# Saddle report ({report.dataset})", "",
        f"Groups: {groups}. Final checkpoint of each run; test accuracy in % (mean per class, "
        "and over the many / medium / few classes); extreme eigenvalues of the Hessian of each "
        f"group's mean {s.split}-set loss (Lanczos, at most {s.steps} steps, relative residual "
        f"tolerance {s.tol:g}, seed {s.seed}). λmin/λmax < 0: the group's loss is at a saddle.",
        "", table, "![saddle indicators over training](indicators.png)", "",
        "Interactive: [indicators.html](indicators.html)",
    ]
    if densities:
        lines += ["", "![head vs tail spectral densities](densities.png)", "",
                  f"SLQ: {s.probes} probes x {s.steps} Lanczos steps. Interactive: "
                  "[densities.html](densities.html)"]
    unconverged = [f"{r.label} epoch {i.epoch} {i.group}" for r in report.runs
                   for i in r.indicators if not i.converged]
    if unconverged:
        lines += ["", f"Not converged to the tolerance within {s.steps} steps (the residuals "
                      f"are in report.json): {', '.join(unconverged)}."]
    return "\n".join(lines) + "\n"
