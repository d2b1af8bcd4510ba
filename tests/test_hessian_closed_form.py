"""The Hessian operator against references that use no second-order autograd.

1. Closed form. Softmax cross-entropy of a linear model ``z = W x + b`` (``C`` classes, ``d``
   inputs) has, with ``p_i = softmax(z_i)`` and ``A_i = diag(p_i) - p_i p_i^T``,

   .. math::  H = \\frac{1}{N} \\sum_i J_i^T A_i J_i, \\qquad
              J_i = [\\, I_C \\otimes x_i^T \\;|\\; I_C \\,]

   in the parameter order of ``named_parameters()`` (``W`` row-major, then ``b``): the blocks
   are ``A_i kron x_i x_i^T`` (W, W), ``A_i kron x_i`` (W, b) and ``A_i`` (b, b). Built in numpy,
   float64. Products agree to 1e-12 relative; the extreme eigenvalues from Lanczos (residual
   tolerance 1e-10) to 1e-9 relative to ``lambda_max``.
2. Finite differences. ``H v`` against ``(grad L(w + h v) - grad L(w - h v)) / (2 h)``, the
   gradients by first-order autograd, for a smooth network (tanh, BatchNorm in eval mode with
   non-trivial running statistics) in float64. With ``h = 1e-4`` the truncation error is
   ``O(h^2)`` (8e-10 relative here, 8e-8 at h = 1e-3) and the rounding error ~``eps / h``
   (~1e-12): checked to 1e-7 relative.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from landscape.hvp import GroupHessian
from landscape.eigen import extreme_eigenpairs

N, D, C = 40, 5, 4


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    return x, torch.randint(0, C, (N,), generator=g)


def _linear_model(seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    model = nn.Linear(D, C).double()
    with torch.no_grad():  # logits of order one: softmax neither saturated nor uniform
        model.weight.mul_(3.0)
    return model


def _closed_form_hessian(model: nn.Linear, x: torch.Tensor) -> np.ndarray:
    W, b, X = (t.detach().numpy() for t in (model.weight, model.bias, x))
    z = X @ W.T + b
    P = np.exp(z - z.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    H = np.zeros((C * D + C, C * D + C))
    for p, xi in zip(P, X):
        A = np.diag(p) - np.outer(p, p)
        H[:C * D, :C * D] += np.kron(A, np.outer(xi, xi))
        H[:C * D, C * D:] += np.kron(A, xi[:, None])
        H[C * D:, C * D:] += A
    H[C * D:, :C * D] = H[:C * D, C * D:].T
    return H / len(X)


@pytest.fixture(scope="module")
def linear_case():
    x, y = _data()
    model = _linear_model()
    return model, x, y, _closed_form_hessian(model, x)


@pytest.mark.parametrize("batch_size", [None, 7])  # one batch, and several uneven ones
@pytest.mark.parametrize("method", ["double-backward", "forward-over-reverse"])
def test_products_match_the_closed_form_softmax_regression_hessian(linear_case, method,
                                                                   batch_size):
    model, x, y, H = linear_case
    op = GroupHessian(model, _ce, x, y, method=method, batch_size=batch_size)
    assert op.n_params == H.shape[0] == C * D + C
    V = torch.randn(op.n_params, 6, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    HV = op.matmat(V).numpy()
    expected = H @ V.numpy()
    assert np.linalg.norm(HV - expected) <= 1e-12 * np.linalg.norm(expected)


def test_extreme_eigenvalues_match_the_closed_form(linear_case):
    model, x, y, H = linear_case
    exact = np.linalg.eigvalsh(H)  # ascending
    # Softmax is unchanged by adding a constant to every logit: (W + 1 u^T, b + s 1) is a
    # (D + 1)-dimensional null space, so lambda_min is exactly 0 (and repeated: ask for one).
    assert abs(exact[0]) < 1e-14 and np.all(np.diff(exact[-3:]) > 1e-3 * exact[-1])
    result = extreme_eigenpairs(GroupHessian(model, _ce, x, y), top=3, bottom=1, tol=1e-10,
                                seed=0)
    scale = exact[-1]
    assert np.max(np.abs(np.asarray(result.top) - exact[::-1][:3])) <= 1e-9 * scale
    assert abs(float(result.bottom[0]) - exact[0]) <= 1e-9 * scale


class _SmoothNet(nn.Module):
    """Linear, BatchNorm (eval: fixed, non-trivial running statistics), tanh, linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc1, self.bn, self.fc2 = nn.Linear(D, 6), nn.BatchNorm1d(6), nn.Linear(6, C)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.3, 0.3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def _gradient_at(model: nn.Module, w: torch.Tensor, x, y) -> torch.Tensor:
    shifted = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(w, shifted.parameters())
    return GroupHessian(shifted, _ce, x, y).gradient()


def test_products_match_central_differences_of_the_gradient():
    x, y = _data(seed=4)
    model = _SmoothNet().double().eval()
    op = GroupHessian(model, _ce, x, y, batch_size=16)
    w = op.parameter_vector()
    assert torch.equal(w, torch.nn.utils.parameters_to_vector(model.parameters()))
    h = 1e-4
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        v = torch.randn(op.n_params, generator=g, dtype=torch.float64)
        v /= v.norm()
        difference = (_gradient_at(model, w + h * v, x, y)
                      - _gradient_at(model, w - h * v, x, y)) / (2 * h)
        Hv = op.matvec(v)
        assert float((Hv - difference).norm()) <= 1e-7 * float(difference.norm())
