"""Slow, independent references for the Hessian tests (others may import them).

The dense Hessian is built by ``torch.func`` on the flattened parameters in float64, from the
plain mean loss over all samples in one batch: no batching, no HVP code of ``landscape`` involved.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call

__all__ = ["dense_hessian", "flat_parameters", "dense_eigh", "symmetric", "tiny_run",
           "cached_run", "dense_group_hessian", "TINY_MLP", "TINY_CNN", "CNN_GROUP"]

# The two tiny runs the Hessian tests share (tests/conftest.py: ``tiny_mlp_path``,
# ``tiny_cnn_path``), and the CNN's group: classes 7-9 have 25 training samples, which keeps the
# dense BatchNorm-CNN Hessian cheap.
TINY_MLP = dict(model="mlp", width=8, epochs=2)
TINY_CNN = dict(model="cnn", width=4, epochs=2, loss="VS")
CNN_GROUP = [7, 8, 9]


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """The parameters of ``model.named_parameters()`` flattened in order (float64)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


def dense_hessian(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(n, n)`` float64 Hessian of ``mean_i loss_fn(model(x_i), y_i)`` at the model's weights,
    in eval mode (BatchNorm uses running statistics), by reverse-over-reverse ``torch.func``."""
    model = copy.deepcopy(model).double().eval()
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    buffers = dict(model.named_buffers())
    x = inputs.double()

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        params = {name: chunk.reshape(shape) for name, chunk, shape
                  in zip(names, torch.split(flat, sizes), shapes)}
        return loss_fn(functional_call(model, {**params, **buffers}, (x,)), targets).mean()

    flat = flat_parameters(model)
    hessian = torch.func.jacrev(torch.func.grad(mean_loss), chunk_size=64)(flat)
    return (hessian + hessian.T) / 2  # symmetric up to rounding already; make it exact


def dense_eigh(hessian: torch.Tensor) -> np.ndarray:
    """All eigenvalues of a dense symmetric matrix, ascending (LAPACK, float64)."""
    return np.linalg.eigvalsh(hessian.double().cpu().numpy())


def symmetric(eigenvalues, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigenvalues) Q^T`` (float64) with a random orthogonal ``Q`` drawn from ``seed``."""
    n = len(eigenvalues)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * torch.as_tensor(eigenvalues, dtype=torch.float64)) @ Q.T


def tiny_run(folder, model: str = "mlp", width: int = 8, epochs: int = 6, opt: str = "ssesam",
             loss: str = "CE", seed: int = 0) -> str:
    """Trains a tiny digits-LT run into ``folder`` (a second or two) and returns its path."""
    from train.cli import main

    out = str(folder)
    argv = ["--dataset", "digits", "--model", model, "--width", str(width), "--opt", opt,
            "--loss", loss, "--epochs", str(epochs), "--lr", "0.1", "--imb_factor", "20",
            "--seed", str(seed), "--out", out, "--no_progress", "--save_every", str(epochs)]
    if main(argv) != 0:
        raise RuntimeError(f"training the tiny run failed: {argv}")
    return out


def cached_run(tmp_path_factory, label: str = "run", **options) -> str:
    """A tiny run trained once per test process (each xdist worker has its own base folder)
    and shared by every test module of that process.

    The cache is keyed by every option of :func:`tiny_run`, defaults included: two calls get
    the same run exactly when they ask for the same training. ``label`` only names the folder.
    """
    bound = inspect.signature(tiny_run).bind(None, **options)
    bound.apply_defaults()
    settings = {k: v for k, v in bound.arguments.items() if k != "folder"}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = tmp_path_factory.getbasetemp() / f"tiny-run-{label}-{key}"
    if not (folder / "checkpoints.json").exists():
        tiny_run(folder, **settings)
    return str(folder)


def dense_group_hessian(run, group, split: str = "train", loss=None) -> torch.Tensor:
    """The dense float64 Hessian of ``run``'s mean loss over ``group``'s samples."""
    inputs, targets = run.group_data(group, split)
    return dense_hessian(run.model, run.loss_fn(loss), inputs, targets)
