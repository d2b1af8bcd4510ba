r"""Spectral densities by stochastic Lanczos quadrature (SLQ); traces in :mod:`landscape.traces`.

**SLQ** (Golub & Meurant; Ghorbani, Krishnan & Xiao 2019). For a unit probe ``v`` and ``m``
Lanczos steps with ``T_m = S diag(theta) S^T``, the Gauss quadrature with nodes ``theta_j`` and
weights ``tau_j = S_{1j}^2`` is exact for polynomials of degree ``<= 2m - 1``:

.. math::  v^T H^k v = \sum_j \tau_j \theta_j^k, \qquad k \le 2m - 1.

With probes ``v`` uniform on the sphere's Rademacher points (``E[v v^T] = I / n``), the average
over probes of ``sum_j tau_j delta(t - theta_j)`` estimates the spectral density
``phi(t) = (1/n) sum_i delta(t - lambda_i)``; its ``k``-th moment estimates ``tr(H^k) / n``.
For display each node becomes a Gaussian of variance
``sigma^2 = 1e-5 * max(1, lambda_max - lambda_min)`` evaluated on a 10,000-point grid (Ghorbani
et al.'s choice; the raw nodes and weights are kept).

>>> import torch
>>> H = torch.diag(torch.tensor([-1.0, 0.0, 0.0, 2.0], dtype=torch.float64))
>>> d = slq(H, probes=3, steps=4, seed=0)
>>> round(d.moment(1), 12), round(d.lambda_min, 9), round(d.lambda_max, 9)   # tr(H) / n
(0.25, -1.0, 2.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from landscape.lanczos import lanczos, operator_matmat, operator_size, tridiagonal_eigh
from landscape.traces import rademacher_probes

__all__ = ["SpectralDensity", "slq", "gaussian_density", "DEFAULT_VARIANCE",
           "DEFAULT_GRID_POINTS", "PROBE_BLOCK_MAX_PARAMS", "default_probe_batch"]

DEFAULT_VARIANCE = 1e-5
DEFAULT_GRID_POINTS = 10_000
# Probes are multiplied together (one block product per Lanczos step) only on a CPU and up to
# this many parameters, where bench/bench_dtype.py measured the block cheaper than single
# products (BENCHMARKS.md, "Analysis dtype and probe blocks": a block of 10 cost 0.39x ten
# single products on a 1,482-parameter MLP, 1.1-1.5x from 5,178 parameters on). Not measured on
# a GPU: there too the default is one probe at a time until a benchmark shows otherwise.
PROBE_BLOCK_MAX_PARAMS = 2_000


def default_probe_batch(n_params: int, probes: int, device=None) -> int:
    """``probe_batch`` when none is given: all ``probes`` in one block on a CPU for at most
    :data:`PROBE_BLOCK_MAX_PARAMS` parameters, else 1.

    Example:
        >>> default_probe_batch(1_482, 10), default_probe_batch(8_970, 10)
        (10, 1)
    """
    on_cpu = device is None or torch.device(device).type == "cpu"
    return int(probes) if on_cpu and int(n_params) <= PROBE_BLOCK_MAX_PARAMS else 1


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

    ``probe_batch`` probes run side by side: each Lanczos step multiplies their vectors in one
    block product (``op.matmat``), which shares every forward pass; the default
    (:func:`default_probe_batch`) batches only where that was measured to pay. The float64
    Lanczos bases take ``probe_batch * steps * n * 8`` bytes (10 x 90 x 0.46M parameters of a
    ResNet-32: 3.3 GB).

    Args:
        op: a :class:`landscape.hvp.GroupHessian` or a dense symmetric tensor.
        probes: number of probe vectors.
        steps: Lanczos steps per probe (capped at ``n``).
        seed: seeds the probes (:func:`rademacher_probes`).
        probe_batch: probes per block product (default :func:`default_probe_batch`).
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
    matmat = operator_matmat(op)
    device = getattr(op, "device", None)
    batch = (default_probe_batch(n, probes, device) if probe_batch is None
             else max(1, int(probe_batch)))
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
