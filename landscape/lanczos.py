"""Lanczos with full re-orthogonalisation, and the extreme eigenpairs of a symmetric operator.

For a symmetric ``H`` (n x n) and a unit start vector ``q_1``, ``m`` Lanczos steps build an
orthonormal basis ``Q_m = [q_1 .. q_m]`` of the Krylov space ``span{q_1, H q_1, .., H^{m-1} q_1}``
and the tridiagonal ``T_m = Q_m^T H Q_m`` (diagonal ``alpha``, off-diagonal ``beta``) with

.. math::  H Q_m = Q_m T_m + \\beta_m q_{m+1} e_m^T.

If ``T_m = S \\Theta S^T``, the Ritz pairs ``(\\theta_j, x_j = Q_m s_j)`` have residuals

.. math::  \\| H x_j - \\theta_j x_j \\| = \\beta_m |e_m^T s_j|,

which need no further products with ``H``. The extreme Ritz values converge first, from inside:
the largest towards ``lambda_max``, the smallest (most negative) towards ``lambda_min`` (power
iteration only finds the eigenvalue of largest magnitude).

Choices, and why:

* Full re-orthogonalisation: without it, rounding makes converged Ritz values reappear as
  spurious copies. Each step first applies the three-term recurrence
  ``w = H q_j - alpha_j q_j - beta_{j-1} q_{j-1}``, then one classical Gram-Schmidt pass against
  the whole basis, ``w <- w - Q_j (Q_j^T w)``, and a second pass only when the first cancelled
  more than a factor ``1/sqrt(2)`` of ``||w||`` (the "twice is enough" test of Daniel, Gragg,
  Kaufman & Stewart). After the recurrence, ``Q_j^T w`` holds rounding errors only, so one pass
  gives the orthogonality of two passes from ``H q_j`` (CGS2) at half the cost, which for
  several runs (``p`` bases of ``j`` vectors, read once per pass) is the bulk of the work
  besides the products.
* The basis and the recurrence (``alpha``, ``beta``, ``T``) are float64 whatever the operator's
  dtype, and ``T`` is diagonalised by ``scipy.linalg.eigh_tridiagonal`` (LAPACK ``stemr``).
* Hand-written rather than ``scipy.sparse.linalg.eigsh`` (ARPACK): ARPACK's implicit restarts
  spend HVPs on restarts, its stopping rule is relative to each eigenvalue (hopeless for
  eigenvalues near 0) and it reports no residuals; here every step is one HVP, the stopping rule is
  the Ritz residual relative to ``||H||_2``, and each eigenvalue's residual is reported. The
  benchmark compares both.
* Several independent start vectors can run side by side (the SLQ probes): their products with
  ``H`` are one block product, which shares forward passes.
* Breakdown (``beta`` ~ 0: the Krylov space is invariant) restarts with a random vector orthogonal
  to the basis and a zero coupling, so eigenvalues outside the first invariant space are still
  found; with ``n`` steps every eigenvalue is found exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import scipy.linalg
import torch

__all__ = ["lanczos", "LanczosResult", "extreme_eigenpairs", "EigenResult", "tridiagonal_eigh",
           "operator_size", "operator_matmat"]

Matmat = Callable[[torch.Tensor], torch.Tensor]


def tridiagonal_eigh(alphas: np.ndarray, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal matrix with
    diagonal ``alphas`` (m) and off-diagonal ``betas`` (m - 1), in float64."""
    alphas = np.asarray(alphas, dtype=np.float64)
    betas = np.asarray(betas, dtype=np.float64)
    if alphas.size == 1:
        return alphas.copy(), np.ones((1, 1))
    return scipy.linalg.eigh_tridiagonal(alphas, betas)


@dataclass(frozen=True)
class LanczosResult:
    """The tridiagonal matrices of ``p`` independent Lanczos runs.

    Attributes:
        alphas: ``(p, m)`` diagonals; a run that stopped early (``lengths``) is padded with NaN.
        betas: ``(p, m)``; ``betas[i, j]`` couples ``q_{j+1}`` and ``q_{j+2}`` (0 at a restart);
            ``betas[i, lengths[i] - 1]`` is the residual norm ``beta_m`` of the last step.
        lengths: steps taken by each run.
        basis: ``(p, m, n)`` float64 Lanczos vectors when ``keep_basis``, else None.
        hvps: products with the operator.
    """

    alphas: np.ndarray
    betas: np.ndarray
    lengths: np.ndarray
    basis: Optional[torch.Tensor]
    hvps: int

    def tridiagonal(self, run: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(alpha, beta)`` of run ``run``: ``T``'s diagonal (m) and off-diagonal (m - 1)."""
        m = int(self.lengths[run])
        return self.alphas[run, :m], self.betas[run, :m - 1]


def operator_size(op) -> int:
    """``n`` of an operator with ``n_params`` (:class:`landscape.hvp.GroupHessian`) or ``shape``."""
    if hasattr(op, "n_params"):
        return int(op.n_params)
    return int(op.shape[0])


def operator_matmat(op) -> Matmat:
    """``V (n, k) -> H V`` for a GroupHessian, a dense tensor, or anything with ``matmat``."""
    if isinstance(op, torch.Tensor):
        return lambda V: op @ V.to(op.dtype)
    if hasattr(op, "matmat"):
        return op.matmat
    raise TypeError(f"not an operator: {type(op).__name__} (needs matmat or to be a tensor)")


def _gaussian(n: int, count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(count, n, generator=generator, dtype=torch.float64)


def _project_out(w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``w_i - Q_i^T (Q_i w_i)`` for each run ``i``: ``w`` (a, n), bases ``Q`` (a, k, n).

    One batched product for the coefficients ``c_i = Q_i w_i`` (a row vector times ``Q_i^T``,
    which reads ``Q`` row by row, the faster layout here) and one fused multiply-subtract.
    """
    coefficients = torch.bmm(w.unsqueeze(1), Q.transpose(1, 2))  # (a, 1, k)
    return torch.baddbmm(w.unsqueeze(1), coefficients, Q, alpha=-1).squeeze(1)


def lanczos(matmat: Matmat, start: torch.Tensor, steps: int, *, keep_basis: bool = False,
            restart: bool = True, seed: int = 0,
            stop: Optional[Callable[[np.ndarray, np.ndarray, int], bool]] = None,
            device: Optional[torch.device] = None, operator_dtype: torch.dtype = torch.float64
            ) -> LanczosResult:
    """Runs ``steps`` Lanczos steps from each row of ``start`` side by side.

    Args:
        matmat: ``V (n, p) -> H V``; called once per step with the active runs' vectors.
        start: ``(p, n)`` start vectors (normalised here).
        steps: at most this many steps (and at most ``n``).
        keep_basis: return the float64 Lanczos vectors (needed for Ritz vectors).
        restart: at a breakdown (``beta`` below ``100 eps ||T||``: the Krylov space is invariant)
            continue from a random vector orthogonal to the basis with coupling 0, so that the
            rest of the spectrum can be found (eigenvalue problems). Without it the run stops
            there: a quadrature run (SLQ) is then exact and a restart would only add nodes of
            weight 0.
        seed: seeds the restart vectors.
        stop: ``stop(alphas, betas, m) -> bool`` called after each step of a single run
            (``p = 1``) with its float64 ``alpha`` (m) and ``beta`` (m, the last being the
            residual norm); True ends the iteration.
        device: where the basis lives (default: ``start``'s device).
        operator_dtype: dtype of the operator's products, for the breakdown threshold
            (``100 eps ||T||``).

    Returns:
        A :class:`LanczosResult`.
    """
    if start.ndim != 2:
        raise ValueError("start must have shape (p, n)")
    p, n = start.shape
    steps = int(min(steps, n))
    if steps < 1:
        raise ValueError("steps must be >= 1")
    device = device or start.device
    generator = torch.Generator().manual_seed(int(seed))
    breakdown = 100 * torch.finfo(operator_dtype).eps

    # Every row a run reads has been written first, so only a returned basis needs zeros (the
    # rows past a stopped run's length).
    allocate = torch.zeros if keep_basis else torch.empty
    basis = allocate(p, steps, n, dtype=torch.float64, device=device)
    alphas = np.full((p, steps), np.nan)
    betas = np.zeros((p, steps))
    lengths = np.zeros(p, dtype=np.int64)
    norms = np.zeros(p)  # running estimate of ||T|| per run, for the breakdown test
    q = start.to(device, torch.float64)
    q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True)
    rows = np.arange(p)  # the runs still going (all, unless restart is False)
    index = slice(None)  # rows as an index of the bases: a slice (a view) while all run
    beta_prev = torch.zeros(p, 1, dtype=torch.float64, device=device)  # beta_{j-1} per run
    hvps = 0
    for j in range(steps):
        basis[index, j] = q
        w = matmat(q.T.contiguous()).T.to(device, torch.float64)  # (a, n)
        hvps += rows.size
        alpha = torch.linalg.vecdot(q, w).unsqueeze(1)  # (a, 1): q_j^T H q_j
        # The three-term recurrence w = H q_j - alpha_j q_j - beta_{j-1} q_{j-1} removes the
        # large components first (q_{j-1} is zero at j = 0 and beta_{j-1} is zero after a
        # restart), so that full re-orthogonalisation against q_1..q_j only has rounding errors
        # left to remove: one classical Gram-Schmidt pass, w <- w - Q (Q^T w), for all runs at
        # once (two batched matrix products over the (a, j+1, n) bases).
        w = torch.addcmul(w, alpha, q, value=-1)
        if j:
            w = torch.addcmul(w, beta_prev, basis[index, j - 1], value=-1)
        Q = basis[index, :j + 1]  # (a, j+1, n)
        before = torch.linalg.vector_norm(w, dim=1)
        w = _project_out(w, Q)
        beta = torch.linalg.vector_norm(w, dim=1)
        # One host transfer per step (alpha, the norms before and after the pass).
        alpha_np, before_np, beta_np = torch.stack(
            [alpha.squeeze(1), before, beta]).cpu().numpy()
        # "Twice is enough" (Daniel, Gragg, Kaufman & Stewart 1976): if the pass cancelled much
        # of w (||w|| fell below ||w_before|| / sqrt(2)), what is left may hold relative errors
        # of order eps ||w_before|| / ||w||: project once more, as CGS2 always would.
        if (beta_np < before_np * np.sqrt(0.5)).any():
            w = _project_out(w, Q)
            beta = torch.linalg.vector_norm(w, dim=1)
            beta_np = beta.cpu().numpy()
        alphas[rows, j] = alpha_np
        betas[rows, j] = beta_np
        lengths[rows] = j + 1
        size = np.abs(alpha_np) + (np.maximum(beta_np, betas[rows, j - 1]) if j else beta_np)
        norms[rows] = np.maximum(norms[rows], size)
        broke = beta_np <= breakdown * np.maximum(norms[rows], 1e-300)
        # At a breakdown every Ritz residual is ~0, yet the invariant subspace found need not
        # hold the wanted eigenvalues (nor every copy of a repeated one): never stop there when
        # a restart can explore the rest.
        if (p == 1 and stop is not None and not (restart and broke[0])
                and stop(alphas[0, :j + 1], betas[0, :j + 1], j + 1)):
            break
        if j + 1 == steps:
            break
        beta_prev = beta.unsqueeze(1)
        if not broke.any():
            q = w / beta_prev
            continue
        # A breakdown (rare): beta = 1 only to avoid dividing by zero; the run restarts or stops.
        beta_prev = torch.where(torch.as_tensor(broke, device=device).unsqueeze(1),
                                torch.zeros_like(beta_prev), beta_prev)
        new_q = w / torch.where(beta_prev == 0, torch.ones_like(beta_prev), beta_prev)
        for slot in np.flatnonzero(broke):
            row = rows[slot]
            betas[row, j] = 0.0
            if restart:
                fresh = _gaussian(n, 1, generator)[0].to(device)
                basis_row = basis[row, :j + 1]
                for _ in range(2):
                    fresh = fresh - basis_row.T @ (basis_row @ fresh)
                new_q[slot] = fresh / fresh.norm()
        if not restart:
            keep = torch.as_tensor(np.flatnonzero(~broke), device=device)
            rows = rows[~broke]
            if rows.size == 0:
                break
            # Only the stopped runs' rows go; the others keep their q and beta_{j-1}. Indexing
            # copies the bases at each step from here on, so the slice is kept while it can be.
            index = torch.as_tensor(rows, device=device)
            new_q, beta_prev = new_q[keep], beta_prev[keep]
        q = new_q
    m = int(lengths.max())
    return LanczosResult(alphas[:, :m], betas[:, :m], lengths,
                         basis[:, :m] if keep_basis else None, hvps)


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
        return float(self.top[0]) if self.top.size else float(self.ritz_values[-1])

    @property
    def lambda_min(self) -> float:
        return float(self.bottom[0]) if self.bottom.size else float(self.ritz_values[0])

    @property
    def ratio(self) -> float:
        """The saddle indicator ``lambda_min / lambda_max`` (negative at a saddle)."""
        return self.lambda_min / self.lambda_max


def extreme_eigenpairs(op, top: int = 1, bottom: int = 1, *, tol: float = 1e-6,
                       max_steps: int = 300, seed: int = 0,
                       start: Optional[torch.Tensor] = None) -> EigenResult:
    """The ``top`` largest and ``bottom`` smallest eigenpairs of a symmetric operator.

    Lanczos steps (one HVP each) run until every wanted Ritz pair has residual
    ``||H x - theta x|| <= tol * max_j |theta_j|`` (relative to the ``||H||_2`` estimate), or
    ``max_steps``. A residual ``r`` bounds the eigenvalue error by ``r``, and by ``r^2 / gap``
    when the eigenvalue is separated from the rest of the spectrum by ``gap``.

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
    wanted = min(top + bottom, n)
    max_steps = int(min(max(max_steps, wanted, 1), n))
    if start is None:
        start = _gaussian(n, 1, torch.Generator().manual_seed(int(seed)))
    start = start.reshape(1, n)
    device = getattr(op, "device", None)
    op_dtype = getattr(op, "dtype", torch.float64)

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
        block_theta, block_s = tridiagonal_eigh(alphas[first:], betas[first:-1])
        block_residual = betas[-1] * np.abs(block_s[-1])
        return bool(block_residual[0] <= threshold and block_residual[-1] <= threshold)

    result = lanczos(operator_matmat(op), start, max_steps, keep_basis=True, seed=seed + 1,
                     stop=done, device=device, operator_dtype=op_dtype)
    alphas, betas = result.tridiagonal(0)
    m = int(result.lengths[0])
    theta, s = tridiagonal_eigh(alphas, betas)
    beta_last = 0.0 if m == n else float(result.betas[0, m - 1])
    residual = beta_last * np.abs(s[-1])
    threshold = tol * float(np.abs(theta).max())
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
                       tolerance=threshold, steps=m, hvps=result.hvps, ritz_values=theta)
