"""Directions for loss surfaces: filter normalisation, seeding, eigenvectors, interpolation and
the PCA of a trajectory, each checked against an independent computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import landscape
from landscape.directions import (eigen_directions, flat_parameters, interpolation_direction,
                                  random_directions, trajectory_pca)
from landscape.errors import AnalysisError
from train import checkpoint as ckpt
from _runs import train_digits


def _train(folder, **changes) -> str:
    return train_digits(folder, **changes)


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("mlp"))


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("cnn"), model="cnn", width=4, epochs=2)


def _param_views(model, vector):
    """Splits a flat vector into tensors shaped like the trainable parameters (by hand)."""
    out, offset = [], 0
    for p in model.parameters():
        out.append(vector[offset:offset + p.numel()].reshape(p.shape))
        offset += p.numel()
    assert offset == vector.numel()
    return out


@pytest.mark.parametrize("fixture", ["mlp_run", "cnn_run"])
def test_filter_normalisation_matches_weight_norms_slice_by_slice(fixture, request):
    run = landscape.load(request.getfixturevalue(fixture), device="cpu")
    for one_d in ("zero", "weights"):
        (d,) = random_directions(run.model, 1, seed=3, one_d=one_d)
        for p, part in zip(run.model.parameters(), _param_views(run.model, d.vector)):
            w = p.detach()
            if w.dim() <= 1:
                expected = torch.zeros_like(w) if one_d == "zero" else w
                assert torch.equal(part, expected)
                continue
            for k in range(w.shape[0]):  # one filter / one row at a time
                assert float(part[k].norm()) == pytest.approx(float(w[k].norm()), rel=1e-5)


def test_layer_and_no_normalisation():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    (raw,) = random_directions(model, 1, seed=1, normalization="none")
    (layer,) = random_directions(model, 1, seed=1, normalization="layer")
    generator = torch.Generator().manual_seed(1)  # the documented draw order, redone by hand
    draws = [torch.randn(p.shape, generator=generator) for p in model.parameters()]
    for p, draw, r, scaled in zip(model.parameters(), draws, _param_views(model, raw.vector),
                             _param_views(model, layer.vector)):
        if p.dim() <= 1:
            assert not r.any() and not scaled.any()
        else:
            assert torch.equal(r, draw)
            assert float(scaled.norm()) == pytest.approx(float(p.detach().norm()), rel=1e-5)


def test_random_directions_are_seeded_and_free_of_global_state(mlp_run):
    run = landscape.load(mlp_run, device="cpu")
    torch.manual_seed(123)
    a = random_directions(run.model, 2, seed=7)
    torch.manual_seed(999)
    b = random_directions(run.model, 2, seed=7)
    c = random_directions(run.model, 2, seed=8)
    (first,) = random_directions(run.model, 1, seed=7)
    assert all(torch.equal(x.vector, y.vector) for x, y in zip(a, b))
    assert not torch.equal(a[0].vector, c[0].vector)
    assert not torch.equal(a[0].vector, a[1].vector)
    assert torch.equal(first.vector, a[0].vector)
    assert a[0].digest() == b[0].digest() != c[0].digest()
    assert a[0].recipe == {"seed": 7, "index": 0, "normalization": "filter", "one_d": "zero"}
    json.dumps(a[1].recipe)


def test_directions_cover_parameters_only_not_batchnorm_statistics(cnn_run):
    run = landscape.load(cnn_run, device="cpu")
    (d,) = random_directions(run.model, 1, seed=0)
    n_params = sum(p.numel() for p in run.model.parameters())
    n_buffers = sum(b.numel() for b in run.model.buffers())
    assert n_buffers > 0 and d.vector.numel() == n_params


def test_bad_options_are_analysis_errors(mlp_run):
    run = landscape.load(mlp_run, device="cpu")
    with pytest.raises(AnalysisError):
        random_directions(run.model, 1, normalization="bogus")
    with pytest.raises(AnalysisError):
        random_directions(run.model, 1, one_d="bogus")
    with pytest.raises(AnalysisError):
        random_directions(run.model, 0)


def test_interpolation_direction_reaches_the_end_checkpoint(mlp_run):
    start = landscape.load(ckpt.checkpoint_path(mlp_run, 1), device="cpu")
    end = landscape.load(ckpt.checkpoint_path(mlp_run, 4), device="cpu")
    d = interpolation_direction(start, end)
    w_start = flat_parameters(start.model, torch.float64)
    w_end = flat_parameters(end.model, torch.float64)
    assert torch.allclose(w_start + d.vector.double(), w_end, atol=1e-6)
    assert d.recipe["start"]["epoch"] == 1 and d.recipe["end"]["epoch"] == 4
    other = torch.nn.Linear(3, 2)
    with pytest.raises(AnalysisError):
        interpolation_direction(start, other)


def test_pca_of_a_planar_trajectory_recovers_the_plane(mlp_run, tmp_path):
    """Checkpoints w_t = w + t a + t^2 b lie in the plane spanned by a and b: the two PCA
    directions must span it (residual of every checkpoint ~ 0), be orthonormal, and their
    explained variances must match numpy's eigen-decomposition of the Gram matrix."""
    source = landscape.load(mlp_run, device="cpu")
    folder = tmp_path / "planar"
    folder.mkdir()
    ckpt.atomic_write_json(folder / "config.json", ckpt.read_config(mlp_run))
    state = ckpt.load_checkpoint(ckpt.checkpoint_path(mlp_run, 4))
    state = {k: v for k, v in state.items() if k not in ("epoch", "format")}
    names = [n for n, _ in source.model.named_parameters()]
    generator = torch.Generator().manual_seed(0)
    a = {n: torch.randn(state["model"][n].shape, generator=generator) for n in names}
    b = {n: torch.randn(state["model"][n].shape, generator=generator) for n in names}
    times = [0.0, 0.5, 1.0, 2.0, 3.0]
    for epoch, t in enumerate(times):
        weights = dict(state["model"])
        for n in names:
            weights[n] = state["model"][n] + t * a[n] + t * t * b[n]
        ckpt.save_checkpoint(folder, epoch, {**state, "model": weights})
    run = landscape.load(folder, device="cpu")
    pca = trajectory_pca(run)
    assert pca.epochs == (0, 1, 2, 3, 4) and pca.origin_epoch == 4
    basis = torch.stack([d.vector.double() for d in pca.directions])
    assert torch.allclose(basis @ basis.T, torch.eye(2, dtype=torch.float64), atol=1e-5)
    origin = flat_parameters(run.model, torch.float64)
    points = []
    for epoch, path in ckpt.list_checkpoints(folder):
        w = torch.cat([ckpt.load_checkpoint(path)["model"][n].reshape(-1).double() for n in names])
        offset = w - origin
        residual = offset - basis.T @ (basis @ offset)
        assert float(residual.norm()) <= 1e-4 * max(1.0, float(offset.norm()))
        assert np.allclose(pca.coordinates[epoch], (basis @ offset).numpy(), atol=1e-4)
        points.append(w.numpy())
    # Independent route to the variances: eigenvalues of the centred Gram matrix.
    centred = np.array(points) - np.mean(points, axis=0)
    eig = np.sort(np.linalg.eigvalsh(centred @ centred.T))[::-1]
    assert np.allclose(pca.explained_variance_ratio, eig[:2] / eig.sum(), rtol=1e-5)
    assert sum(pca.explained_variance_ratio) == pytest.approx(1.0, abs=1e-6)
    assert (pca.coordinates[0] <= 0).all()  # sign convention: training runs towards +


def test_pca_needs_enough_checkpoints(tmp_path):
    folder = _train(tmp_path / "short", epochs=1, save_every=1)
    with pytest.raises(AnalysisError, match="at least 3 checkpoints"):
        trajectory_pca(landscape.load(folder, device="cpu"))


def test_eigen_directions_are_unit_eigenvectors_of_the_dense_group_hessian(mlp_run):
    """Checked against the dense float64 Hessian of the tail's mean loss (tests/_reference.py,
    torch.func, no landscape code) and its LAPACK eigenvalues. (A finite-difference check along
    v is not used: ReLU kinks crossed by the step add O(1) terms to a second difference.)"""
    from _reference import dense_hessian

    run = landscape.load(mlp_run, device="cpu")
    top, bottom = eigen_directions(run, "tail", seed=0)
    assert top.recipe["end"] == "top" and bottom.recipe["end"] == "bottom"
    x, y = run.group_data("tail")
    hessian = dense_hessian(run.model, run.loss_fn(), x, y)
    eigenvalues = np.linalg.eigvalsh(hessian.numpy())
    scale = float(np.abs(eigenvalues).max())
    for d, expected in ((top, eigenvalues[-1]), (bottom, eigenvalues[0])):
        v = d.vector.double()
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-6)
        assert float(v[v.abs().argmax()]) > 0  # the sign convention
        assert d.recipe["eigenvalue"] == pytest.approx(expected, abs=1e-6 * scale)
        rayleigh = float(v @ hessian @ v)
        assert rayleigh == pytest.approx(expected, abs=1e-5 * scale)
        assert float((hessian @ v - rayleigh * v).norm()) <= 1e-4 * scale  # float32 storage
    with pytest.raises(AnalysisError):
        eigen_directions(run, "tail", top=10**6)
