r"""Stochastic trace estimates: Hutchinson and Hutch++.

Hutchinson: ``tr(H) = E[z^T H z]`` for Rademacher ``z``; the estimate is the sample
mean and its standard error ``std(z^T H z) / sqrt(s)``. Hutch++ (Meyer, Musco, Musco & Woodruff
2021) spends a third of the products on a sketch ``Q = orth(H S)``, computes ``tr(Q^T H Q)``
exactly and applies Hutchinson to the deflated ``(I - QQ^T) H (I - QQ^T)`` only; its standard
error is that of the Hutchinson part (conditional on the sketch).

>>> import torch
>>> H = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))      # tr(H) = 21
>>> round(hutchpp_trace(H, hvps=18, seed=0).value, 9)   # the sketch spans all 6 dimensions
21.0
>>> estimate = hutchinson_trace(H, samples=5, seed=0)   # z^T H z = tr(H) for a diagonal H
>>> estimate.value, estimate.stderr, estimate.hvps
(21.0, 0.0, 5)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from landscape.lanczos import operator_matmat, operator_size

__all__ = ["TraceEstimate", "hutchinson_trace", "hutchpp_trace", "rademacher_probes"]


def rademacher_probes(n: int, count: int, seed: int) -> torch.Tensor:
    """``(count, n)`` float64 vectors of independent +-1 entries, drawn on the CPU from ``seed``
    (the same on every device)."""
    generator = torch.Generator().manual_seed(int(seed))
    signs = torch.randint(0, 2, (count, n), generator=generator, dtype=torch.int8)
    return signs.to(torch.float64).mul_(2).sub_(1)


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic trace estimate.

    Attributes:
        value: the estimate of ``tr(H)``.
        stderr: its standard error (Hutch++: of the Hutchinson part, given the sketch).
        samples: the Hutchinson quadratic forms (Hutch++: of the deflated operator), each an
            unbiased estimate of the stochastic part.
        hvps: products with the operator.
        method: ``"hutchinson"`` or ``"hutch++"``.
    """

    value: float
    stderr: float
    samples: np.ndarray = field(repr=False)
    hvps: int
    method: str


def _blocks(count: int, block: int):
    for first in range(0, count, block):
        yield first, min(count, first + block)


def _stderr(samples: np.ndarray) -> float:
    return float(samples.std(ddof=1) / np.sqrt(samples.size)) if samples.size > 1 else float("inf")


def hutchinson_trace(op, samples: int = 100, *, seed: int = 0, block: int = 10) -> TraceEstimate:
    """Hutchinson's estimate ``(1/s) sum_i z_i^T H z_i`` with ``samples`` Rademacher vectors
    (``block`` of them per block product)."""
    if samples < 1:
        raise ValueError("samples must be >= 1")
    n = operator_size(op)
    matmat = operator_matmat(op)
    Z = rademacher_probes(n, samples, seed)  # (s, n)
    forms = np.zeros(samples)
    for a, b in _blocks(samples, max(1, block)):
        HZ = matmat(Z[a:b].T.contiguous()).to(torch.float64).cpu()  # (n, k)
        forms[a:b] = (Z[a:b].T * HZ).sum(dim=0).numpy()
    return TraceEstimate(float(forms.mean()), _stderr(forms), forms, samples, "hutchinson")


def hutchpp_trace(op, hvps: int = 99, *, seed: int = 0, block: int = 11) -> TraceEstimate:
    """Hutch++ with a budget of ``hvps`` products: a sketch of ``k = hvps // 3`` vectors, ``k``
    products for the exact part and ``hvps - 2k`` Hutchinson samples of the deflated operator.

    When ``k >= n`` the sketch spans everything and the trace is exact (``stderr = 0``).
    """
    if hvps < 3:
        raise ValueError("Hutch++ needs at least 3 HVPs")
    n = operator_size(op)
    matmat = operator_matmat(op)
    k = min(hvps // 3, n)
    s = hvps - 2 * k if k < n else 0
    signs = rademacher_probes(n, k + s, seed)
    S, G = signs[:k].T, signs[k:].T  # (n, k), (n, s)

    def apply(V: torch.Tensor) -> torch.Tensor:
        return torch.cat([matmat(V[:, a:b].contiguous()).to(torch.float64).cpu()
                          for a, b in _blocks(V.shape[1], max(1, block))], dim=1)

    Q, _ = torch.linalg.qr(apply(S))  # (n, k) orthonormal basis of range(H S)
    exact = float((Q * apply(Q)).sum())
    used = 2 * k
    if s == 0:
        return TraceEstimate(exact, 0.0, np.zeros(0), used, "hutch++")
    G_perp = G - Q @ (Q.T @ G)
    forms = (G_perp * apply(G_perp)).sum(dim=0).numpy()
    used += s
    return TraceEstimate(exact + float(forms.mean()), _stderr(forms), forms, used, "hutch++")
