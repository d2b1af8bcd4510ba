"""Per-group Hessian analysis of a checkpoint in one call: extremes, saddle ratio, trace, densities.

>>> import landscape, tempfile
>>> run = landscape.load(run_dir, device="cpu")
>>> s = hessian_summary(run, "tail", top=2, bottom=1, trace=True, seed=0)
>>> s.converged, len(s.top), s.provenance.group, s.provenance.classes
(True, 2, 'tail', (4, 5, 6, 7, 8, 9))
>>> s.ratio == s.bottom[0] / s.top[0], s.trace.method     # lambda_min / lambda_max
(True, 'hutch++')
>>> densities = spectral_densities(run, ["head", "tail"], probes=2, steps=10)
>>> sorted(densities), densities["tail"].nodes.shape
(['head', 'tail'], (2, 10))
>>> [p.name for p in save_spectra(densities, tempfile.mkdtemp())]   # npz, json, PNG, HTML
['spectrum.npz', 'spectrum.json', 'spectrum.png', 'spectrum.html']

The operator is :class:`landscape.hvp.GroupHessian` (the group's mean loss over its un-augmented
samples, eval mode); eigenvalues come from :func:`landscape.eigen.extreme_eigenpairs`, traces
from :mod:`landscape.traces`. Everything is a function of the checkpoint, the arguments and
``seed``.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from landscape.errors import AnalysisError
from landscape.hvp import DEFAULT_METHOD, GroupHessian
from landscape.layout import Patterns
from landscape.eigen import MIN_STEPS, EigenResult, extreme_eigenpairs
from landscape.load import Group, Run
from landscape.options import AUTO_FLOAT64_MAX_PARAMS, TRACE_METHODS
from landscape.slq import SpectralDensity, slq
from landscape.traces import TraceEstimate, hutchinson_trace, hutchpp_trace

__all__ = ["HessianSummary", "Provenance", "hessian_summary", "spectral_densities", "save_spectra",
           "group_label", "TRACE_METHODS", "TORCH_DTYPES", "AUTO_FLOAT64_MAX_PARAMS",
           "analysis_dtype"]

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def analysis_dtype(dtype: Union[str, torch.dtype], n_params: int) -> torch.dtype:
    """The products' dtype: ``dtype`` itself, or for ``"auto"`` float64 up to
    :data:`AUTO_FLOAT64_MAX_PARAMS` parameters and float32 above.

    Example:
        >>> analysis_dtype("auto", 9_000), analysis_dtype("auto", 470_000)
        (torch.float64, torch.float32)
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float64 if int(n_params) <= AUTO_FLOAT64_MAX_PARAMS else torch.float32
    if dtype not in TORCH_DTYPES:
        raise AnalysisError(f"dtype must be auto, float32 or float64, got {dtype!r}")
    return TORCH_DTYPES[dtype]


def _resolved(dtype, run, params) -> torch.dtype:
    from landscape.layout import ParamLayout

    layout = ParamLayout.of(run.model)
    return analysis_dtype(dtype, (layout if params is None else layout.select(params)).n)


def group_label(group: Group) -> str:
    """``head`` / ``tail`` / ``all`` as given; a list of class ids as ``"0,3,7"``."""
    return group if isinstance(group, str) else ",".join(str(int(c)) for c in group)


@dataclass(frozen=True)
class Provenance:
    """How a summary's numbers were obtained, and what they cost.

    Attributes:
        group: the group as given (``"tail"``, ``"0,3,7"``).
        classes: its class ids.
        n_samples: samples averaged over.
        loss: the per-sample loss (``CE``, ``LDAM``, ...).
        split: ``train`` or ``test`` samples.
        checkpoint, epoch: the checkpoint file and its epoch.
        n_params: the operator's size.
        dtype: of the Hessian-vector products.
        seed: of Lanczos's start vector and of the trace's probes.
        tol: Lanczos's relative residual tolerance.
        min_steps: Lanczos's floor on the steps (:func:`landscape.eigen.extreme_eigenpairs`).
        hvps: Hessian-vector products spent in all.
        seconds: wall time.
        params: the ``params`` patterns of a Hessian block (``None``: every parameter).
    """

    group: str
    classes: tuple[int, ...]
    n_samples: int
    loss: str
    split: str
    checkpoint: str
    epoch: int
    n_params: int
    dtype: str
    seed: int
    tol: float
    min_steps: int
    hvps: int
    seconds: float
    params: Optional[tuple[str, ...]] = None


@dataclass(frozen=True)
class HessianSummary:
    """One group's loss Hessian at a checkpoint: extreme eigenpairs, trace and provenance.

    Attributes:
        eigen: the extreme eigenpairs (None when neither end was asked for).
        trace: the trace estimate (None unless asked for).
        provenance: how the numbers were obtained (:class:`Provenance`).
        loss_value: the group's mean loss ``L_G(w)``.
    """

    eigen: Optional[EigenResult]
    trace: Optional[TraceEstimate]
    provenance: Provenance
    loss_value: float

    @property
    def top(self) -> tuple[float, ...]:
        """The largest eigenvalues, descending (``top[0] = lambda_max``)."""
        return () if self.eigen is None else tuple(float(v) for v in self.eigen.top)

    @property
    def bottom(self) -> tuple[float, ...]:
        """The smallest eigenvalues, ascending (``bottom[0] = lambda_min``)."""
        return () if self.eigen is None else tuple(float(v) for v in self.eigen.bottom)

    @property
    def ratio(self) -> float:
        """:func:`landscape.eigen.saddle_ratio` of ``bottom[0]`` and ``top[0]``."""
        return math.nan if self.eigen is None else self.eigen.ratio

    @property
    def converged(self) -> bool:
        return True if self.eigen is None else self.eigen.converged

    @property
    def residuals(self) -> dict[str, list[float]]:
        return {"top": [], "bottom": []} if self.eigen is None else self.eigen.residuals

    def to_json(self) -> dict:
        """The JSON object of ``python -m landscape hessian``, flat, in plain JSON types:

        * provenance: ``group``, ``classes``, ``n_samples``, ``loss``, ``split``,
          ``checkpoint``, ``epoch``, ``n_params``, ``dtype``, ``seed``, ``tol``,
          ``min_steps``, ``hvps``,
          ``seconds``, ``params`` (the patterns of a Hessian block; ``null``: all);
        * eigenpairs: ``top``, ``bottom``, ``residuals`` (``{"top": [...], "bottom": [...]}``),
          ``converged``, ``reason`` (why not converged; ``null`` when converged),
          ``residual_tol`` (the absolute threshold), ``lanczos_steps``, and
          ``ratio`` (``null`` where :func:`~landscape.eigen.saddle_ratio` is undefined);
        * trace: ``trace``, ``trace_stderr``, ``trace_method``, ``trace_hvps`` (``null``, 0
          without one);
        * ``loss_value``.
        """
        eig, trace = self.eigen, self.trace
        return {
            **asdict(self.provenance), "classes": list(self.provenance.classes),
            "params": None if self.provenance.params is None else list(self.provenance.params),
            "top": list(self.top), "bottom": list(self.bottom), "residuals": self.residuals,
            "converged": self.converged, "ratio": None if math.isnan(self.ratio) else self.ratio,
            "residual_tol": 0.0 if eig is None else float(eig.tolerance),
            "reason": None if eig is None or not eig.reason else eig.reason,
            "lanczos_steps": 0 if eig is None else int(eig.steps),
            "trace": None if trace is None else float(trace.value),
            "trace_stderr": None if trace is None else float(trace.stderr),
            "trace_method": None if trace is None else trace.method,
            "trace_hvps": 0 if trace is None else int(trace.hvps),
            "loss_value": self.loss_value,
        }


def _check_k(name: str, k: int, n_params: int) -> int:
    k = int(k)
    if k < 0:
        raise AnalysisError(f"{name} must be >= 0, got {k}")
    if k > n_params:
        raise AnalysisError(f"{name} = {k} is larger than the parameter count {n_params}")
    return k


def hessian_summary(run: Run, group: Group, top: int = 1, bottom: int = 1, trace: bool = False,
                    *, seed: int = 0, split: str = "train", loss: Optional[str] = None,
                    batch_size: Optional[int] = None, dtype: Union[str, torch.dtype] = "auto",
                    tol: float = 1e-6, max_steps: int = 300, min_steps: int = MIN_STEPS,
                    trace_method: str = "hutch++",
                    trace_hvps: int = 99, method: str = DEFAULT_METHOD,
                    progress: Optional[Callable[[int], object]] = None,
                    params: Optional[Patterns] = None,
                    planned: Optional[Callable[[int], object]] = None,
                    journal: Optional[Union[str, Path]] = None) -> HessianSummary:
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
        dtype: ``"auto"`` (default: :func:`analysis_dtype`), float64 or float32 products.
        tol: Lanczos residual tolerance, relative to ``||H||_2``.
        max_steps: at most this many Lanczos steps.
        min_steps: no stop before this many steps (capped at ``max_steps``; why a floor:
            :func:`landscape.eigen.extreme_eigenpairs`).
        trace_method: ``hutch++`` or ``hutchinson``.
        trace_hvps: HVPs spent on the trace.
        method: the HVP method (:data:`landscape.hvp.HVP_METHODS`).
        progress: called with the number of HVPs done after each product (e.g. ``tqdm.update``).
        planned: called once Lanczos has stopped (often well before ``max_steps``) with the
            HVPs the whole call spends, e.g. to correct a progress bar's total.
        params: ``fnmatch`` patterns (``"layer4.*,fc.*"`` or a list): the Hessian block of those
            parameters, the others fixed (:class:`landscape.hvp.GroupHessian`).
        journal: a folder that keeps every product as it comes
            (:class:`landscape.journal.JournaledOperator`), so that the same call, run again
            after an interruption, resumes where it stopped, to the same digits. It is left in
            place: remove it (:func:`landscape.journal.remove`) once the result is safe.
            Not under torchrun, where every rank would write it.

    Raises:
        AnalysisError: ``k`` larger than the parameter count, bad numbers, ``params`` matching
            no parameter.
        GroupError: unknown group, class id or empty group.
    """
    began = time.perf_counter()
    if trace_method not in TRACE_METHODS:
        raise AnalysisError(f"trace method must be one of {', '.join(TRACE_METHODS)}, "
                            f"got {trace_method!r}")
    if not tol > 0 or int(max_steps) < 1 or int(min_steps) < 0 or int(trace_hvps) < 3:
        raise AnalysisError("tol must be > 0, max_steps >= 1, min_steps >= 0 and trace HVPs "
                            ">= 3")
    dtype = _resolved(dtype, run, params)
    op = GroupHessian.from_run(run, group, split=split, loss=loss, batch_size=batch_size,
                               dtype=dtype, method=method, progress=progress, params=params)
    top = _check_k("top", top, op.n_params)
    bottom = _check_k("bottom", bottom, op.n_params)
    hessian = op if journal is None else _journaled(op, run, split, journal)
    eigen = None
    if top or bottom:
        eigen = extreme_eigenpairs(hessian, top=top, bottom=bottom, tol=tol,
                                   max_steps=max_steps, min_steps=int(min_steps), seed=seed)
    if planned is not None:
        planned(op.hvps + (int(trace_hvps) if trace else 0))
    estimate = None
    if trace:
        estimator = hutchpp_trace if trace_method == "hutch++" else hutchinson_trace
        estimate = estimator(hessian, int(trace_hvps), seed=seed)
    loss_value = op.loss()
    provenance = Provenance(
        group=group_label(group), classes=tuple(op.classes or ()), n_samples=op.n_samples,
        loss=op.loss_name or "", split=split, checkpoint=str(run.path), epoch=int(run.epoch),
        n_params=op.n_params, dtype=str(dtype).replace("torch.", ""), seed=int(seed),
        tol=float(tol), min_steps=int(min_steps), hvps=hessian.hvps,
        seconds=time.perf_counter() - began, params=op.param_patterns)
    return HessianSummary(eigen, estimate, provenance, loss_value)


def _journaled(op: GroupHessian, run: Run, split: str, folder: Union[str, Path]):
    """``op`` with its products kept in ``folder``, under a key naming everything that
    determines them (the digests of the requests cover the seed and the stopping)."""
    from landscape import _distributed
    from landscape.journal import JournaledOperator
    from train.checkpoint import contents_sha256

    if _distributed.world() > 1:
        raise AnalysisError("a journal is not kept under torchrun (every rank would write it); "
                            "drop --journal or run in one process")
    key = {"checkpoint": contents_sha256(run.path), "classes": list(op.classes or ()),
           "split": split, "loss": op.loss_name, "n_samples": op.n_samples,
           "dtype": str(op.dtype), "method": op.method, "batch_size": op.batch_size,
           "params": op.param_patterns, "device": op.device.type, "torch": torch.__version__}
    return JournaledOperator(op, folder, key=key)


def spectral_densities(run: Run, groups: Sequence[Group], probes: int = 10, steps: int = 90, *,
                       seed: int = 0, split: str = "train", loss: Optional[str] = None,
                       batch_size: Optional[int] = None, dtype: Union[str, torch.dtype] = "auto",
                       probe_batch: Optional[int] = None, method: str = DEFAULT_METHOD,
                       progress: Optional[Callable[[int], object]] = None,
                       params: Optional[Patterns] = None) -> dict[str, SpectralDensity]:
    """SLQ spectral densities (:func:`landscape.slq.slq`) of several groups' Hessians, keyed
    by :func:`group_label`. Every group uses the same ``seed`` (the same probes); ``params``:
    the Hessian block of those parameters (as :func:`hessian_summary`).

    Every group is resolved before any Hessian work, so a bad group fails at once.
    """
    if int(probes) < 1 or int(steps) < 1:
        raise AnalysisError(f"probes and steps must be >= 1, got {probes} and {steps}")
    if not groups:
        raise AnalysisError("no groups given")
    for group in groups:
        run.group_size(group, split)  # raises GroupError for unknown / empty groups
    out = {}
    dtype = _resolved(dtype, run, params)
    for group in groups:
        op = GroupHessian.from_run(run, group, split=split, loss=loss, batch_size=batch_size,
                                   dtype=dtype, method=method, progress=progress,
                                   params=params)
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
