"""Spectral densities by stochastic Lanczos quadrature (SLQ), and Hutchinson / Hutch++ traces.

**SLQ** (Golub & Meurant; Ghorbani, Krishnan & Xiao 2019). For a unit probe ``v`` and ``m``
Lanczos steps with ``T_m = S diag(theta) S^T``, the Gauss quadrature with nodes ``theta_j`` and
weights ``tau_j = S_{1j}^2`` is exact for polynomials of degree ``<= 2m - 1``:

.. math::  v^T H^k v = \\sum_j \\tau_j \\theta_j^k, \\qquad k \\le 2m - 1.

With probes ``v`` uniform on the sphere's Rademacher points (``E[v v^T] = I / n``), the average
over probes of ``sum_j tau_j delta(t - theta_j)`` estimates the spectral density
``phi(t) = (1/n) sum_i delta(t - lambda_i)``; its ``k``-th moment estimates ``tr(H^k) / n``.
For display each node becomes a Gaussian of variance
``sigma^2 = 1e-5 * max(1, lambda_max - lambda_min)`` evaluated on a 10,000-point grid (Ghorbani
et al.'s choice; the raw nodes and weights are kept).

**Traces.** Hutchinson: ``tr(H) = E[z^T H z]`` for Rademacher ``z``; the estimate is the sample
mean and its standard error ``std(z^T H z) / sqrt(s)``. Hutch++ (Meyer, Musco, Musco & Woodruff
2021) spends a third of the products on a sketch ``Q = orth(H S)``, computes ``tr(Q^T H Q)``
exactly and applies Hutchinson to the deflated ``(I - QQ^T) H (I - QQ^T)`` only; its standard
error is that of the Hutchinson part (conditional on the sketch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from landscape.lanczos import lanczos, operator_matmat, operator_size, tridiagonal_eigh

__all__ = ["SpectralDensity", "slq", "gaussian_density", "rademacher_probes", "TraceEstimate",
           "hutchinson_trace", "hutchpp_trace", "DEFAULT_VARIANCE", "DEFAULT_GRID_POINTS"]

DEFAULT_VARIANCE = 1e-5
DEFAULT_GRID_POINTS = 10_000


def rademacher_probes(n: int, count: int, seed: int) -> torch.Tensor:
    """``(count, n)`` float64 vectors of independent +-1 entries, drawn on the CPU from ``seed``
    (the same on every device)."""
    generator = torch.Generator().manual_seed(int(seed))
    signs = torch.randint(0, 2, (count, n), generator=generator, dtype=torch.int8)
    return signs.to(torch.float64).mul_(2).sub_(1)


def gaussian_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray,
                     variance: float) -> np.ndarray:
    """``(1/p) sum_probes sum_j w_j N(grid; theta_j, variance)`` for ``(p, m)`` nodes and weights
    (NaN nodes, which carry weight 0, are skipped)."""
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    probes = weights.shape[0]
    nodes = np.asarray(nodes, dtype=np.float64).reshape(-1)
    weights = weights.reshape(-1)
    keep = np.isfinite(nodes) & (weights > 0)
    nodes, weights = nodes[keep], weights[keep]
    grid = np.asarray(grid, dtype=np.float64)
    density = np.zeros_like(grid)
    norm = 1.0 / np.sqrt(2 * np.pi * variance)
    # Beyond 39 standard deviations exp(-x^2/2) < 1e-330 underflows to 0 in float64, so each
    # Gaussian is evaluated on its window only: the same numbers, ~20x less work on 10^4 points.
    reach = 39.0 * np.sqrt(variance)
    if np.all(np.diff(grid) >= 0):
        lo = np.searchsorted(grid, nodes - reach, side="left")
        hi = np.searchsorted(grid, nodes + reach, side="right")
        for t, w, a, b in zip(nodes, weights, lo, hi):
            density[a:b] += w * norm * np.exp(-(grid[a:b] - t) ** 2 / (2 * variance))
        return density / probes
    for t, w in zip(nodes, weights):  # an unsorted grid: every point
        density += w * norm * np.exp(-(grid - t) ** 2 / (2 * variance))
    return density / probes


@dataclass(frozen=True)
class SpectralDensity:
    """An SLQ estimate of a Hessian's spectral density.

    Attributes:
        nodes: ``(probes, steps)`` Ritz values of each probe's ``T`` (ascending; NaN where a probe
            stopped early because its Krylov space was exhausted).
        weights: ``(probes, steps)`` squared first components of ``T``'s eigenvectors (each row
            sums to 1; 0 where ``nodes`` is NaN).
        grid: the evaluation points of ``density``.
        density: the Gaussian-smoothed density on ``grid`` (integrates to ~1).
        variance: the Gaussians' variance.
        probes: number of probes.
        steps: Lanczos steps per probe (requested; see ``lengths``).
        lengths: steps each probe actually took.
        hvps: products with the operator.
        seed: the probes' seed.
    """

    nodes: np.ndarray
    weights: np.ndarray
    grid: np.ndarray = field(repr=False)
    density: np.ndarray = field(repr=False)
    variance: float
    probes: int
    steps: int
    lengths: np.ndarray
    hvps: int
    seed: int

    def moment(self, k: int) -> float:
        """``mean_probes sum_j w_j theta_j^k``: an estimate of ``tr(H^k) / n`` (exact for the
        probes' quadratic forms ``v^T H^k v`` when ``k <= 2 * steps - 1``)."""
        return float(self.probe_moments(k).mean())

    def probe_moments(self, k: int) -> np.ndarray:
        """``sum_j w_j theta_j^k`` for each probe: ``v^T H^k v / ||v||^2``."""
        nodes = np.where(np.isfinite(self.nodes), self.nodes, 0.0)
        return (self.weights * nodes ** k).sum(axis=1)

    @property
    def lambda_min(self) -> float:
        """The smallest node over all probes (a Ritz value, an upper bound of ``lambda_min``)."""
        return float(np.nanmin(self.nodes))

    @property
    def lambda_max(self) -> float:
        """The largest node over all probes (a lower bound of ``lambda_max``)."""
        return float(np.nanmax(self.nodes))


def _grid(lo: float, hi: float, variance_scale: float, points: int) -> tuple[np.ndarray, float]:
    variance = variance_scale * max(1.0, hi - lo)
    pad = 5 * np.sqrt(variance)  # the Gaussians' mass beyond 5 sigma is < 1e-6
    return np.linspace(lo - pad, hi + pad, int(points)), float(variance)


def slq(op, probes: int = 10, steps: int = 90, *, seed: int = 0, probe_batch: Optional[int] = None,
        variance: float = DEFAULT_VARIANCE, grid_points: int = DEFAULT_GRID_POINTS,
        start: Optional[torch.Tensor] = None) -> SpectralDensity:
    """Stochastic Lanczos quadrature with ``probes`` Rademacher probes of ``steps`` steps each.

    The probes run side by side: each Lanczos step multiplies all their vectors in one block
    product (``op.matmat``), which shares every forward pass (``probe_batch`` limits the block
    size; default all probes). The float64 Lanczos bases take ``probe_batch * steps * n * 8``
    bytes (10 x 90 x 0.46M parameters of a ResNet-32: 3.3 GB); lower ``probe_batch`` for large
    models.

    Args:
        op: a :class:`landscape.hvp.GroupHessian` or a dense symmetric tensor.
        probes: number of probe vectors.
        steps: Lanczos steps per probe (capped at ``n``).
        seed: seeds the probes (:func:`rademacher_probes`).
        probe_batch: probes per block product.
        variance: ``sigma^2 = variance * max(1, lambda_max - lambda_min)``.
        grid_points: size of the evaluation grid.
        start: explicit ``(probes, n)`` probe vectors instead of Rademacher ones.
    """
    n = operator_size(op)
    if probes < 1 or steps < 1:
        raise ValueError("probes and steps must be >= 1")
    if grid_points < 2:
        raise ValueError("grid_points must be >= 2")
    vectors = rademacher_probes(n, probes, seed) if start is None else start.reshape(-1, n)
    probes = vectors.shape[0]
    batch = probes if probe_batch is None else max(1, int(probe_batch))
    matmat = operator_matmat(op)
    device = getattr(op, "device", None)
    op_dtype = getattr(op, "dtype", torch.float64)
    steps = int(min(steps, n))
    nodes = np.full((probes, steps), np.nan)
    weights = np.zeros((probes, steps))
    lengths = np.zeros(probes, dtype=np.int64)
    hvps = 0
    for first in range(0, probes, batch):
        run = lanczos(matmat, vectors[first:first + batch], steps, restart=False,
                      device=device, operator_dtype=op_dtype)
        hvps += run.hvps
        for i in range(run.alphas.shape[0]):
            alphas, betas = run.tridiagonal(i)
            theta, s = tridiagonal_eigh(alphas, betas)
            m = theta.size
            nodes[first + i, :m] = theta
            weights[first + i, :m] = s[0] ** 2
            lengths[first + i] = m
    grid, var = _grid(np.nanmin(nodes), np.nanmax(nodes), variance, grid_points)
    density = gaussian_density(nodes, weights, grid, var)
    return SpectralDensity(nodes=nodes, weights=weights, grid=grid, density=density,
                           variance=var, probes=probes, steps=steps, lengths=lengths, hvps=hvps,
                           seed=int(seed))


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
