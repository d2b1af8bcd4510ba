"""Per-group Hessian analysis of a checkpoint in one call: extremes, saddle ratio, trace, densities.

>>> run = landscape.load("checkpoints/digits-ssesam")
>>> s = hessian_summary(run, "tail", top=5, bottom=5, trace=True, seed=0)
>>> s.top[0], s.bottom[0], s.ratio          # lambda_max, lambda_min, lambda_min / lambda_max
>>> densities = spectral_densities(run, ["head", "tail"], probes=10, steps=90)
>>> save_spectra(densities, "spectra/")     # npz, json, PNG and offline HTML

The operator is :class:`landscape.hvp.GroupHessian` (the group's mean loss over its un-augmented
samples, eval mode); eigenvalues come from :func:`landscape.eigen.extreme_eigenpairs`, traces
from :mod:`landscape.traces`. Everything is a function of the checkpoint, the arguments and
``seed``.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from landscape.errors import AnalysisError
from landscape.hvp import DEFAULT_METHOD, GroupHessian
from landscape.eigen import extreme_eigenpairs
from landscape.load import Group, Run
from landscape.slq import SpectralDensity, slq
from landscape.traces import hutchinson_trace, hutchpp_trace

__all__ = ["HessianSummary", "hessian_summary", "spectral_densities", "save_spectra",
           "group_label", "TRACE_METHODS", "DTYPES"]

TRACE_METHODS = ("hutch++", "hutchinson")
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def group_label(group: Group) -> str:
    """``head`` / ``tail`` / ``all`` as given; a list of class ids as ``"0,3,7"``."""
    return group if isinstance(group, str) else ",".join(str(int(c)) for c in group)


@dataclass(frozen=True)
class HessianSummary:
    """Extreme eigenvalues, the saddle ratio and the trace of one group's loss Hessian.

    Attributes:
        group: the group as given (``"tail"``, ``"0,3,7"``).
        classes: its class ids.
        n_samples: samples averaged over.
        loss: the per-sample loss (``CE``, ``LDAM``, ...).
        top: the largest eigenvalues, descending (``top[0] = lambda_max``).
        bottom: the smallest, ascending (``bottom[0] = lambda_min``).
        residuals: ``{"top": [...], "bottom": [...]}``, ``||H x - theta x||`` of each pair.
        converged: every residual within ``residual_tol``.
        trace: estimate of ``tr(H)`` (None unless asked for).
        trace_stderr: its standard error.
        ratio: ``lambda_min / lambda_max`` (None unless both ends were computed).
        hvps: Hessian-vector products spent in all.
        seconds: wall time.
        split, n_params, dtype, seed, tol, residual_tol, lanczos_steps, trace_method,
        trace_hvps, loss_value, checkpoint, epoch: how the numbers were obtained.
    """

    group: str
    classes: tuple[int, ...]
    n_samples: int
    loss: str
    top: tuple[float, ...]
    bottom: tuple[float, ...]
    residuals: dict
    converged: bool
    trace: Optional[float]
    trace_stderr: Optional[float]
    ratio: Optional[float]
    hvps: int
    seconds: float
    split: str = "train"
    n_params: int = 0
    dtype: str = "float64"
    seed: int = 0
    tol: float = 0.0
    residual_tol: float = 0.0
    lanczos_steps: int = 0
    trace_method: Optional[str] = None
    trace_hvps: int = 0
    loss_value: float = float("nan")
    checkpoint: str = ""
    epoch: int = -1

    def to_json(self) -> dict:
        """A JSON-ready dict (lists, floats, ints, None)."""
        data = asdict(self)
        data["classes"] = list(self.classes)
        data["top"], data["bottom"] = list(self.top), list(self.bottom)
        return data


def _check_k(name: str, k: int, n_params: int) -> int:
    k = int(k)
    if k < 0:
        raise AnalysisError(f"{name} must be >= 0, got {k}")
    if k > n_params:
        raise AnalysisError(f"{name} = {k} is larger than the parameter count {n_params}")
    return k


def hessian_summary(run: Run, group: Group, top: int = 1, bottom: int = 1, trace: bool = False,
                    *, seed: int = 0, split: str = "train", loss: Optional[str] = None,
                    batch_size: Optional[int] = None, dtype: torch.dtype = torch.float64,
                    tol: float = 1e-6, max_steps: int = 300, trace_method: str = "hutch++",
                    trace_hvps: int = 99, method: str = DEFAULT_METHOD,
                    progress: Optional[Callable[[int], object]] = None) -> HessianSummary:
    """The ``top`` largest and ``bottom`` smallest Hessian eigenvalues of ``group``'s mean loss
    (one Lanczos run), the saddle ratio ``lambda_min / lambda_max`` and, with ``trace``, a
    Hutch++ (or Hutchinson) trace estimate with its standard error.

    Args:
        run: a loaded checkpoint (:func:`landscape.load`).
        group: ``head``, ``tail``, ``all``, ``"0,3,7"`` or a list of class ids.
        top, bottom: how many eigenvalues of each end (``k <= n_params``).
        trace: also estimate ``tr(H)``.
        seed: seeds Lanczos's start vector and the trace's probes.
        split: ``train`` (default) or ``test`` samples of the group.
        loss: the per-sample loss (default: the run's own).
        batch_size: samples per forward pass (results do not depend on it).
        dtype: float64 (default) or float32 products.
        tol: Lanczos residual tolerance, relative to ``||H||_2``.
        max_steps: at most this many Lanczos steps.
        trace_method: ``hutch++`` or ``hutchinson``.
        trace_hvps: HVPs spent on the trace.
        method: the HVP method (:data:`landscape.hvp.HVP_METHODS`).
        progress: called with the number of HVPs done after each product (e.g. ``tqdm.update``).

    Raises:
        AnalysisError: ``k`` larger than the parameter count, bad numbers.
        GroupError: unknown group, class id or empty group.
    """
    began = time.perf_counter()
    if trace_method not in TRACE_METHODS:
        raise AnalysisError(f"trace method must be one of {', '.join(TRACE_METHODS)}, "
                            f"got {trace_method!r}")
    if not tol > 0 or int(max_steps) < 1 or int(trace_hvps) < 3:
        raise AnalysisError("tol must be > 0, max_steps >= 1 and trace HVPs >= 3")
    op = GroupHessian.from_run(run, group, split=split, loss=loss, batch_size=batch_size,
                               dtype=dtype, method=method, progress=progress)
    top = _check_k("top", top, op.n_params)
    bottom = _check_k("bottom", bottom, op.n_params)
    tops, bottoms, residuals, converged, ratio = (), (), {"top": [], "bottom": []}, True, None
    residual_tol, steps = 0.0, 0
    if top or bottom:
        eig = extreme_eigenpairs(op, top=top, bottom=bottom, tol=tol, max_steps=max_steps,
                                 seed=seed)
        tops = tuple(float(v) for v in eig.top)
        bottoms = tuple(float(v) for v in eig.bottom)
        residuals, converged = eig.residuals, eig.converged
        residual_tol, steps = float(eig.tolerance), int(eig.steps)
        if top and bottom and tops[0] != 0:
            ratio = bottoms[0] / tops[0]
    trace_value = trace_stderr = None
    trace_spent = 0
    if trace:
        hvps_before = op.hvps
        if trace_method == "hutch++":
            estimate = hutchpp_trace(op, int(trace_hvps), seed=seed)
        else:
            estimate = hutchinson_trace(op, int(trace_hvps), seed=seed)
        trace_value, trace_stderr = float(estimate.value), float(estimate.stderr)
        trace_spent = op.hvps - hvps_before
    return HessianSummary(
        group=group_label(group), classes=tuple(op.classes or ()), n_samples=op.n_samples,
        loss=op.loss_name or "", top=tops, bottom=bottoms, residuals=residuals,
        converged=bool(converged), trace=trace_value, trace_stderr=trace_stderr, ratio=ratio,
        hvps=op.hvps, seconds=time.perf_counter() - began, split=split, n_params=op.n_params,
        dtype=str(dtype).replace("torch.", ""), seed=int(seed), tol=float(tol),
        residual_tol=residual_tol, lanczos_steps=steps,
        trace_method=trace_method if trace else None, trace_hvps=trace_spent,
        loss_value=op.loss(), checkpoint=str(run.path), epoch=int(run.epoch))


def spectral_densities(run: Run, groups: Sequence[Group], probes: int = 10, steps: int = 90, *,
                       seed: int = 0, split: str = "train", loss: Optional[str] = None,
                       batch_size: Optional[int] = None, dtype: torch.dtype = torch.float64,
                       probe_batch: Optional[int] = None, method: str = DEFAULT_METHOD,
                       progress: Optional[Callable[[int], object]] = None
                       ) -> dict[str, SpectralDensity]:
    """SLQ spectral densities (:func:`landscape.slq.slq`) of several groups' Hessians, keyed
    by :func:`group_label`. Every group uses the same ``seed`` (the same probes).

    Every group is resolved before any Hessian work, so a bad group fails at once.
    """
    if int(probes) < 1 or int(steps) < 1:
        raise AnalysisError(f"probes and steps must be >= 1, got {probes} and {steps}")
    if not groups:
        raise AnalysisError("no groups given")
    for group in groups:
        run.group_data(group, split)  # raises GroupError for unknown / empty groups
    out = {}
    for group in groups:
        op = GroupHessian.from_run(run, group, split=split, loss=loss, batch_size=batch_size,
                                   dtype=dtype, method=method, progress=progress)
        out[group_label(group)] = slq(op, probes=int(probes), steps=int(steps), seed=seed,
                                      probe_batch=probe_batch)
    return out


def save_spectra(densities: Mapping[str, SpectralDensity], out: Union[str, Path],
                 meta: Optional[dict] = None, title: str = "") -> list[Path]:
    """Writes ``spectrum.npz`` (per group: ``nodes``, ``weights``, ``grid``, ``density``),
    ``spectrum.json`` (settings and per-group summaries), ``spectrum.png`` and ``spectrum.html``
    into ``out`` (created if missing). Each file is written atomically, after all are rendered."""
    from landscape import plots
    from train.io import atomic_write_bytes, atomic_write_json

    out = Path(out)
    arrays = {}
    summary = {}
    for label, d in densities.items():
        for name in ("nodes", "weights", "grid", "density", "lengths"):
            arrays[f"{name}_{label}"] = np.asarray(getattr(d, name))
        summary[label] = {"probes": d.probes, "steps": d.steps, "hvps": d.hvps, "seed": d.seed,
                          "variance": d.variance, "lambda_min": d.lambda_min,
                          "lambda_max": d.lambda_max, "trace_over_n": d.moment(1)}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    png = plots.render_densities_png(densities, title=title)
    html = plots.render_densities_html(densities, title=title)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "spectrum.npz", out / "spectrum.json", out / "spectrum.png",
               out / "spectrum.html"]
    atomic_write_bytes(written[0], buffer.getvalue())
    atomic_write_json(written[1], {**(meta or {}), "groups": summary,
                                   "keys": "nodes_G, weights_G, grid_G, density_G, lengths_G"})
    atomic_write_bytes(written[2], png)
    atomic_write_bytes(written[3], html.encode("utf-8"))
    return written


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value).__name__)


def summary_json_text(summary: HessianSummary) -> str:
    return json.dumps(summary.to_json(), indent=2, sort_keys=True, default=_json_default)
