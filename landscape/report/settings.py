"""What the saddle report computes (:class:`ReportSettings`)."""

from __future__ import annotations

from dataclasses import dataclass

from landscape.errors import AnalysisError
from landscape.options import DTYPES, MIN_STEPS, SPLITS

__all__ = ["ReportSettings", "DEFAULT_SETTINGS", "SPLITS"]



@dataclass(frozen=True)
class ReportSettings:
    """What the report computes.

    Attributes:
        every: use checkpoints whose epoch is a multiple of ``every`` (and always the last).
        steps: Lanczos steps at most for the extremes, and per SLQ probe.
        probes: SLQ probes for the densities.
        seed: seed of Lanczos's start vector and of the SLQ probes.
        tol: relative residual tolerance of the extreme eigenpairs.
        min_steps: Lanczos steps at least for the extremes (:data:`landscape.options.MIN_STEPS`:
            why a floor).
        split: the groups' samples, ``train`` or ``test``.
        groups: the groups compared.
        densities: whether to estimate the final checkpoints' spectral densities.
        dtype: of the Hessian-vector products: ``auto`` (:func:`landscape.hessian.analysis_dtype`:
            float64 for small models, float32 for large), ``float64`` or ``float32``.
        classes: the per-class sweep (:func:`landscape.classes.class_sweep`) of the final
            checkpoints: ``"all"`` or class ids ``"0,3,7"``; empty for none.

    Example:
        >>> ReportSettings(steps=40).tol
        0.0001
        >>> ReportSettings(every=0)
        Traceback (most recent call last):
        ...
        landscape.errors.AnalysisError: every must be an integer >= 1, got 0
    """

    every: int = 1
    steps: int = 100
    probes: int = 10
    seed: int = 0
    tol: float = 1e-4
    min_steps: int = MIN_STEPS
    split: str = "train"
    groups: tuple[str, ...] = ("head", "tail")
    densities: bool = True
    dtype: str = "auto"
    classes: str = ""

    def __post_init__(self) -> None:
        for name in ("every", "steps", "probes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AnalysisError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("seed", "min_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise AnalysisError(f"{name} must be an integer >= 0, got {value!r}")
        if not (isinstance(self.tol, (int, float)) and 0 < self.tol < 1):
            raise AnalysisError(f"tol must be in (0, 1), got {self.tol!r}")
        if self.split not in SPLITS:
            raise AnalysisError(f"split must be train or test, got {self.split!r}")
        if not self.groups:
            raise AnalysisError("no groups to compare")
        if self.dtype not in DTYPES:
            raise AnalysisError(f"dtype must be auto, float64 or float32, got {self.dtype!r}")
        ids = str(self.classes).replace(",", " ").split()
        if self.classes not in ("", "all") and not all(i.isdigit() for i in ids):
            raise AnalysisError(f"classes must be all or class ids like 0,3,7, got "
                                f"{self.classes!r}")


DEFAULT_SETTINGS = ReportSettings()
