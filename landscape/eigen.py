r"""The extreme eigenpairs of a symmetric operator from one Lanczos run, and the saddle ratio.

After ``m`` steps of :func:`landscape.lanczos.lanczos` with ``T_m = S \Theta S^T``, the Ritz
pair ``(\theta_j, x_j = Q_m s_j)`` has the residual
``\| H x_j - \theta_j x_j \| = \beta_m |e_m^T s_j|``, known without a further product. Steps
run until every wanted pair's residual is at most ``tol * max_j |theta_j|`` (relative to the
``||H||_2`` estimate, so that eigenvalues near 0 converge too). A residual ``r`` bounds the
eigenvalue's error by ``r``, and by ``r^2 / gap`` when it is separated from the rest of the
spectrum by ``gap``.

Hand-written rather than ``scipy.sparse.linalg.eigsh`` (ARPACK): ARPACK's implicit restarts
spend HVPs on restarts, its stopping rule is relative to each eigenvalue (hopeless for
eigenvalues near 0) and it reports no residuals; here every step is one HVP and each
eigenvalue's residual is reported. ``bench/bench_hessian.py`` compares both.

**The saddle ratio** (:func:`saddle_ratio`) is the one convention of the project for
``ratio``: ``lambda_min / lambda_max``, NaN when undefined.

>>> import torch
>>> H = torch.diag(torch.tensor([-1.0, 0.5, 2.0, 4.0], dtype=torch.float64))
>>> r = extreme_eigenpairs(H, top=1, bottom=1, seed=0)
>>> round(r.lambda_max, 9), round(r.lambda_min, 9), round(r.ratio, 9), r.converged
(4.0, -1.0, -0.25, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from landscape.lanczos import lanczos, operator_matmat, operator_size, tridiagonal_eigh

__all__ = ["EigenResult", "extreme_eigenpairs", "saddle_ratio"]


def saddle_ratio(lambda_min: Optional[float], lambda_max: Optional[float]) -> float:
    """The saddle indicator ``lambda_min / lambda_max``: negative when the loss has negative
    curvature (a saddle), its size relative to the sharpest direction (Rangwani et al. 2022).

    NaN when it is undefined: an end not computed (``None`` or NaN) or ``lambda_max <= 0`` (no
    positive curvature to measure against). JSON files write NaN as ``null``, tables as ``–``.

    >>> saddle_ratio(-0.5, 2.0)
    -0.25
    >>> saddle_ratio(-1.0, 0.0), saddle_ratio(None, 2.0)
    (nan, nan)
    """
    if lambda_min is None or lambda_max is None:
        return math.nan
    low, high = float(lambda_min), float(lambda_max)
    if not (math.isfinite(low) and math.isfinite(high)) or high <= 0:
        return math.nan
    return low / high


@dataclass(frozen=True)
class EigenResult:
    """Extreme eigenpairs of a symmetric operator, from one Lanczos run.

    Attributes:
        top: the ``k_top`` largest eigenvalues, descending (``top[0] = lambda_max``).
        bottom: the ``k_bottom`` smallest (most negative), ascending (``bottom[0] = lambda_min``).
        top_vectors: ``(k_top, n)`` float64 unit Ritz vectors (torch, on the basis device), row
            ``i`` belonging to ``top[i]``; the flat parameter layout of the operator.
        bottom_vectors: ``(k_bottom, n)``, likewise.
        top_residuals: ``||H x - theta x||`` of each top pair (``beta_m |e_m^T s|``).
        bottom_residuals: likewise.
        tolerance: the absolute residual threshold used, ``tol * max |theta|``.
        steps: Lanczos steps taken (= HVPs).
        hvps: products with the operator.
        ritz_values: all Ritz values of the last step, ascending.
    """

    top: np.ndarray
    bottom: np.ndarray
    top_vectors: torch.Tensor
    bottom_vectors: torch.Tensor
    top_residuals: np.ndarray
    bottom_residuals: np.ndarray
    tolerance: float
    steps: int
    hvps: int
    ritz_values: np.ndarray = field(repr=False)

    @property
    def top_converged(self) -> np.ndarray:
        return self.top_residuals <= self.tolerance

    @property
    def bottom_converged(self) -> np.ndarray:
        return self.bottom_residuals <= self.tolerance

    @property
    def converged(self) -> bool:
        """Whether every requested eigenvalue's residual is within ``tolerance``."""
        return bool(self.top_converged.all() and self.bottom_converged.all())

    @property
    def residuals(self) -> dict[str, list[float]]:
        return {"top": self.top_residuals.tolist(), "bottom": self.bottom_residuals.tolist()}

    @property
    def lambda_max(self) -> float:
        """``top[0]``, or the largest Ritz value when no top eigenvalue was asked for."""
        return float(self.top[0]) if self.top.size else float(self.ritz_values[-1])

    @property
    def lambda_min(self) -> float:
        """``bottom[0]``, or the smallest Ritz value when no bottom eigenvalue was asked for."""
        return float(self.bottom[0]) if self.bottom.size else float(self.ritz_values[0])

    @property
    def ratio(self) -> float:
        """:func:`saddle_ratio` of ``bottom[0]`` and ``top[0]`` (NaN unless both were asked for)."""
        return saddle_ratio(self.bottom[0] if self.bottom.size else None,
                            self.top[0] if self.top.size else None)


def _residual_rule(n: int, top: int, bottom: int, tol: float):
    """The stopping rule of :func:`extreme_eigenpairs` as ``lanczos``'s ``stop`` callback."""
    wanted = min(top + bottom, n)

    def done(alphas: np.ndarray, betas: np.ndarray, m: int) -> bool:
        if m < max(wanted, 1):
            return False
        if m == n:
            return True
        theta, s = tridiagonal_eigh(alphas, betas[:-1])
        residual = betas[-1] * np.abs(s[-1])
        threshold = tol * np.abs(theta).max()
        chosen = np.r_[np.arange(bottom), np.arange(m - top, m)]
        if not (residual[chosen] <= threshold).all():
            return False
        # After a restart (a zero coupling) the Ritz values of the earlier blocks are exact,
        # but the complement they leave is known only through the current block: its extreme
        # Ritz values must converge too, or a larger (smaller) eigenvalue may still be hidden
        # there (e.g. the second copy of a repeated eigenvalue).
        zeros = np.flatnonzero(betas[:-1] == 0)
        if zeros.size == 0:
            return True
        first = int(zeros[-1]) + 1
        _, block_s = tridiagonal_eigh(alphas[first:], betas[first:-1])
        block_residual = betas[-1] * np.abs(block_s[-1])
        return bool(block_residual[0] <= threshold and block_residual[-1] <= threshold)

    return done


def _ritz_pairs(result, n: int, top: int, bottom: int, tol: float) -> EigenResult:
    """The wanted Ritz pairs of a finished single run (``keep_basis``) and their residuals."""
    alphas, betas = result.tridiagonal(0)
    m = int(result.lengths[0])
    theta, s = tridiagonal_eigh(alphas, betas)
    beta_last = 0.0 if m == n else float(result.betas[0, m - 1])
    residual = beta_last * np.abs(s[-1])
    top_idx = np.arange(m - 1, m - 1 - min(top, m), -1)
    bottom_idx = np.arange(min(bottom, m))
    basis = result.basis[0]  # (m, n)
    s_t = torch.as_tensor(s, device=basis.device)

    def vectors(idx: np.ndarray) -> torch.Tensor:
        if idx.size == 0:
            return torch.zeros(0, n, dtype=torch.float64, device=basis.device)
        return (basis.T @ s_t[:, torch.as_tensor(idx.copy(), device=basis.device)]).T.contiguous()

    return EigenResult(top=theta[top_idx], bottom=theta[bottom_idx],
                       top_vectors=vectors(top_idx), bottom_vectors=vectors(bottom_idx),
                       top_residuals=residual[top_idx], bottom_residuals=residual[bottom_idx],
                       tolerance=tol * float(np.abs(theta).max()), steps=m, hvps=result.hvps,
                       ritz_values=theta)


def extreme_eigenpairs(op, top: int = 1, bottom: int = 1, *, tol: float = 1e-6,
                       max_steps: int = 300, seed: int = 0,
                       start: Optional[torch.Tensor] = None) -> EigenResult:
    """The ``top`` largest and ``bottom`` smallest eigenpairs of a symmetric operator.

    Lanczos steps (one HVP each) run until every wanted Ritz pair has residual
    ``||H x - theta x|| <= tol * max_j |theta_j|`` (module docstring), or ``max_steps``.

    Args:
        op: a :class:`landscape.hvp.GroupHessian`, a dense symmetric tensor, or anything with
            ``matmat`` and ``n_params`` or ``shape``.
        top: number of largest eigenvalues (0 for none).
        bottom: number of smallest eigenvalues (0 for none).
        tol: relative residual tolerance.
        max_steps: at most this many HVPs (capped at ``n``).
        seed: seeds the Gaussian start vector (drawn on the CPU in float64, so the same seed
            gives the same vector on every device).
        start: an explicit start vector instead.

    Raises:
        ValueError: ``top`` or ``bottom`` negative or larger than ``n``.
    """
    n = operator_size(op)
    top, bottom = int(top), int(bottom)
    if top < 0 or bottom < 0:
        raise ValueError("top and bottom must be >= 0")
    if top > n or bottom > n:
        raise ValueError(f"k = {max(top, bottom)} is larger than the parameter count {n}")
    max_steps = int(min(max(max_steps, min(top + bottom, n), 1), n))
    if start is None:
        start = torch.randn(1, n, generator=torch.Generator().manual_seed(int(seed)),
                            dtype=torch.float64)
    result = lanczos(operator_matmat(op), start.reshape(1, n), max_steps, keep_basis=True,
                     seed=seed + 1, stop=_residual_rule(n, top, bottom, tol),
                     device=getattr(op, "device", None),
                     operator_dtype=getattr(op, "dtype", torch.float64))
    return _ritz_pairs(result, n, top, bottom, tol)
