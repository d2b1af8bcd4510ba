"""The per-checkpoint caches of the report's Hessian results, next to each checkpoint.

``RUN_DIR/hessian/epoch_NNNN_GROUP.json`` holds one entry per set of settings (kind, group
classes, split, loss, Lanczos limits, seed, and the checkpoint's SHA-256 from the run's
manifest); the densities go to ``RUN_DIR/hessian/epoch_NNNN_GROUP_slq_KEY.npz``. A result
computed before with the same settings is read back, never recomputed; a damaged or foreign
file is recomputed (and rewritten), never trusted.

One writer per run folder: each cache write takes the run folder's lock
(:class:`train.run_folder.RunLock`) for the moment of the write, which also keeps two reports
from losing each other's entries. When another process holds it (a trainer writing the run, or
another analysis writing its caches) the result is returned and not written: nothing of an
analysis lands in a folder while a trainer writes it, and the next report computes it again.

>>> import landscape
>>> run = landscape.load(run_dir, device="cpu")
>>> found = group_indicators(run, "tail", ReportSettings(steps=40, tol=1e-6))
>>> found.converged, (run.run_dir / "hessian" / "epoch_0003_tail.json").exists()
(True, True)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from landscape.report.results import GroupIndicators
from landscape.report.settings import DEFAULT_SETTINGS, ReportSettings
from train import checkpoint as ckpt
from train.io import atomic_write_bytes, atomic_write_json
from train.run_folder import RunBusy, RunLock

__all__ = ["group_indicators", "group_density", "cached_entry", "CACHE_FORMAT"]

CACHE_FORMAT = "landscape-hessian-cache/1"


def _dtype_name(run, settings: ReportSettings) -> str:
    """The products' dtype the settings give this run's model (``auto``: by its size)."""
    from landscape.hessian import analysis_dtype
    from train.models import count_parameters

    return str(analysis_dtype(settings.dtype, count_parameters(run.model))).replace("torch.", "")


def _cache_key(run, group: str, kind: str, settings: ReportSettings) -> dict:
    """Everything that determines a cached result."""
    key = {"kind": kind, "group": group, "classes": run.classes(group), "split": settings.split,
           "loss": run.config.loss, "seed": settings.seed, "steps": settings.steps,
           "dtype": _dtype_name(run, settings), "checkpoint_sha256": ckpt.recorded_sha256(run.path)}
    if kind == "extremes":  # the floor changes early stops: results from before it are stale
        key.update(tol=settings.tol, min_steps=settings.min_steps)
    else:
        key["probes"] = settings.probes
    return key


def _key_id(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _cache_folder(run) -> Path:
    return run.run_dir / "hessian"


@contextlib.contextmanager
def _writing(run):
    """Holds the run folder's lock while the block writes; yields False (write nothing) when
    another process holds it."""
    try:
        lock = RunLock(run.run_dir, "landscape report cache").acquire()
    except RunBusy:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _read_entries(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return {}  # another tool's file or a damaged one: recompute (and rewrite) it
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def group_indicators(run, group: str, settings: ReportSettings = DEFAULT_SETTINGS,
                     cache: bool = True) -> GroupIndicators:
    """``lambda_max``, ``lambda_min`` and their ratio for ``group`` at ``run``'s checkpoint,
    read from ``RUN_DIR/hessian/epoch_NNNN_GROUP.json`` when computed before with the same
    settings, else computed (:func:`landscape.hessian.hessian_summary` in ``settings.dtype``)
    and added to that file with the whole summary."""
    from landscape.hessian import hessian_summary

    def compute() -> tuple[dict, dict]:
        summary = hessian_summary(run, group, top=1, bottom=1, seed=settings.seed,
                                  split=settings.split, tol=settings.tol,
                                  max_steps=settings.steps, min_steps=settings.min_steps,
                                  dtype=settings.dtype)
        eigen = summary.eigen
        indicators = GroupIndicators(
            epoch=run.epoch, group=group, lambda_max=summary.top[0],
            lambda_min=summary.bottom[0], converged=summary.converged,
            residuals=(float(eigen.top_residuals[0]), float(eigen.bottom_residuals[0])),
            lanczos_steps=int(eigen.steps), seconds=summary.provenance.seconds)
        return indicators.to_json(), {"summary": summary.to_json()}

    key = _cache_key(run, group, "extremes", settings)
    return GroupIndicators.from_json(cached_entry(run, group, key, compute, cache))


def cached_entry(run, name: str, key: Mapping[str, Any],
                 compute: Callable[[], tuple[dict, dict]], cache: bool = True) -> dict:
    """The JSON result stored under ``key`` in ``RUN_DIR/hessian/epoch_NNNN_NAME.json`` (the
    file of this module's format), or else ``compute()``'s ``(result, extra)``: ``result`` is
    added to that file under ``key``, with ``extra``'s items beside it, and returned. ``key``
    must hold everything that determines the result; ``checkpoint_sha256`` is added to it."""
    key = {**key, "checkpoint_sha256": ckpt.recorded_sha256(run.path)}
    key_id = _key_id(key)
    path = _cache_folder(run) / f"epoch_{run.epoch:04d}_{name}.json"
    entries = _read_entries(path) if cache else {}
    if key_id in entries and entries[key_id].get("key") == key:
        return entries[key_id]["result"]
    result, extra = compute()
    if not cache:
        return result
    with _writing(run) as allowed:
        if allowed:
            path.parent.mkdir(exist_ok=True)
            entries = _read_entries(path)  # re-read: another process may have added entries
            entries[key_id] = {"key": key, "result": result, **extra}
            atomic_write_json(path, {"format": CACHE_FORMAT, "entries": entries})
    return result


def group_density(run, group: str, settings: ReportSettings = DEFAULT_SETTINGS,
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
                                 seed=settings.seed, split=settings.split,
                                 dtype=settings.dtype)[group]
    if not cache:
        return density.grid, density.density
    buffer = io.BytesIO()
    np.savez(buffer, grid=density.grid, density=density.density, nodes=density.nodes,
             weights=density.weights, key=np.array(json.dumps(key, sort_keys=True)))
    with _writing(run) as allowed:
        if allowed:
            path.parent.mkdir(exist_ok=True)
            atomic_write_bytes(path, buffer.getvalue())
    return density.grid, density.density
