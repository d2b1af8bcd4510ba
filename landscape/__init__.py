"""Per-group loss-landscape analysis of training checkpoints: Hessian extremes, traces,
spectral densities, loss surfaces and the saddle report.

``python -m landscape --help`` for the command line.
"""

from landscape.load import Run, load

__all__ = ["Run", "load"]
