"""Cross-check against PyHessian 0.1 on the same model and data.

PyHessian works in float32 (its probes are float32), puts the model in eval mode, takes a
mean-reduced criterion and uses torch's global random generator (seeded here inside
``fork_rng``, so the global state is left as it was). Its ``density`` calls ``torch.eig``, which
current torch lacks: it is patched, inside this test only, with a ``torch.linalg.eig`` shim.

Tolerances: float32 power iteration / Lanczos agree with the float64 results to 1e-4 relative.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import landscape
from landscape.hvp import GroupHessian
from landscape.eigen import extreme_eigenpairs
from landscape.slq import slq

from _reference import CNN_GROUP, dense_eigh, dense_group_hessian

pyhessian = pytest.importorskip("pyhessian")
# PyHessian builds its gradient with backward(create_graph=True); torch warns about the cycle.
pytestmark = pytest.mark.filterwarnings("ignore:Using backward.. with create_graph=True")


@pytest.fixture(scope="module")
def runs(tiny_mlp_path, tiny_cnn_path):
    mlp = landscape.load(tiny_mlp_path, device="cpu")
    cnn = landscape.load(tiny_cnn_path, device="cpu")
    return {"mlp": (mlp, "tail"), "cnn": (cnn, CNN_GROUP)}


def _pyhessian(run, group):
    """PyHessian's hessian object on a private copy of the model (it stores graph-carrying
    gradients on the parameters)."""
    loss_fn = run.loss_fn()
    inputs, targets = run.group_data(group)
    criterion = lambda logits, y: loss_fn(logits, y).mean()  # noqa: E731 (mean-reduced)
    return pyhessian.hessian(copy.deepcopy(run.model), criterion, data=(inputs, targets),
                             cuda=False)


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_top_eigenvalue_agrees_with_pyhessian(case, runs):
    run, group = runs[case]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        theirs, _ = _pyhessian(run, group).eigenvalues(maxIter=2000, tol=1e-7, top_n=1)
    ours = extreme_eigenpairs(GroupHessian.from_run(run, group), top=1, bottom=0, tol=1e-10)
    exact = dense_eigh(dense_group_hessian(run, group))[-1]
    assert ours.top[0] == pytest.approx(exact, rel=1e-10)
    assert theirs[0] == pytest.approx(ours.top[0], rel=1e-4)


def test_trace_agrees_with_pyhessian_within_standard_errors(runs):
    run, group = runs["mlp"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # PyHessian stops when |mean - previous| / (previous + 1e-6) < tol, which a negative
        # running mean satisfies at once for any tol >= 0: -inf disables the test.
        samples = np.asarray(_pyhessian(run, group).trace(maxIter=60, tol=-np.inf))
    exact = float(torch.trace(dense_group_hessian(run, group)))
    theirs, theirs_stderr = samples.mean(), samples.std(ddof=1) / np.sqrt(samples.size)
    assert samples.size == 60
    assert abs(theirs - exact) < 4 * theirs_stderr
    from landscape.traces import hutchpp_trace

    ours = hutchpp_trace(GroupHessian.from_run(run, group), 60, seed=0)
    assert abs(ours.value - theirs) < 4 * np.hypot(ours.stderr, theirs_stderr)


def _eig_shim(matrix, eigenvectors=False):
    """``torch.eig`` of torch < 1.9 (``(n, 2)`` real and imaginary parts, real vectors), from
    ``torch.linalg.eig``."""
    values, vectors = torch.linalg.eig(matrix)
    pairs = torch.stack([values.real, values.imag], dim=1)
    return pairs, (vectors.real if eigenvectors else torch.empty(0))


def test_density_nodes_and_weights_agree_with_pyhessian(runs, monkeypatch):
    run, group = runs["mlp"]
    monkeypatch.setattr(torch, "eig", _eig_shim, raising=False)
    steps = 15
    model = copy.deepcopy(run.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        nodes, weights = _pyhessian(run, group).density(iter=steps, n_v=1)
        torch.manual_seed(3)  # PyHessian's probe: the first numbers drawn in density()
        probe = torch.cat([torch.randint_like(p, high=2).reshape(-1) for p in model.parameters()])
    probe = (2 * probe - 1).double()
    order = np.argsort(nodes[0])
    theirs_nodes = np.asarray(nodes[0])[order]
    theirs_weights = np.asarray(weights[0])[order]
    ours = slq(GroupHessian.from_run(run, group), probes=1, steps=steps, start=probe[None])
    scale = np.abs(ours.nodes).max()
    np.testing.assert_allclose(theirs_nodes, ours.nodes[0], rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(theirs_weights, ours.weights[0], rtol=0, atol=1e-4)
    # Both quadratures reproduce the probe's exact quadratic forms v^T H^k v / ||v||^2.
    H = dense_group_hessian(run, group)
    v = probe / probe.norm()
    for k in (1, 2, 3):
        exact = float(v @ torch.linalg.matrix_power(H, k) @ v)
        assert ours.probe_moments(k)[0] == pytest.approx(exact, rel=1e-9)
        assert float((theirs_weights * theirs_nodes ** k).sum()) == pytest.approx(exact, rel=1e-4)
