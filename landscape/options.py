"""The names of every choice the analysis offers: one place for the command lines, the Python
API's checks and the docs (as :mod:`train.options` is for training).

Plain constants that import nothing; note that ``import landscape.options`` still runs
``landscape/__init__.py``, which loads torch (the package exports its torch-backed API).

Example:
    >>> SPLITS, DTYPES
    (('train', 'test'), ('auto', 'float64', 'float32'))
"""

from __future__ import annotations

__all__ = ["SPLITS", "DTYPES", "AUTO_FLOAT64_MAX_PARAMS", "MIN_STEPS", "HVP_METHODS",
           "TRACE_METHODS", "SURFACE_METHODS", "NORMALIZATIONS", "ONE_D", "IGNORE", "SCALES"]

SPLITS = ("train", "test")  # whose samples define a group's loss
DTYPES = ("auto", "float64", "float32")  # of the Hessian-vector products (auto: by model size)
# dtype="auto" (the default) takes float64 products up to this many parameters and float32
# products above, the Lanczos recurrence and its basis staying float64 either way
# (landscape.lanczos). The threshold is measured by bench/bench_dtype.py (BENCHMARKS.md,
# "Analysis dtype and probe blocks").
AUTO_FLOAT64_MAX_PARAMS = 50_000
# Lanczos never stops before this many steps, so that a Ritz value inside the dense cluster of
# eigenvalues near 0 does not pass for lambda_min (landscape.eigen.extreme_eigenpairs: why).
MIN_STEPS = 20
HVP_METHODS = ("double-backward", "forward-over-reverse")
TRACE_METHODS = ("hutch++", "hutchinson")
SURFACE_METHODS = ("loop", "vmap")  # one forward per grid point, or vmapped blocks of points
NORMALIZATIONS = ("filter", "layer", "none")  # of random directions (Li et al. 2018)
ONE_D = ("zero", "weights")  # what random directions hold on 1-D parameters
IGNORE = ("biasbn",)  # parameters a trajectory PCA can leave out
SCALES = ("log", "linear")  # of a surface's contour bands
