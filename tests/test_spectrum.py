"""SLQ densities and stochastic traces against dense float64 Hessians.

Exact where the maths is exact: Gauss quadrature with ``m`` steps reproduces each probe's
``v^T H^k v`` for ``k <= 2m - 1`` (checked to 1e-6 relative); Hutch++ with a sketch as large as
the matrix gives the trace to 1e-10. Stochastic estimates must lie within 4 of their own standard
errors of the exact value (a fixed seed makes each check deterministic; 4 standard errors leave
a 6e-5 chance per check of a false alarm for a new seed).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import landscape
from landscape.hvp import GroupHessian
from landscape.slq import gaussian_density, slq
from landscape.traces import hutchinson_trace, hutchpp_trace, rademacher_probes

from _reference import dense_group_hessian, symmetric


def _quadratic_forms(H: torch.Tensor, probes: torch.Tensor, k: int) -> np.ndarray:
    """``v^T H^k v / ||v||^2`` for each row ``v`` of ``probes``."""
    V = (probes / probes.norm(dim=1, keepdim=True)).T
    W = V.clone()
    for _ in range(k):
        W = H @ W
    return (V * W).sum(dim=0).numpy()


@pytest.fixture(scope="module")
def tail(tiny_mlp_path):
    run = landscape.load(tiny_mlp_path, device="cpu")
    return run, dense_group_hessian(run, "tail")


def test_slq_moments_are_the_probes_quadratic_forms(tail):
    run, H = tail
    op = GroupHessian.from_run(run, "tail")
    steps = 12
    d = slq(op, probes=3, steps=steps, seed=5)
    probes = rademacher_probes(op.n_params, 3, seed=5)
    for k in (0, 1, 2, 3, 7, 2 * steps - 1):
        exact = _quadratic_forms(H, probes, k)
        np.testing.assert_allclose(d.probe_moments(k), exact, rtol=1e-6, atol=0)
    assert d.hvps == op.hvps == 3 * steps
    np.testing.assert_allclose(d.weights.sum(axis=1), 1.0, atol=1e-12)


def test_slq_with_a_full_krylov_space_returns_the_spectrum_and_projections():
    spectrum = np.linspace(-1.0, 4.0, 40)
    H = symmetric(spectrum, seed=1)
    d = slq(H, probes=2, steps=60, seed=0)
    assert d.steps == 40 and list(d.lengths) == [40, 40]
    eigenvalues, U = torch.linalg.eigh(H)
    probes = rademacher_probes(40, 2, seed=0)
    probes = probes / probes.norm(dim=1, keepdim=True)
    for i in range(2):
        np.testing.assert_allclose(d.nodes[i], spectrum, atol=1e-10)
        np.testing.assert_allclose(d.weights[i], ((U.T @ probes[i]) ** 2).numpy(), atol=1e-10)


def test_slq_probes_batched_equal_probes_one_by_one(tail):
    run, _ = tail
    op = GroupHessian.from_run(run, "tail")
    together = slq(op, probes=4, steps=10, seed=2)
    alone = slq(op, probes=4, steps=10, seed=2, probe_batch=1)
    np.testing.assert_allclose(together.nodes, alone.nodes, rtol=0, atol=1e-9)
    np.testing.assert_allclose(together.weights, alone.weights, rtol=0, atol=1e-9)
    again = slq(op, probes=4, steps=10, seed=2)
    assert np.array_equal(again.nodes, together.nodes)  # reproducible run to run
    assert np.array_equal(again.density, together.density)


def test_density_is_smoothed_as_in_ghorbani_et_al(tail):
    run, H = tail
    op = GroupHessian.from_run(run, "tail")
    d = slq(op, probes=2, steps=15, seed=0)
    spread = d.lambda_max - d.lambda_min
    assert d.variance == pytest.approx(1e-5 * max(1.0, spread))
    assert d.grid.size == 10_000
    assert d.grid[0] < d.lambda_min and d.grid[-1] > d.lambda_max
    assert np.trapezoid(d.density, d.grid) == pytest.approx(1.0, abs=1e-3)
    # Every Gaussian at every grid point, by brute force (the module evaluates windows only).
    t = d.nodes[np.isfinite(d.nodes)][:, None]
    w = d.weights[np.isfinite(d.nodes)][:, None]
    brute = (w * np.exp(-(d.grid[None] - t) ** 2 / (2 * d.variance))).sum(axis=0) \
        / np.sqrt(2 * np.pi * d.variance) / d.probes
    np.testing.assert_allclose(d.density, brute, rtol=1e-12, atol=1e-300)
    exact = np.linalg.eigvalsh(H.numpy())
    assert exact[0] <= d.lambda_min and d.lambda_max <= exact[-1] * (1 + 1e-12)


def test_gaussian_density_of_one_node_is_the_normal_pdf():
    grid = np.linspace(-1, 3, 101)
    density = gaussian_density(np.array([[1.0, np.nan]]), np.array([[1.0, 0.0]]), grid, 0.25)
    np.testing.assert_allclose(density, np.exp(-(grid - 1) ** 2 / 0.5) / np.sqrt(0.5 * np.pi),
                               rtol=1e-12)


def test_slq_trace_estimate_is_within_its_standard_error(tail):
    run, H = tail
    n = H.shape[0]
    d = slq(GroupHessian.from_run(run, "tail"), probes=10, steps=4, seed=3)
    samples = n * d.probe_moments(1)
    stderr = samples.std(ddof=1) / np.sqrt(samples.size)
    assert abs(samples.mean() - float(torch.trace(H))) < 4 * stderr


def test_hutchinson_samples_are_exact_quadratic_forms_and_the_mean_is_within_4_stderr(tail):
    run, H = tail
    op = GroupHessian.from_run(run, "tail")
    t = hutchinson_trace(op, 40, seed=0)
    Z = rademacher_probes(op.n_params, 40, seed=0)
    np.testing.assert_allclose(t.samples, ((Z @ H) * Z).sum(dim=1).numpy(), rtol=1e-10)
    assert t.hvps == op.hvps == 40 and t.method == "hutchinson"
    assert abs(t.value - float(torch.trace(H))) < 4 * t.stderr


def test_hutchpp_is_exact_with_a_full_sketch_and_beats_hutchinson_on_a_decaying_spectrum():
    H = symmetric(np.r_[np.linspace(-0.5, 0.5, 17), [10.0, 6.0, -3.0]], seed=4)
    full = hutchpp_trace(H, 60, seed=0)  # sketch of 20 = n vectors: the trace is exact
    assert full.value == pytest.approx(float(torch.trace(H)), abs=1e-10)
    assert full.stderr == 0.0
    spectrum = np.r_[10.0 * 0.5 ** np.arange(12), 0.01 * np.ones(288)]
    H = symmetric(spectrum, seed=5)
    exact = float(torch.trace(H))
    plus = hutchpp_trace(H, 60, seed=1)
    plain = hutchinson_trace(H, 60, seed=1)
    assert plus.hvps == plain.hvps == 60
    assert abs(plus.value - exact) < 4 * plus.stderr
    assert abs(plain.value - exact) < 4 * plain.stderr
    assert plus.stderr < plain.stderr / 5  # the sketch removes the large eigenvalues' variance


def test_hutchpp_on_the_group_hessian_is_within_4_stderr(tail):
    run, H = tail
    op = GroupHessian.from_run(run, "tail")
    t = hutchpp_trace(op, 30, seed=2)
    assert t.hvps == op.hvps == 30 and t.method == "hutch++"
    assert abs(t.value - float(torch.trace(H))) < 4 * t.stderr


def test_bad_arguments():
    H = symmetric(np.arange(4.0))
    with pytest.raises(ValueError):
        slq(H, probes=0)
    with pytest.raises(ValueError):
        hutchinson_trace(H, 0)
    with pytest.raises(ValueError):
        hutchpp_trace(H, 2)
