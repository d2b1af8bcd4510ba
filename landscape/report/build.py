"""Building the saddle report: the runs compared, their checkpoints, and every indicator
(read from the caches of :mod:`landscape.report.cache` or computed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from landscape.errors import AnalysisError
from landscape.report.cache import group_density, group_indicators
from landscape.report.results import RunSummary, SaddleReport
from landscape.report.settings import DEFAULT_SETTINGS, ReportSettings
from train import checkpoint as ckpt
from train.io import summarize
from train.options import OPTIMIZER_LABELS
from train.run_folder import owner

__all__ = ["check_runs", "select_checkpoints", "build_report", "training_notices"]

PathLike = Union[str, Path]


def training_notices(run_dirs: Sequence[PathLike]) -> list[str]:
    """One line for each run a live process is writing (:func:`train.run_folder.owner`):
    reading it is fine (every file is written whole); the report uses its checkpoints so far
    and writes no cache into it (:mod:`landscape.report.cache`)."""
    notices = []
    for run_dir in run_dirs:
        who = owner(run_dir)
        if who is None:
            continue
        what, _, whom = who.partition(", ")
        doing = f"being trained by {whom}" if what == "training" and whom else f"in use by {who}"
        notices.append(f"{run_dir} is {doing}; using its checkpoints so far (no cache is "
                       "written there)")
    return notices


def check_runs(run_dirs: Sequence[PathLike]) -> list[tuple[Path, dict]]:
    """Reads each run's ``config.json`` and checks that the runs can be compared.

    Raises:
        AnalysisError: no runs, a run given twice, a run without checkpoints, or runs of
            different datasets, imbalance or head / tail groups.
        train.checkpoint.CheckpointError: a missing, unreadable or edited ``config.json``, an
            accuracy in ``metrics.jsonl`` that is not a number.
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
        _check_accuracies(path)
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


def _check_accuracies(run_dir: Path) -> None:
    """The report shows ``metrics.jsonl``'s accuracies: each must be a number."""
    for row in ckpt.read_metrics(run_dir):
        for key, value in row.items():
            if key.startswith("acc") and (isinstance(value, bool)
                                          or not isinstance(value, (int, float))):
                raise ckpt.CheckpointError(
                    f"{run_dir / ckpt.METRICS}: epoch {row.get('epoch')!r} has {key} "
                    f"{summarize(json.dumps(value), 40)}, not a number (edited?)")


def select_checkpoints(run_dir: PathLike, every: int = 1) -> list[tuple[int, Path]]:
    """The run's checkpoints whose epoch is a multiple of ``every``, and always the last."""
    found = ckpt.list_checkpoints(run_dir)
    if not found:
        raise AnalysisError(f"{run_dir}: no epoch_NNNN.pt checkpoints in this run folder")
    chosen = [(e, p) for e, p in found if e % every == 0]
    if not chosen or chosen[-1][0] != found[-1][0]:
        chosen.append(found[-1])
    return chosen


def _final_accuracy(run) -> dict[str, float]:
    """Test accuracy at the checkpoint: from ``metrics.jsonl`` (what training measured), or
    evaluated now when the run has no line for that epoch (e.g. epoch 0)."""
    for row in ckpt.read_metrics(run.run_dir):
        if row.get("epoch") == run.epoch:
            return {k: float(v) for k, v in row.items() if k.startswith("acc")}
    from train.evaluation import evaluate

    loader = None
    if run.streamed:  # the test images are read from the folder, batch by batch
        from train.stream import make_loader

        loader = make_loader(run.data.test, False, 256, workers=run.config.workers,
                             seed=run.config.seed, image_size=run.data.spec.image_shape[-1],
                             device=run.device)
    return evaluate(run.model, run.data, run.groups, tta=run.config.tta, loader=loader)


def _labels(found: Sequence[tuple[Path, dict]]) -> list[str]:
    names = [OPTIMIZER_LABELS.get(c.get("opt"), str(c.get("opt"))) for _, c in found]
    return [name if names.count(name) == 1 else f"{name} ({path.name})"
            for name, (path, _) in zip(names, found)]


def _check_groups(config: dict, settings: ReportSettings) -> None:
    """A group unknown to the runs fails before any computation."""
    known = config.get("derived", {}).get("groups", {})
    for group in settings.groups:
        if group != "all" and not known.get(group):
            raise AnalysisError(f"group {group!r} is unknown or empty in these runs (they have "
                                + ", ".join(f"{g}: {len(c)} classes" for g, c in known.items())
                                + ")")


def _run_summary(run_dir: Path, config: dict, label: str, settings: ReportSettings, device,
                 progress: Optional[Callable[[str], object]], cache: bool) -> RunSummary:
    """One run's indicators at each chosen checkpoint, and its final densities."""
    from landscape.load import load

    def report(message: str) -> None:
        if progress is not None:
            progress(f"{label} {message}")

    indicators, run = [], None
    for epoch, path in select_checkpoints(run_dir, settings.every):
        # The dataset does not depend on the epoch: built once per run.
        run = load(path, device=device, data=None if run is None else run.data)
        for group in settings.groups:
            indicators.append(group_indicators(run, group, settings, cache))
            report(f"epoch {epoch} {group}")
    densities = {}
    for group in settings.groups if settings.densities else ():
        densities[group] = group_density(run, group, settings, cache)
        report(f"density {group}")
    sweep = None
    if settings.classes:
        from landscape.classes import class_sweep

        sweep = class_sweep(run, settings.classes, steps=settings.steps, tol=settings.tol,
                            min_steps=settings.min_steps, seed=settings.seed,
                            split=settings.split, dtype=settings.dtype, cache=cache)
        report("classes")
    derived = config.get("derived", {})
    switch = derived.get("switch_epoch") if config.get("opt") == "ssesam" else None
    return RunSummary(label, str(run_dir), str(config.get("opt")), run.epoch, switch,
                      _final_accuracy(run), tuple(indicators), densities, sweep)


def build_report(run_dirs: Sequence[PathLike], settings: ReportSettings = DEFAULT_SETTINGS,
                 device=None, progress: Optional[Callable[[str], object]] = None,
                 cache: bool = True) -> SaddleReport:
    """Computes (or reads from the caches) everything the report shows.

    Args:
        run_dirs: run folders to compare (same dataset and groups).
        settings: see :class:`ReportSettings`.
        device: where to compute (default: CUDA if available).
        progress: called with a short description after each checkpoint and group.
        cache: read and write the per-checkpoint caches.

    Example:
        >>> report = build_report([run_dir], ReportSettings(steps=30, probes=2, every=3),
        ...                       device="cpu")
        >>> [(r.label, r.final_epoch, r.switch_epoch) for r in report.runs]
        [('SSE-SAM', 3, 3)]
        >>> [i.epoch for i in report.runs[0].indicators if i.group == "tail"]
        [0, 3]
    """
    found = check_runs(run_dirs)
    _check_groups(found[0][1], settings)
    summaries = [_run_summary(run_dir, config, label, settings, device, progress, cache)
                 for (run_dir, config), label in zip(found, _labels(found))]
    first = found[0][1]
    return SaddleReport(tuple(summaries), settings, str(first.get("dataset")),
                        dict(first.get("derived", {}).get("groups", {})))
