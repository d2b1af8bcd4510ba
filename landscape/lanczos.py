"""Lanczos with full re-orthogonalisation: several runs side by side, float64 bases.

For a symmetric ``H`` (n x n) and a unit start vector ``q_1``, ``m`` Lanczos steps build an
orthonormal basis ``Q_m = [q_1 .. q_m]`` of the Krylov space ``span{q_1, H q_1, .., H^{m-1} q_1}``
and the tridiagonal ``T_m = Q_m^T H Q_m`` (diagonal ``alpha``, off-diagonal ``beta``) with

.. math::  H Q_m = Q_m T_m + \\beta_m q_{m+1} e_m^T.

If ``T_m = S \\Theta S^T``, the Ritz pairs ``(\\theta_j, x_j = Q_m s_j)`` have residuals

.. math::  \\| H x_j - \\theta_j x_j \\| = \\beta_m |e_m^T s_j|,

which need no further products with ``H``. The extreme Ritz values converge first, from inside:
the largest towards ``lambda_max``, the smallest (most negative) towards ``lambda_min`` (power
iteration only finds the eigenvalue of largest magnitude). :mod:`landscape.slq` turns this into
spectral densities; the extreme eigenpairs (:mod:`landscape.eigen`) use the block version in
:mod:`landscape._block_lanczos`, since one vector's Krylov space holds one copy of each
eigenvalue.

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
* Several independent start vectors can run side by side (the SLQ probes): their products with
  ``H`` are one block product, which shares forward passes.
* Breakdown (``beta`` ~ 0: the Krylov space is invariant) restarts with a random vector orthogonal
  to the basis and a zero coupling, so eigenvalues outside the first invariant space are still
  found; with ``n`` steps every eigenvalue is found exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import scipy.linalg
import torch

__all__ = ["lanczos", "LanczosResult", "tridiagonal_eigh", "operator_size", "operator_matmat"]

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


class _Runs:
    """The state of ``p`` Lanczos runs side by side (see :func:`lanczos`): their bases, the
    recurrence's ``alpha`` and ``beta``, and which runs are still going."""

    def __init__(self, start: torch.Tensor, steps: int, keep_basis: bool, device,
                 breakdown: float):
        p, n = start.shape
        # Every row a run reads has been written first, so only a returned basis needs zeros
        # (the rows past a stopped run's length).
        allocate = torch.zeros if keep_basis else torch.empty
        self.basis = allocate(p, steps, n, dtype=torch.float64, device=device)
        self.alphas = np.full((p, steps), np.nan)
        self.betas = np.zeros((p, steps))
        self.lengths = np.zeros(p, dtype=np.int64)
        self.norms = np.zeros(p)  # running estimate of ||T|| per run, for the breakdown test
        q = start.to(device, torch.float64)
        self.q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True)
        self.rows = np.arange(p)  # the runs still going (all, unless restart is False)
        self.index = slice(None)  # rows as an index of the bases: a slice (a view) while all run
        self.beta_prev = torch.zeros(p, 1, dtype=torch.float64, device=device)  # beta_{j-1}
        self.device, self.breakdown, self.hvps = device, breakdown, 0

    def step(self, j: int, matmat: Matmat) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Step ``j`` of every active run: ``(w, beta, broke)``, the next unnormalised vectors,
        their norms and which runs broke down."""
        self.basis[self.index, j] = self.q
        w = matmat(self.q.T.contiguous()).T.to(self.device, torch.float64)  # (a, n)
        self.hvps += self.rows.size
        alpha = torch.linalg.vecdot(self.q, w).unsqueeze(1)  # (a, 1): q_j^T H q_j
        # The three-term recurrence w = H q_j - alpha_j q_j - beta_{j-1} q_{j-1} removes the
        # large components first (q_{j-1} is zero at j = 0 and beta_{j-1} is zero after a
        # restart), so that full re-orthogonalisation against q_1..q_j only has rounding errors
        # left to remove: one classical Gram-Schmidt pass, w <- w - Q (Q^T w), for all runs at
        # once (two batched matrix products over the (a, j+1, n) bases).
        w = torch.addcmul(w, alpha, self.q, value=-1)
        if j:
            w = torch.addcmul(w, self.beta_prev, self.basis[self.index, j - 1], value=-1)
        Q = self.basis[self.index, :j + 1]  # (a, j+1, n)
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
        rows = self.rows
        self.alphas[rows, j], self.betas[rows, j], self.lengths[rows] = alpha_np, beta_np, j + 1
        size = np.abs(alpha_np) + (np.maximum(beta_np, self.betas[rows, j - 1]) if j else beta_np)
        self.norms[rows] = np.maximum(self.norms[rows], size)
        return w, beta, beta_np <= self.breakdown * np.maximum(self.norms[rows], 1e-300)

    def advance(self, j: int, w: torch.Tensor, beta: torch.Tensor, broke: np.ndarray,
                restart: bool, generator: torch.Generator) -> bool:
        """Sets the next ``q`` of every run: ``w / beta``, a fresh vector orthogonal to the
        basis at a breakdown (``restart``), or none (the run stops). False when none is left."""
        self.beta_prev = beta.unsqueeze(1)
        if not broke.any():
            self.q = w / self.beta_prev
            return True
        # A breakdown (rare): beta = 1 only to avoid dividing by zero; the run restarts or stops.
        self.beta_prev = torch.where(torch.as_tensor(broke, device=self.device).unsqueeze(1),
                                     torch.zeros_like(self.beta_prev), self.beta_prev)
        new_q = w / torch.where(self.beta_prev == 0, torch.ones_like(self.beta_prev),
                                self.beta_prev)
        for slot in np.flatnonzero(broke):
            row = self.rows[slot]
            self.betas[row, j] = 0.0
            if restart:
                fresh = _gaussian(w.shape[1], 1, generator)[0].to(self.device)
                basis_row = self.basis[row, :j + 1]
                for _ in range(2):
                    fresh = fresh - basis_row.T @ (basis_row @ fresh)
                new_q[slot] = fresh / fresh.norm()
        if not restart:
            keep = torch.as_tensor(np.flatnonzero(~broke), device=self.device)
            self.rows = self.rows[~broke]
            if self.rows.size == 0:
                return False
            # Only the stopped runs' rows go; the others keep their q and beta_{j-1}. Indexing
            # copies the bases at each step from here on, so the slice is kept while it can be.
            self.index = torch.as_tensor(self.rows, device=self.device)
            new_q, self.beta_prev = new_q[keep], self.beta_prev[keep]
        self.q = new_q
        return True

    def result(self, keep_basis: bool) -> LanczosResult:
        m = int(self.lengths.max())
        return LanczosResult(self.alphas[:, :m], self.betas[:, :m], self.lengths,
                             self.basis[:, :m] if keep_basis else None, self.hvps)


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

    Example:
        >>> H = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> result = lanczos(lambda V: H @ V, torch.ones(1, 5, dtype=torch.float64), 5)
        >>> np.round(tridiagonal_eigh(*result.tridiagonal(0))[0], 12).tolist()
        [1.0, 2.0, 3.0, 4.0, 5.0]
    """
    if start.ndim != 2:
        raise ValueError("start must have shape (p, n)")
    p, n = start.shape
    steps = int(min(steps, n))
    if steps < 1:
        raise ValueError("steps must be >= 1")
    runs = _Runs(start, steps, keep_basis, device or start.device,
                 100 * torch.finfo(operator_dtype).eps)
    generator = torch.Generator().manual_seed(int(seed))
    for j in range(steps):
        w, beta, broke = runs.step(j, matmat)
        # At a breakdown every Ritz residual is ~0, yet the invariant subspace found need not
        # hold the wanted eigenvalues (nor every copy of a repeated one): never stop there when
        # a restart can explore the rest.
        if (p == 1 and stop is not None and not (restart and broke[0])
                and stop(runs.alphas[0, :j + 1], runs.betas[0, :j + 1], j + 1)):
            break
        if j + 1 == steps or not runs.advance(j, w, beta, broke, restart, generator):
            break
    return runs.result(keep_basis)


def __getattr__(name: str):
    # The extreme eigenpairs lived here before landscape.eigen; the old import path still works
    # (imported on first use: landscape.eigen imports this module).
    if name in ("EigenResult", "extreme_eigenpairs"):
        from landscape import eigen

        return getattr(eigen, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
