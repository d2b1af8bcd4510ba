"""The group Hessian operator against a dense float64 Hessian built by torch.func.

Tolerances: float64 products agree with the dense Hessian to 1e-10 relative (both are exact up to
rounding, ~1e-15 observed); float32 products to 1e-4 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

import landscape
from landscape.hvp import GroupHessian
from landscape.load import GroupError

from _reference import CNN_GROUP, dense_group_hessian


@pytest.fixture(scope="module")
def mlp(tiny_mlp_path):
    return landscape.load(tiny_mlp_path, device="cpu")


@pytest.fixture(scope="module")
def cnn(tiny_cnn_path):
    """A BatchNorm CNN trained with the VS loss (so the run's own loss is not CE)."""
    return landscape.load(tiny_cnn_path, device="cpu")


@pytest.fixture(scope="module")
def dense(mlp, cnn):
    return {"mlp-tail": dense_group_hessian(mlp, "tail"),
            "cnn": dense_group_hessian(cnn, CNN_GROUP)}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _vectors(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("case", ["mlp-tail", "cnn"])
@pytest.mark.parametrize("method", ["double-backward", "forward-over-reverse"])
def test_products_match_the_dense_hessian(case, method, mlp, cnn, dense):
    run, group = (mlp, "tail") if case == "mlp-tail" else (cnn, CNN_GROUP)
    op = GroupHessian.from_run(run, group, method=method)
    H = dense[case]
    assert op.n_params == H.shape[0]
    V = _vectors(op.n_params, 3, seed=1)
    assert _relative(op.matvec(V[:, 0]), H @ V[:, 0]) < 1e-10
    assert _relative(op.matmat(V), H @ V) < 1e-10
    assert op.hvps == 4


@pytest.mark.parametrize("case", ["mlp-tail", "cnn"])
def test_results_do_not_depend_on_the_batch_size(case, mlp, cnn, dense):
    run, group = (mlp, "tail") if case == "mlp-tail" else (cnn, CNN_GROUP)
    v = _vectors(dense[case].shape[0], 1, seed=2)[:, 0]
    ops = [GroupHessian.from_run(run, group, batch_size=b) for b in (1, 7, None)]
    products = [op.matvec(v) for op in ops]
    losses = [op.loss() for op in ops]
    assert [op.batch_size for op in ops][:2] == [1, 7]
    for product in products[1:]:
        assert _relative(product, products[0]) < 1e-12
    assert _relative(products[0], dense[case] @ v) < 1e-10
    assert np.ptp(losses) < 1e-12 * abs(losses[0])


def test_the_cached_gradient_graph_gives_the_same_products(cnn, dense):
    cached = GroupHessian.from_run(cnn, CNN_GROUP)
    fresh = GroupHessian.from_run(cnn, CNN_GROUP, cache_graph=False)
    split = GroupHessian.from_run(cnn, CNN_GROUP, batch_size=10)  # several batches: no cache
    V = _vectors(cached.n_params, 4, seed=8)
    for _ in range(2):  # the second round runs on the kept graph
        for k in (1, 4):
            assert torch.equal(cached.matmat(V[:, :k]), fresh.matmat(V[:, :k]))
            assert _relative(split.matmat(V[:, :k]), dense["cnn"] @ V[:, :k]) < 1e-10
    assert cached._graph is not None and fresh._graph is None and split._graph is None


def test_a_group_given_as_class_ids_is_the_same_operator(mlp):
    tail = GroupHessian.from_run(mlp, "tail")
    as_list = GroupHessian.from_run(mlp, mlp.groups["tail"])
    as_text = GroupHessian.from_run(mlp, ",".join(map(str, mlp.groups["tail"])))
    v = _vectors(tail.n_params, 1, seed=3)[:, 0]
    assert tail.classes == as_list.classes == as_text.classes == [4, 5, 6, 7, 8, 9]
    assert tail.n_samples == as_list.n_samples == sum(mlp.config.counts[4:])
    assert torch.equal(tail.matvec(v), as_list.matvec(v))
    assert torch.equal(tail.matvec(v), as_text.matvec(v))


def test_the_group_loss_is_the_mean_over_its_samples_with_the_runs_loss(cnn):
    op = GroupHessian.from_run(cnn, CNN_GROUP)
    x, y = cnn.group_data(CNN_GROUP)
    with torch.no_grad():
        logits = cnn.model(x)
    assert op.loss_name == "VS"  # the run trained with VS: that is the default
    vs = cnn.loss_fn("VS")(logits, y).double().mean().item()
    ce = torch.nn.functional.cross_entropy(logits, y).double().item()
    assert op.loss() == pytest.approx(vs, rel=1e-5)
    overridden = GroupHessian.from_run(cnn, CNN_GROUP, loss="CE")
    assert overridden.loss_name == "CE"
    assert overridden.loss() == pytest.approx(ce, rel=1e-5)
    assert abs(vs - ce) > 1e-3  # the two losses differ, so the test can tell them apart


def test_batchnorm_uses_running_statistics_and_the_callers_model_is_untouched(cnn, dense):
    model = cnn.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = cnn.group_data(CNN_GROUP)
    model.train()  # even a model left in train mode is analysed in eval mode
    try:
        op = GroupHessian(model, cnn.loss_fn(), x, y)
        v = _vectors(op.n_params, 1, seed=4)[:, 0]
        assert _relative(op.matvec(v), dense["cnn"] @ v) < 1e-10
        assert model.training  # the caller's flag is left as it was
    finally:
        model.eval()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats not updated
    assert next(model.parameters()).dtype == torch.float32


def test_float32_products_are_close_to_float64(mlp, dense):
    op = GroupHessian.from_run(mlp, "tail", dtype=torch.float32)
    v = _vectors(op.n_params, 1, seed=5)[:, 0]
    out = op.matvec(v)
    assert out.dtype == torch.float32
    assert _relative(out.double(), dense["mlp-tail"] @ v) < 1e-4


def test_linear_operator_and_hvp_counter(mlp, dense):
    calls = []
    op = GroupHessian.from_run(mlp, "tail", progress=calls.append)
    A = op.as_linear_operator()
    v = np.random.default_rng(6).standard_normal(op.n_params)
    assert np.allclose(A @ v, dense["mlp-tail"].numpy() @ v, rtol=0, atol=1e-10 * np.abs(v).sum())
    top = scipy.sparse.linalg.eigsh(A, k=1, which="LA", tol=1e-12,
                                    v0=np.ones(op.n_params))[0][0]
    exact = np.linalg.eigvalsh(dense["mlp-tail"].numpy())[-1]
    assert top == pytest.approx(exact, rel=1e-8)
    assert op.hvps == sum(calls) and op.hvps > 1


def test_gradient_matches_finite_differences_of_the_loss(mlp):
    op = GroupHessian.from_run(mlp, "tail")
    g = op.gradient()
    d = _vectors(op.n_params, 1, seed=7)[:, 0]
    d /= d.norm()
    h = 1e-5
    w = op.parameter_vector()

    def loss_at(vector):
        shifted = GroupHessian(mlp.model, mlp.loss_fn(), *mlp.group_data("tail"))
        shifted.params = shifted.layout.unflatten(vector)
        return shifted.loss()

    slope = (loss_at(w + h * d) - loss_at(w - h * d)) / (2 * h)
    assert slope == pytest.approx(float(g @ d), rel=1e-6, abs=1e-9)


def test_bad_groups_and_shapes(mlp):
    with pytest.raises(GroupError, match="unknown group"):
        GroupHessian.from_run(mlp, "middle")
    with pytest.raises(GroupError, match="no classes"):
        GroupHessian.from_run(mlp, [])
    with pytest.raises(GroupError, match="outside"):
        GroupHessian.from_run(mlp, [3, 10])
    op = GroupHessian.from_run(mlp, "tail")
    with pytest.raises(ValueError, match="expected shape"):
        op.matmat(torch.zeros(op.n_params + 1, 2))
    with pytest.raises(ValueError, match="unknown HVP method"):
        GroupHessian.from_run(mlp, "tail", method="finite-differences")
