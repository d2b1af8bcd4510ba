"""Lanczos extremes against dense eigendecompositions (LAPACK, float64).

Tolerances: with a residual tolerance of 1e-10 (relative to ||H||) the eigenvalues agree to 1e-6
relative (to 1e-12 observed: the error is ~ residual^2 / gap); reported residuals equal the true
``||H x - theta x||`` to 1e-9 ||H||.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import landscape
from landscape.hvp import GroupHessian
from landscape.eigen import extreme_eigenpairs
from landscape.lanczos import lanczos

from _reference import CNN_GROUP, dense_eigh, dense_group_hessian, symmetric


def _true_residuals(H: torch.Tensor, values: np.ndarray, vectors: torch.Tensor) -> np.ndarray:
    X = vectors.T.to(H.dtype)
    return (H @ X - X * torch.as_tensor(values.copy())).norm(dim=0).numpy()


def test_extremes_of_a_known_spectrum_with_residuals_and_unit_vectors():
    spectrum = np.r_[np.linspace(-3, 5, 150), [9.0, 8.5, -4.0]]
    H = symmetric(spectrum)
    exact = np.sort(spectrum)
    r = extreme_eigenpairs(H, top=4, bottom=3, tol=1e-10, seed=0)
    # Converged before the basis is complete (a block of 4 vectors: 152 of 153 measured).
    assert r.converged and r.reason == "" and r.steps < len(spectrum) and r.block_size == 4
    assert r.hvps == r.steps + 7  # one product per reported vector, for its true residual
    np.testing.assert_allclose(r.top, exact[::-1][:4], rtol=1e-10)
    np.testing.assert_allclose(r.bottom, exact[:3], rtol=1e-10)
    assert r.ratio == pytest.approx(-4.0 / 9.0, rel=1e-12)
    for values, vectors, reported in ((r.top, r.top_vectors, r.top_residuals),
                                      (r.bottom, r.bottom_vectors, r.bottom_residuals)):
        np.testing.assert_allclose(_true_residuals(H, values, vectors), reported,
                                   atol=1e-9 * 9, rtol=0)
        gram = vectors @ vectors.T
        assert torch.allclose(gram, torch.eye(len(values), dtype=gram.dtype), atol=1e-10)
    assert (r.top_residuals <= r.tolerance).all() and r.tolerance == pytest.approx(9e-10)


def test_repeated_eigenvalues_are_found_through_restarts():
    # Few distinct eigenvalues: the block's space is exhausted early and restarts.
    H = symmetric([5, 5, 3, 1, 0, -2, -2], seed=1)
    r = extreme_eigenpairs(H, top=2, bottom=2, tol=1e-12, seed=0)
    np.testing.assert_allclose(r.top, [5, 5], atol=1e-10)
    np.testing.assert_allclose(r.bottom, [-2, -2], atol=1e-10)
    assert r.converged


def test_all_eigenvalues_with_as_many_steps_as_parameters():
    spectrum = np.random.default_rng(2).standard_normal(30)
    r = extreme_eigenpairs(symmetric(spectrum, seed=2), top=30, bottom=0, max_steps=30)
    np.testing.assert_allclose(r.top, np.sort(spectrum)[::-1], atol=1e-12)
    assert r.steps == 30 and r.hvps == 30 + 30 and r.converged
    # The basis is complete, so Lanczos's estimate of every residual is exactly 0; the reported
    # residuals are computed (float64 rounding: positive, and tiny).
    assert (r.top_residuals > 0).all() and r.top_residuals.max() < 1e-12


def test_not_converged_is_reported():
    H = symmetric(np.r_[np.linspace(0, 1, 200), [1.01]], seed=3)
    r = extreme_eigenpairs(H, top=2, bottom=1, tol=1e-12, max_steps=6, seed=0)
    assert r.steps == 6 and r.hvps == 6 + 3
    assert not r.converged and r.reason.startswith("max_steps reached")
    assert (r.top_residuals > r.tolerance).any()


def test_same_seed_same_result_bitwise():
    H = symmetric(np.linspace(-1, 2, 80), seed=4)
    a = extreme_eigenpairs(H, top=3, bottom=2, tol=1e-9, seed=7)
    b = extreme_eigenpairs(H, top=3, bottom=2, tol=1e-9, seed=7)
    assert np.array_equal(a.top, b.top) and np.array_equal(a.bottom, b.bottom)
    assert torch.equal(a.top_vectors, b.top_vectors)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.top = b.top


def test_k_larger_than_n_is_refused():
    H = symmetric(np.arange(5.0))
    with pytest.raises(ValueError, match="larger than the parameter count"):
        extreme_eigenpairs(H, top=6)
    with pytest.raises(ValueError, match=">= 0"):
        extreme_eigenpairs(H, bottom=-1)


def test_batched_runs_equal_single_runs():
    H = symmetric(np.linspace(-2, 3, 60), seed=5)
    start = torch.randn(3, 60, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    together = lanczos(lambda V: H @ V, start, 20, restart=False)
    for i in range(3):
        alone = lanczos(lambda V: H @ V, start[i:i + 1], 20, restart=False)
        np.testing.assert_allclose(together.alphas[i], alone.alphas[0], atol=1e-12)
        np.testing.assert_allclose(together.betas[i], alone.betas[0], atol=1e-12)
    assert together.hvps == 60


@pytest.fixture(scope="module")
def cases(tiny_mlp_path, tiny_cnn_path):
    mlp = landscape.load(tiny_mlp_path, device="cpu")
    cnn = landscape.load(tiny_cnn_path, device="cpu")
    return {"mlp-head": (mlp, "head", dense_group_hessian(mlp, "head")),
            "cnn-bn": (cnn, CNN_GROUP, dense_group_hessian(cnn, CNN_GROUP))}


@pytest.mark.parametrize("case", ["mlp-head", "cnn-bn"])
def test_group_hessian_extremes_match_the_dense_hessian(case, cases):
    run, group, H = cases[case]
    exact = dense_eigh(H)
    op = GroupHessian.from_run(run, group)
    r = extreme_eigenpairs(op, top=5, bottom=3, tol=1e-10, max_steps=400, seed=0)
    assert r.converged
    assert exact[0] < 0 < exact[-1]  # a saddle: the test's lambda_min is a real negative one
    np.testing.assert_allclose(r.top, exact[::-1][:5], rtol=1e-6)
    np.testing.assert_allclose(r.bottom, exact[:3], rtol=1e-6)
    assert r.ratio == pytest.approx(exact[0] / exact[-1], rel=1e-6)
    norm = abs(exact).max()
    assert _true_residuals(H, r.top, r.top_vectors).max() < 1e-8 * norm
    assert _true_residuals(H, r.bottom, r.bottom_vectors).max() < 1e-8 * norm
    assert r.hvps == op.hvps == r.steps + 8


def _check_pairs(H: torch.Tensor, r) -> None:
    """Reported residuals are the true ones and the vectors are orthonormal."""
    norm = float(torch.linalg.matrix_norm(H, 2))
    for values, vectors, reported in ((r.top, r.top_vectors, r.top_residuals),
                                      (r.bottom, r.bottom_vectors, r.bottom_residuals)):
        np.testing.assert_allclose(_true_residuals(H, values, vectors), reported,
                                   atol=1e-13 * norm, rtol=0)
        gram = vectors @ vectors.T
        assert torch.allclose(gram, torch.eye(len(values), dtype=gram.dtype), atol=1e-10)


def test_a_repeated_top_eigenvalue_comes_with_every_copy():
    # Distinct eigenvalues close below, so no space is exhausted: single-vector Lanczos
    # (before the block) reported [5, 5, 4.5], converged, at the default tolerance.
    spectrum = np.r_[[5.0, 5.0, 5.0], np.linspace(0, 4.5, 100)]
    H = symmetric(spectrum, seed=6)
    r = extreme_eigenpairs(H, top=3, bottom=2, seed=0)
    np.testing.assert_allclose(r.top, [5, 5, 5], rtol=0, atol=1e-5)
    np.testing.assert_allclose(r.bottom, [0, 4.5 / 99], rtol=0, atol=1e-5)
    assert r.converged and r.steps < len(spectrum)
    _check_pairs(H, r)


@pytest.fixture(scope="module")
def dead_units(tmp_path_factory):
    """The hostile user's case D8: a width-1 MLP (87 parameters) whose Hessian has 78 exact
    zeros (weights of units no sample activates, and the biases behind them)."""
    from _reference import cached_run

    run = landscape.load(cached_run(tmp_path_factory, "mlp-width1", model="mlp", width=1,
                                    epochs=4), device="cpu")
    return run, dense_group_hessian(run, "all")


def test_zero_eigenvalues_of_dead_relu_units_come_with_their_multiplicity(dead_units):
    run, H = dead_units
    exact = dense_eigh(H)
    norm = abs(exact).max()
    assert H.shape == (87, 87) and (abs(exact) < 1e-12 * norm).sum() >= 3  # the case holds
    op = GroupHessian.from_run(run, "all")
    r = extreme_eigenpairs(op, top=1, bottom=3, seed=0)
    np.testing.assert_allclose(r.bottom, exact[:3], rtol=0, atol=1e-9 * norm)  # [0, 0, 0]
    np.testing.assert_allclose(r.top, exact[-1:], rtol=1e-9)
    assert r.converged and r.reason == ""
    _check_pairs(H, r)
    assert r.hvps == op.hvps == r.steps + 4


def test_a_start_vector_in_an_invariant_subspace_is_not_trusted():
    # The given start is an eigenvector: its Krylov space is exhausted at once and holds
    # neither end; a random restart finds both.
    H = torch.diag(torch.tensor([-3.0, 0.0, 1.0, 2.0, 7.0], dtype=torch.float64))
    start = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    r = extreme_eigenpairs(H, top=1, bottom=1, tol=1e-12, start=start, seed=0)
    np.testing.assert_allclose([r.lambda_max, r.lambda_min], [7.0, -3.0], atol=1e-12)
    assert r.converged


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_step_floor_keeps_a_bulk_ritz_value_from_passing_for_lambda_min(seed):
    """A dense cluster near 0 (3,000 eigenvalues of N(0, 0.01)), a weak negative tail
    (-0.6, -0.5) and a large top (100, 60): relative to ||H||, a Ritz value in the cluster meets
    tol = 1e-3 within a few steps. Without the floor the run stops there, "converged", at
    lambda_min ~ 0; with the default floor it finds -0.6 to the tolerance."""
    rng = np.random.default_rng(seed)
    values = rng.normal(0.0, 0.01, 3000)
    values[:2], values[2:30], values[-2:] = (-0.6, -0.5), rng.uniform(-0.3, 0.9, 28), (60, 100)
    H = torch.diag(torch.as_tensor(np.sort(values)))
    early = extreme_eigenpairs(H, tol=1e-3, max_steps=100, min_steps=0, seed=seed)
    assert early.steps < 10 and early.converged and early.bottom[0] > -0.05  # the failure
    guarded = extreme_eigenpairs(H, tol=1e-3, max_steps=100, seed=seed)
    assert guarded.steps >= 20 and guarded.converged
    assert abs(guarded.bottom[0] + 0.6) <= guarded.bottom_residuals[0] + 1e-12
    assert abs(guarded.top[0] - 100.0) <= guarded.top_residuals[0] + 1e-12
