"""Per-group loss-landscape analysis of training checkpoints: Hessian extremes, traces,
spectral densities, loss surfaces and the saddle report.

``python -m landscape --help`` for the command line. From Python (``run_dir`` is a run folder
of ``python -m train``):

>>> import landscape
>>> run = landscape.load(run_dir, device="cpu")                  # newest checkpoint
>>> s = landscape.hessian_summary(run, "tail", top=1, bottom=1)
>>> s.converged, s.ratio == s.bottom[0] / s.top[0]            # lambda_min / lambda_max
(True, True)
>>> d = landscape.spectral_densities(run, ["head", "tail"], probes=2, steps=10)
>>> sorted(d)
['head', 'tail']
>>> axis = landscape.grid_axis(3)
>>> surface = landscape.compute_surface(run, landscape.random_directions(run.model, 1), axis)
>>> surface.loss["tail"].shape
(3,)
>>> sweep = landscape.class_sweep(run, classes=[0, 9], steps=30, trace_hvps=9)   # per class
>>> [(r.class_id, r.group, r.train_count) for r in sweep.classes]
[(0, 'head', 120), (9, 'tail', 6)]
>>> settings = landscape.ReportSettings(steps=30, probes=2, every=3)
>>> [r.label for r in landscape.build_report([run_dir], settings, device="cpu").runs]
['SSE-SAM']

Lower levels: :mod:`landscape.hvp` (the operator), :mod:`landscape.lanczos`,
:mod:`landscape.eigen`, :mod:`landscape.slq`, :mod:`landscape.classes`, :mod:`landscape.traces`,
:mod:`landscape.layout` (the flat parameter layout), :mod:`landscape.directions`,
:mod:`landscape.surface`, :mod:`landscape.report`, :mod:`landscape.plots`.
"""

from landscape.classes import ClassResult, ClassSweep, class_sweep
from landscape.directions import (eigen_directions, interpolation_direction, random_directions,
                                  trajectory_pca)
from landscape.eigen import saddle_ratio
from landscape.hessian import HessianSummary, hessian_summary, save_spectra, spectral_densities
from landscape.load import Run, load
from landscape.report import ReportSettings, build_report, write_report
from landscape.surface import Surface, compute_surface, grid_axis

__all__ = ["Run", "load", "HessianSummary", "hessian_summary", "spectral_densities",
           "save_spectra", "saddle_ratio", "random_directions", "eigen_directions",
           "interpolation_direction", "trajectory_pca", "Surface", "compute_surface",
           "grid_axis", "ReportSettings", "build_report", "write_report", "class_sweep",
           "ClassSweep", "ClassResult"]
