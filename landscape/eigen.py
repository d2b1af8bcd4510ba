r"""The extreme eigenpairs of a symmetric operator, with multiplicities, and the saddle ratio.

Block Lanczos (:mod:`landscape._block_lanczos`) from a random block of
``b = max(k_top, k_bottom)`` vectors: a Krylov space of one vector holds one copy of each
eigenvalue, so single-vector Lanczos, converged, reports the next distinct eigenvalues in place
of a repeated one's copies (on a ReLU network with dead units, whose Hessian has many exact
zeros, ``bottom = 3`` gave ``[0, 0.049, 0.058]`` for ``[0, 0, 0]``); a block of ``b`` reaches
``min(b, multiplicity)`` copies of every eigenvalue, so the ``k`` extreme ones of each end come
with their multiplicities.

With the basis ``Q_m`` and ``T_m = Q_m^T H Q_m = S \Theta S^T``, the Ritz pair
``(\theta_j, x_j = Q_m s_j)`` has a residual estimate from the last block, without a product.
Steps run until every wanted pair's estimate is at most ``tol * max_j |theta_j|`` (relative to
the ``||H||_2`` estimate, so that eigenvalues near 0 converge too); then one product per
reported vector gives the true residual ``||H x_j - theta_j x_j||``, which is what is reported
and what ``converged`` checks (an estimate can read 0 where rounding leaves more). A residual
``r`` bounds the eigenvalue's error by ``r``, and by ``r^2 / gap`` when it is separated from the
rest of the spectrum by ``gap``. Where the result cannot be trusted, ``converged`` is False and
``reason`` says why.

Hand-written rather than ``scipy.sparse.linalg.eigsh`` (ARPACK): ARPACK's implicit restarts
spend HVPs on restarts, its stopping rule is relative to each eigenvalue (hopeless for
eigenvalues near 0) and it reports no residuals; here every vector of the basis is one HVP and
each eigenvalue's residual is reported. ``bench/bench_hessian.py`` compares both.

**The saddle ratio** (:func:`saddle_ratio`) is the one convention of the project for
``ratio``: ``lambda_min / lambda_max``, NaN when undefined.

>>> import torch
>>> H = torch.diag(torch.tensor([-1.0, 0.5, 2.0, 4.0], dtype=torch.float64))
>>> r = extreme_eigenpairs(H, top=1, bottom=1, seed=0)
>>> round(r.lambda_max, 9), round(r.lambda_min, 9), round(r.ratio, 9), r.converged
(4.0, -1.0, -0.25, True)

A repeated eigenvalue comes with its copies:

>>> H = torch.diag(torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 5.0], dtype=torch.float64))
>>> r = extreme_eigenpairs(H, top=1, bottom=3, seed=0)
>>> np.round(r.bottom, 9).tolist(), r.block_size, r.converged, r.reason
([0.0, 0.0, 0.0], 3, True, '')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from landscape._block_lanczos import BlockKrylov, block_lanczos, ritz_residuals
from landscape.lanczos import operator_matmat, operator_size
from landscape.options import MIN_STEPS

__all__ = ["EigenResult", "MIN_STEPS", "extreme_eigenpairs", "saddle_ratio"]


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
    """Extreme eigenpairs of a symmetric operator, from one block Lanczos run.

    Attributes:
        top: the ``k_top`` largest eigenvalues, descending (``top[0] = lambda_max``).
        bottom: the ``k_bottom`` smallest (most negative), ascending (``bottom[0] = lambda_min``).
        top_vectors: ``(k_top, n)`` float64 unit Ritz vectors (torch, on the basis device), row
            ``i`` belonging to ``top[i]``; the flat parameter layout of the operator.
        bottom_vectors: ``(k_bottom, n)``, likewise.
        top_residuals: ``||H x - theta x||`` of each top pair, computed with one product
            each after the iteration (not Lanczos's estimate, which can read 0).
        bottom_residuals: likewise.
        tolerance: the absolute residual threshold used, ``tol * max |theta|``.
        steps: basis vectors built (= HVPs of the iteration).
        hvps: products with the operator in all (``steps`` plus one per reported vector).
        ritz_values: all Ritz values of the last step, ascending.
        block_size: vectors in the Lanczos block, ``max(k_top, k_bottom, 1)``.
        reason: why the result is not converged (``""`` when it is): ``max_steps`` reached,
            true residuals above the tolerance, a restart's complement not explored.
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
    block_size: int = 1
    reason: str = ""

    @property
    def top_converged(self) -> np.ndarray:
        return self.top_residuals <= self.tolerance

    @property
    def bottom_converged(self) -> np.ndarray:
        return self.bottom_residuals <= self.tolerance

    @property
    def converged(self) -> bool:
        """Whether every requested eigenvalue's true residual is within ``tolerance`` and
        nothing else casts doubt on the result (``reason`` says what does)."""
        return bool(self.top_converged.all() and self.bottom_converged.all()
                    and not self.reason)

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




def _wanted(m: int, top: int, bottom: int) -> np.ndarray:
    """Indices of the wanted Ritz values among ``m`` ascending ones: bottom ones, then top."""
    return np.r_[np.arange(min(bottom, m)), np.arange(m - 1, m - 1 - min(top, m), -1)]


def _stopping_rule(n: int, top: int, bottom: int, tol: float, min_steps: int = 0):
    """The stopping rule of :func:`extreme_eigenpairs` as ``block_lanczos``'s ``stop``."""

    def done(state: BlockKrylov) -> bool:
        m = state.size
        if m < min(max(top + bottom, min_steps), n):
            return False
        theta, s = np.linalg.eigh(state.projection)
        threshold = tol * np.abs(theta).max()
        if not (ritz_residuals(state, s[:, _wanted(m, top, bottom)]) <= threshold).all():
            return False
        if state.segment == 0:
            return True
        # After a restart the earlier segments' Ritz values are exact, but the complement
        # they leave is known only through the current segment: its extreme Ritz values must
        # converge too, or a more extreme eigenvalue may still be hidden there.
        first = state.segment
        _, block_s = np.linalg.eigh(state.projection[first:, first:])
        chosen = _wanted(m - first, top, bottom)
        return bool((ritz_residuals(state, block_s[:, chosen], first) <= threshold).all())

    return done


def _reason(state: BlockKrylov, n: int, max_steps: int, true: np.ndarray, threshold: float,
            estimated: bool) -> str:
    """Why the wanted pairs are not trusted (``""`` when they are)."""
    above = int((true > threshold).sum())
    if above and not estimated:
        return (f"max_steps reached: {max_steps} HVPs left {above} of {true.size} residuals "
                f"above the tolerance {threshold:.3g}")
    if above:
        return (f"{above} of {true.size} computed residuals ||H x - theta x|| exceed the "
                f"tolerance {threshold:.3g} although Lanczos's estimates do not (rounding in the "
                "products: float32? a tolerance below their precision?)")
    if not estimated and state.segment and state.size < n:
        return ("max_steps reached after a restart: the rest of the space was not explored to "
                "the tolerance, so a more extreme eigenvalue may be missing")
    return ""


def _ritz_pairs(state: BlockKrylov, op_matmat, n: int, top: int, bottom: int, tol: float,
                max_steps: int, estimated: bool) -> EigenResult:
    """The wanted Ritz pairs of a finished run and their true residuals (one product each)."""
    m = state.size
    theta, s = np.linalg.eigh(state.projection)
    top_idx, bottom_idx = _wanted(m, top, 0), _wanted(m, 0, bottom)
    basis = state.basis
    chosen = np.unique(np.r_[top_idx, bottom_idx])
    X = torch.as_tensor(s[:, chosen].T.copy(), device=basis.device) @ basis  # (k, n)
    HX = op_matmat(X.T.contiguous()).T.to(basis.device, torch.float64)
    values = torch.as_tensor(theta[chosen], device=basis.device).unsqueeze(1)
    true = torch.linalg.vector_norm(HX - values * X, dim=1).cpu().numpy()
    row = {int(index): i for i, index in enumerate(chosen)}

    def pick(idx: np.ndarray):
        rows = [row[int(index)] for index in idx]
        return X[rows].contiguous().reshape(len(rows), n), true[rows]

    top_vectors, top_residuals = pick(top_idx)
    bottom_vectors, bottom_residuals = pick(bottom_idx)
    threshold = tol * float(np.abs(theta).max())
    reason = _reason(state, n, max_steps, true, threshold, estimated)
    return EigenResult(top=theta[top_idx], bottom=theta[bottom_idx],
                       top_vectors=top_vectors, bottom_vectors=bottom_vectors,
                       top_residuals=top_residuals, bottom_residuals=bottom_residuals,
                       tolerance=threshold, steps=m, hvps=state.hvps + len(chosen),
                       ritz_values=theta, block_size=max(top, bottom, 1), reason=reason)


def extreme_eigenpairs(op, top: int = 1, bottom: int = 1, *, tol: float = 1e-6,
                       max_steps: int = 300, min_steps: int = MIN_STEPS, seed: int = 0,
                       start: Optional[torch.Tensor] = None) -> EigenResult:
    """The ``top`` largest and ``bottom`` smallest eigenpairs of a symmetric operator, with
    multiplicities.

    Block Lanczos (:mod:`landscape._block_lanczos`) with a block of
    ``b = max(top, bottom)`` random vectors runs until every wanted Ritz pair's estimated
    residual is at most ``tol * max_j |theta_j|`` (module docstring), or ``max_steps`` HVPs;
    then one more product per reported vector gives its true residual ``||H x - theta x||``.

    Args:
        op: a :class:`landscape.hvp.GroupHessian`, a dense symmetric tensor, or anything with
            ``matmat`` and ``n_params`` or ``shape``.
        top: number of largest eigenvalues (0 for none).
        bottom: number of smallest eigenvalues (0 for none).
        tol: relative residual tolerance.
        max_steps: at most this many HVPs in the iteration (capped at ``n``; at least one
            block), besides the residual products.
        min_steps: no stop before this many HVPs (capped at ``max_steps``). The tolerance is
            relative to ``||H||``, so a Ritz value inside a dense cluster near 0 meets it
            before a negative outlier near that cluster has emerged: with 3,000 eigenvalues
            of N(0, 0.01), two at -0.6 and -0.5 and the top at 100, ``tol=1e-3`` stops after
            4 steps at ``lambda_min`` of -0.0006 to -0.007 (six seeds), "converged"; with 20
            steps it finds -0.6 (``tests/test_lanczos.py``). A whole CIFAR ResNet-20 head
            stopped after 9 steps at -0.0009, where its 512-image subsample had -3.1
            (RESULTS.md). A run that would stop later is unchanged by the floor.
        seed: seeds the Gaussian start block (drawn on the CPU in float64, so the same seed
            gives the same block on every device; its first row is the start vector of
            ``b = 1``).
        start: explicit start vectors ``(n,)`` or ``(r, n)`` instead (the first ``r`` rows of
            the block, the rest drawn from ``seed``).

    Raises:
        ValueError: ``top`` or ``bottom`` negative or larger than ``n``.
    """
    n = operator_size(op)
    top, bottom = int(top), int(bottom)
    if top < 0 or bottom < 0:
        raise ValueError("top and bottom must be >= 0")
    if top > n or bottom > n:
        raise ValueError(f"k = {max(top, bottom)} is larger than the parameter count {n}")
    b = max(top, bottom, 1)
    max_steps = int(min(max(max_steps, min(top + bottom, n), b), n))
    block = torch.randn(b, n, generator=torch.Generator().manual_seed(int(seed)),
                        dtype=torch.float64)
    if start is not None:
        given = torch.as_tensor(start, dtype=torch.float64).reshape(-1, n)[:b]
        block[:len(given)] = given
    rule = _stopping_rule(n, top, bottom, tol, min(int(min_steps), max_steps))
    matmat = operator_matmat(op)
    state = block_lanczos(matmat, block, max_steps, stop=rule, random_start=start is None,
                          seed=seed + 1,
                          device=getattr(op, "device", None),
                          operator_dtype=getattr(op, "dtype", torch.float64))
    return _ritz_pairs(state, matmat, n, top, bottom, tol, max_steps,
                       estimated=state.size == n or rule(state))
