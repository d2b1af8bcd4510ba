r"""Block Lanczos with full re-orthogonalisation and deflation, for :mod:`landscape.eigen`.

From an orthonormal start block ``Q_1`` (n x b), each step multiplies the newest block by ``H``
(``b`` HVPs in one block product), orthogonalises the product against the whole basis (two
classical Gram-Schmidt passes, CGS2) and takes the orthonormal part as the next block. The
Gram-Schmidt coefficients are the Rayleigh quotient ``T = Q^T H Q`` column by column (banded in
exact arithmetic), so that after ``m`` basis vectors

.. math::  H Q_m = Q_m T_m + W E_{last}^T,

where ``W`` (n x b_last) is the orthogonalised product of the last block. A Ritz pair
``(\theta, Q_m s)`` of ``T_m`` has the residual estimate ``\|W s_{last}\|`` (``s_last``: the
entries of ``s`` on the last block), which costs no product.

Why a block: a Krylov space of one vector holds one copy of each eigenvalue (an eigenspace is
seen only through the start vector's component in it), so single-vector Lanczos finds one of
several equal eigenvalues and, converged, reports the next distinct ones in place of the copies.
A random block of ``b`` vectors reaches ``min(b, multiplicity)`` copies of every eigenvalue,
so ``b >= k`` gives the ``k`` extreme eigenvalues of an end with their multiplicities.

Deflation: a column of ``W`` whose singular value is below ``100 eps ||T||`` adds nothing new
(the space reachable from the start block is exhausted in that direction) and is dropped; the
block shrinks. When every column is dropped the basis spans an invariant subspace, and the
iteration restarts from a random block orthogonal to it (a *segment* starts), so that
eigenvalues outside it are still found; with ``n`` vectors every eigenvalue is found exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

Matmat = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["BlockKrylov", "block_lanczos", "ritz_residuals"]


@dataclass(frozen=True)
class BlockKrylov:
    """The state of a block Lanczos run after ``m`` basis vectors.

    Attributes:
        basis: ``(m, n)`` float64 orthonormal rows ``Q_m^T``.
        projection: ``(m, m)`` symmetric ``T_m = Q_m^T H Q_m``.
        coupling: ``(b_last, b_last)``, ``S V^T`` of the SVD ``W = U S V^T``: the residual
            estimate of ``Q_m s`` is ``||coupling @ s[last]||``.
        last: index of the last block's first vector.
        segment: index of the first vector after the last restart (0 without one).
        hvps: products with the operator.
    """

    basis: torch.Tensor
    projection: np.ndarray
    coupling: np.ndarray
    last: int
    segment: int
    hvps: int

    @property
    def size(self) -> int:
        return int(self.projection.shape[0])


def ritz_residuals(state: BlockKrylov, vectors: np.ndarray, offset: int = 0) -> np.ndarray:
    """Residual estimates ``||W s_last||`` of the Ritz vectors ``vectors`` (columns of ``s``
    over the basis from index ``offset`` on)."""
    return np.linalg.norm(state.coupling @ vectors[state.last - offset:], axis=0)


def _orthonormal(block: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the rows of ``block`` (k, n), by QR of its transpose."""
    q, _ = torch.linalg.qr(block.T)
    return q.T.contiguous()


def _project_out(rows: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows - C basis`` with ``C = rows basis^T``, twice (CGS2); returns the rows and ``C``."""
    coefficients = rows @ basis.T
    rows = rows - coefficients @ basis
    again = rows @ basis.T
    return rows - again @ basis, coefficients + again


def _fresh_block(count: int, basis: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``count`` random orthonormal rows orthogonal to ``basis`` (a restart)."""
    block = torch.randn(count, basis.shape[1], generator=generator, dtype=torch.float64)
    block, _ = _project_out(block.to(basis.device), basis)
    block, _ = _project_out(_orthonormal(block), basis)
    return _orthonormal(block)


def block_lanczos(matmat: Matmat, start: torch.Tensor, max_hvps: int, *,
                  stop: Callable[[BlockKrylov], bool], random_start: bool = True,
                  seed: int = 0, device: Optional[torch.device] = None,
                  operator_dtype: torch.dtype = torch.float64) -> BlockKrylov:
    """Runs block Lanczos from the rows of ``start`` (b, n) until ``stop(state)`` or
    ``max_hvps`` products (at most ``n``: then the basis is complete and ``T`` exact).

    At an exhaustion every Ritz residual is ~0. A random block reaches ``min(b, multiplicity)``
    copies of every eigenvalue (with probability 1), so its invariant subspace is all there is
    to find and ``stop`` is asked; a given start (``random_start=False``) may miss eigenvalues,
    so its first segment is always followed by a random restart. Restart blocks are drawn from
    a CPU generator seeded with ``seed``.
    """
    b, n = start.shape
    device = device or start.device
    capacity = int(min(max_hvps, n))
    basis = torch.zeros(capacity, n, dtype=torch.float64, device=device)
    T = np.zeros((capacity, capacity))
    block = _orthonormal(start.to(device, torch.float64))[:capacity]
    generator = torch.Generator().manual_seed(int(seed))
    drop = 100 * torch.finfo(operator_dtype).eps
    m, segment, hvps, norm = 0, 0, 0, 0.0
    while True:
        k = block.shape[0]
        basis[m:m + k] = block
        product = matmat(block.T.contiguous()).T.to(device, torch.float64)  # (k, n): H Q_j
        hvps += k
        rows, coefficients = _project_out(product, basis[:m + k])
        C = coefficients.cpu().numpy()  # C[i, r] = q_r^T H q_{m+i}
        T[:m + k, m:m + k] = C.T
        T[m:m + k, :m] = C[:, :m]
        T[m:m + k, m:m + k] = (C[:, m:] + C[:, m:].T) / 2
        u, s, vh = torch.linalg.svd(rows.T, full_matrices=False)  # rows^T = U diag(s) V^T
        s_np = s.cpu().numpy()
        norm = max(norm, float(np.abs(T[:m + k, :m + k]).sum(axis=0).max()))
        state = BlockKrylov(basis[:m + k], T[:m + k, :m + k].copy(), s_np[:, None]
                            * vh.cpu().numpy(), m, segment, hvps)
        m += k
        keep = s_np > drop * max(norm, 1e-300)
        room = min(capacity - m, max_hvps - hvps)
        if room <= 0:
            return state
        if (keep.any() or segment or random_start) and stop(state):
            return state
        if keep.any():
            block = u.T[torch.as_tensor(np.flatnonzero(keep)[:room], device=device)]
            block, _ = _project_out(block.contiguous(), basis[:m])  # rounding only
            block = _orthonormal(block)
        else:  # an invariant subspace: restart in its complement
            segment = m
            block = _fresh_block(min(b, room), basis[:m], generator)
