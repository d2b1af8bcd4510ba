r"""The per-class saddle sweep: each class's Hessian extremes, trace and density at a checkpoint.

For every chosen class :math:`c` with (training) samples :math:`(x_i, y_i = c)`, the Hessian of
the class's mean loss :math:`L_c(w) = \frac{1}{N_c} \sum_i \ell(f(x_i; w), c)` (the operator of
:class:`landscape.hvp.GroupHessian`, float64, eval mode, no augmentation) gives

* :math:`\lambda_{\max}`, :math:`\lambda_{\min}` (one Lanczos run,
  :func:`landscape.eigen.extreme_eigenpairs`) and the saddle ratio
  :func:`landscape.eigen.saddle_ratio`;
* :math:`\operatorname{tr} H_c` with its standard error (Hutch++, :mod:`landscape.traces`);
* with ``density=True``, the SLQ spectral density (:func:`landscape.slq.slq`),

drawn against the class's training count: Saddle-SAM's (Rangwani et al. 2022) per-class view of
where the tail classes sit. Each result is cached next to the checkpoint, in
``RUN_DIR/hessian/epoch_NNNN_class_C.json`` (:func:`landscape.report.cache.cached_entry`): a
sweep rerun with the same settings computes nothing. Under ``torchrun`` the classes are shared
out between the ranks (:func:`landscape._distributed.map_shared`).

>>> import landscape
>>> run = landscape.load(run_dir, device="cpu")
>>> sweep = class_sweep(run, classes=[0, 9], steps=40, trace_hvps=9)
>>> [(r.class_id, r.group, r.train_count) for r in sweep.classes]
[(0, 'head', 120), (9, 'tail', 6)]
>>> r = sweep.classes[1]
>>> r.converged, r.ratio == r.lambda_min / r.lambda_max, sorted(sweep.to_json())[:3]
(True, True, ['checkpoint', 'classes', 'epoch'])
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np

from landscape import _distributed
from landscape.eigen import extreme_eigenpairs, saddle_ratio
from landscape.errors import AnalysisError
from landscape.hvp import GroupHessian
from landscape.layout import ParamLayout, parse_patterns
from landscape.load import Run
from landscape.options import DTYPES, MIN_STEPS, SPLITS
from landscape.slq import SpectralDensity, gaussian_density, slq
from landscape.traces import hutchpp_trace

__all__ = ["ClassResult", "ClassSweep", "SweepSettings", "class_sweep", "parse_classes"]


@dataclass(frozen=True)
class SweepSettings:
    """What :func:`class_sweep` computed (the names of the ``classes`` command's options).

    Attributes:
        steps: Lanczos steps at most for the extremes, and per SLQ probe.
        tol: relative residual tolerance of the extreme eigenpairs.
        min_steps: Lanczos steps at least for the extremes (:data:`landscape.options.MIN_STEPS`:
            why a floor).
        seed: seed of Lanczos's start vector, the trace's probes, the SLQ probes and the
            subsample.
        samples: at most this many samples per class (``None``: all of them).
        split: ``train`` or ``test`` samples.
        trace_hvps: Hessian-vector products of each Hutch++ trace.
        density: whether the SLQ densities were estimated.
        probes: SLQ probes.
        params: the parameter globs of a Hessian block (``None``: every parameter;
            :class:`landscape.hvp.GroupHessian`), parsed to a tuple.
        dtype: of the Hessian-vector products, ``auto``, ``float64`` or ``float32``
            (:func:`landscape.hessian.analysis_dtype`; the Lanczos recurrence is float64).
    """

    steps: int = 100
    tol: float = 1e-4
    min_steps: int = MIN_STEPS
    seed: int = 0
    samples: Optional[int] = None
    split: str = "train"
    trace_hvps: int = 99
    density: bool = False
    probes: int = 10
    params: Optional[tuple[str, ...]] = None
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.params is not None:
            object.__setattr__(self, "params", parse_patterns(self.params))
        for name, low in (("steps", 1), ("trace_hvps", 3), ("probes", 1), ("seed", 0),
                          ("min_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise AnalysisError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.samples is not None and (isinstance(self.samples, bool)
                                         or not isinstance(self.samples, int) or self.samples < 1):
            raise AnalysisError(f"samples must be an integer >= 1, got {self.samples!r}")
        if not (isinstance(self.tol, (int, float)) and 0 < self.tol < 1):
            raise AnalysisError(f"tol must be in (0, 1), got {self.tol!r}")
        if self.split not in SPLITS:
            raise AnalysisError(f"split must be train or test, got {self.split!r}")
        if self.dtype not in DTYPES:
            raise AnalysisError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True)
class ClassResult:
    """One class's Hessian at the checkpoint.

    Attributes:
        class_id: the class.
        group: ``head`` or ``tail`` (by the run's ``eta``).
        train_count: the class's training images (the x axis of the figures).
        n_samples: samples the Hessian averages over (``train_count`` unless subsampled, or
            the test split).
        lambda_max, lambda_min: the extreme eigenvalues.
        converged: whether both residuals met the tolerance.
        residuals: ``(top, bottom)`` Ritz residuals.
        lanczos_steps: Lanczos steps taken.
        trace, trace_stderr: the Hutch++ trace and its standard error.
        density: the SLQ density (``None`` unless asked for).
    """

    class_id: int
    group: str
    train_count: int
    n_samples: int
    lambda_max: float
    lambda_min: float
    converged: bool
    residuals: tuple[float, float]
    lanczos_steps: int
    trace: float
    trace_stderr: float
    density: Optional[SpectralDensity] = None

    @property
    def ratio(self) -> float:
        """:func:`landscape.eigen.saddle_ratio` (NaN when ``lambda_max <= 0``)."""
        return saddle_ratio(self.lambda_min, self.lambda_max)

    def to_json(self) -> dict:
        """Plain JSON types; NaN as ``null``; the density as its SLQ nodes and weights."""
        data = {k: v for k, v in asdict(self).items() if k != "density"}
        data.update(residuals=list(self.residuals), ratio=_finite(self.ratio),
                    trace_stderr=_finite(self.trace_stderr))
        if self.density is not None:
            data["density"] = _density_json(self.density)
        return data


@dataclass(frozen=True)
class ClassSweep:
    """Every chosen class's :class:`ClassResult` at one checkpoint."""

    checkpoint: str
    epoch: int
    run_dir: str
    optimizer: str
    eta: float
    settings: SweepSettings
    classes: tuple[ClassResult, ...]

    def to_markdown(self) -> str:
        """One row per class: group, training images, samples used, the extremes (3 significant
        digits), the ratio and the trace with its standard error; ``–`` where undefined."""
        lines = ["| class | group | images | samples | λmax | λmin | λmin/λmax | trace |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.classes:
            ratio = "–" if math.isnan(r.ratio) else f"{r.ratio:.3f}"
            error = "" if math.isnan(r.trace_stderr) else f" ± {r.trace_stderr:.2g}"
            lines.append(f"| {r.class_id} | {r.group} | {r.train_count} | {r.n_samples} | "
                         f"{r.lambda_max:.3g} | {r.lambda_min:.3g} | {ratio} | "
                         f"{r.trace:.3g}{error} |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        """The ``classes`` command's JSON: checkpoint, epoch, run_dir, optimizer, eta, settings
        and one object per class (:meth:`ClassResult.to_json`)."""
        return {"checkpoint": self.checkpoint, "epoch": self.epoch, "run_dir": self.run_dir,
                "optimizer": self.optimizer, "eta": self.eta, "settings": asdict(self.settings),
                "classes": [r.to_json() for r in self.classes]}


def _finite(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None


def _density_json(d: SpectralDensity) -> dict:
    nodes = [[_finite(v) for v in row] for row in np.asarray(d.nodes, np.float64)]
    return {"nodes": nodes, "weights": np.asarray(d.weights).tolist(), "variance": d.variance,
            "grid": [float(d.grid[0]), float(d.grid[-1]), int(len(d.grid))],
            "lengths": np.asarray(d.lengths).tolist(), "hvps": int(d.hvps), "seed": int(d.seed)}


def _density_from_json(data: dict) -> SpectralDensity:
    nodes = np.array([[np.nan if v is None else v for v in row] for row in data["nodes"]],
                     dtype=np.float64)
    weights = np.asarray(data["weights"], np.float64)
    lo, hi, points = data["grid"]
    grid = np.linspace(lo, hi, int(points))
    return SpectralDensity(nodes, weights, grid,
                           gaussian_density(nodes, weights, grid, data["variance"]),
                           float(data["variance"]), nodes.shape[0], nodes.shape[1],
                           np.asarray(data["lengths"], np.int64), int(data["hvps"]),
                           int(data["seed"]))


def parse_classes(run: Run, classes: Union[str, Sequence[int]]) -> list[int]:
    """``"all"``, ``"0,3,7"`` or a list of ids -> sorted class ids (``GroupError`` if bad)."""
    return run.classes("all" if classes in ("all", None) else classes)


def _class_result(run: Run, class_id: int, settings: SweepSettings, cache: bool,
                  batch_size: Optional[int], progress) -> ClassResult:
    from landscape.report.cache import cached_entry

    from landscape.hessian import analysis_dtype

    s = settings
    x, y = run.group_data([class_id], s.split, samples=s.samples, seed=s.seed)
    dtype = analysis_dtype(s.dtype, ParamLayout.of(run.model).n)
    made: list[GroupHessian] = []

    def op() -> GroupHessian:  # built on first use: a fully cached class builds nothing
        if not made:
            made.append(GroupHessian(run.model, run.loss_fn(), x, y, batch_size=batch_size,
                                     dtype=dtype, progress=progress, params=s.params))
        return made[0]

    def extremes():
        e = extreme_eigenpairs(op(), top=1, bottom=1, tol=s.tol, max_steps=s.steps,
                               min_steps=s.min_steps, seed=s.seed)
        return {"lambda_max": float(e.top[0]), "lambda_min": float(e.bottom[0]),
                "converged": e.converged, "lanczos_steps": int(e.steps),
                "residuals": [float(e.top_residuals[0]), float(e.bottom_residuals[0])]}, {}

    def trace():
        t = hutchpp_trace(op(), s.trace_hvps, seed=s.seed)
        return {"trace": t.value, "trace_stderr": _finite(t.stderr)}, {}

    def density():
        return _density_json(slq(op(), probes=s.probes, steps=s.steps, seed=s.seed)), {}

    name = f"class_{class_id}"
    key = {"kind": "class-extremes", "class": class_id, "split": s.split, "samples": s.samples,
           "n_samples": len(y), "loss": run.config.loss, "seed": s.seed,
           "dtype": str(dtype).removeprefix("torch."),
           **({} if s.params is None else {"params": list(s.params)})}
    found = cached_entry(run, name, {**key, "steps": s.steps, "tol": s.tol,
                                     "min_steps": s.min_steps}, extremes, cache)
    found.update(cached_entry(run, name, {**key, "kind": "class-trace", "method": "hutch++",
                                          "hvps": s.trace_hvps}, trace, cache))
    slq_density = None
    if s.density:
        slq_density = _density_from_json(cached_entry(
            run, name, {**key, "kind": "class-slq", "probes": s.probes, "steps": s.steps},
            density, cache))
    stderr = found["trace_stderr"]
    group = "head" if class_id in run.groups.get("head", []) else "tail"
    return ClassResult(class_id, group, int(run.config.counts[class_id]), len(y),
                       found["lambda_max"], found["lambda_min"], bool(found["converged"]),
                       tuple(found["residuals"]), found["lanczos_steps"], found["trace"],
                       math.nan if stderr is None else stderr, slq_density)


_DEFAULT = SweepSettings()  # class_sweep's defaults are the settings' own


def class_sweep(run: Run, classes: Union[str, Sequence[int]] = "all", *,
                steps: int = _DEFAULT.steps, tol: float = _DEFAULT.tol,
                min_steps: int = _DEFAULT.min_steps, seed: int = _DEFAULT.seed,
                samples: Optional[int] = _DEFAULT.samples, split: str = _DEFAULT.split,
                trace_hvps: int = _DEFAULT.trace_hvps, density: bool = _DEFAULT.density,
                probes: int = _DEFAULT.probes, dtype: str = _DEFAULT.dtype, cache: bool = True,
                batch_size: Optional[int] = None,
                progress: Optional[Callable[[int], object]] = None,
                params=None) -> ClassSweep:
    """The per-class sweep of ``run``'s checkpoint (module docstring).

    Args:
        run: a loaded checkpoint (:func:`landscape.load`).
        classes: ``"all"``, ``"0,3,7"`` or a list of class ids.
        steps, tol, min_steps, seed, samples, split, trace_hvps, density, probes, params,
            dtype: see :class:`SweepSettings` (``params``: globs, ``"layer4.*,fc.*"`` or a
            list).
        cache: read and write ``RUN_DIR/hessian/epoch_NNNN_class_C.json``.
        batch_size: samples per forward pass (results do not depend on it).
        progress: called with the number of HVPs after each product.

    Raises:
        GroupError: an unknown class id or a class without samples.
        AnalysisError: bad settings.
    """
    settings = SweepSettings(steps=steps, tol=tol, min_steps=min_steps, seed=seed,
                             samples=samples, split=split, trace_hvps=trace_hvps,
                             density=density, probes=probes, params=params, dtype=dtype)
    if params is not None:
        ParamLayout.of(run.model).select(settings.params)  # matches nothing: fail at once
    ids = parse_classes(run, classes)
    for class_id in ids:  # every class resolves before any Hessian work
        run.group_size([class_id], split)
    results = _distributed.map_shared(
        lambda c: _class_result(run, c, settings, cache, batch_size, progress), ids)
    return ClassSweep(str(run.path), int(run.epoch), str(run.run_dir), str(run.config.opt),
                      float(run.config.eta), settings, tuple(results))
