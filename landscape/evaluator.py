r"""Group losses and accuracies at points :math:`w + \sum_k c_k d_k` of parameter space, without
gradients, the model in eval mode (the evaluation behind :mod:`landscape.surface`).

How the points are evaluated (``method``; ``bench/bench_surface.py`` compares the two, figures in
BENCHMARKS.md, "Loss surfaces"):

* ``"loop"`` (default): a Python loop over points. The model's parameters are views into one
  flat buffer, so moving to a point is two vector operations (``w + a d1``, ``+ b d2``), then one
  forward over the evaluation set in large batches.
* ``"vmap"``: ``torch.func.vmap`` of ``functional_call`` over chunks of points, the chunk's
  weights stacked (the benchmark says when it pays; ``"loop"`` is the default).

>>> import torch
>>> model = torch.nn.Linear(2, 2)
>>> x, y = torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 0, 1])
>>> loss = torch.nn.CrossEntropyLoss(reduction="none")
>>> groups = torch.tensor([[True] * 6, [False, True] * 3])            # all, and class 1
>>> evaluate = SurfaceEvaluator(model, loss, x, y, groups, [torch.randn(6)])
>>> losses, accuracies = evaluate([[0.0], [0.5]])                   # two points on a line
>>> losses.shape, accuracies.shape
((2, 2), (2, 2))
>>> bool(abs(losses[0, 0] - loss(model(x), y).mean()) < 1e-6)        # the centre is w
True
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call

from landscape.errors import AnalysisError
from landscape.layout import ParamLayout

__all__ = ["SurfaceEvaluator", "METHODS"]

METHODS = ("loop", "vmap")


class SurfaceEvaluator:
    """Group losses and accuracies at points :math:`w + \\sum_k c_k d_k`.

    Args:
        model: the network at ``w``; it is copied (cast to ``dtype``, eval mode, no gradients),
            the caller's module is left untouched.
        loss_fn: per-sample loss ``(logits, targets) -> (B,)``.
        inputs, targets: the evaluation set (normalised, not augmented).
        memberships: ``(G, N)`` bool, sample ``i`` belongs to group ``g``.
        directions: flat vectors over the trainable parameters.
        dtype: dtype of weights, inputs and forward passes.
        method: ``"loop"`` or ``"vmap"`` (module docstring).
        batch_size: samples per forward (default: all of them, at most 4096).
        chunk: points per vmapped call.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, inputs: torch.Tensor,
                 targets: torch.Tensor, memberships: torch.Tensor,
                 directions: Sequence[torch.Tensor], *, dtype: torch.dtype = torch.float32,
                 method: str = "loop", batch_size: Optional[int] = None, chunk: int = 8):
        if method not in METHODS:
            raise AnalysisError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        self.method = method
        self.dtype = dtype
        self.chunk = max(1, int(chunk))
        self.model = copy.deepcopy(model).to(dtype=dtype).eval()
        self.loss_fn = loss_fn
        device = next(iter(self.model.parameters())).device
        self.device = device
        # Directions cover the trainable parameters only (landscape.layout).
        self.layout = ParamLayout.of(self.model)
        params = self.layout.parameters(self.model)
        self.model.requires_grad_(False)
        n = self.layout.n
        for d in directions:
            if d.numel() != n:
                raise AnalysisError(f"a direction has {d.numel()} entries, the model {n} "
                                    "parameters (direction of another model?)")
        # The parameters become views into one flat buffer: a grid point is then written with
        # one or two vector operations instead of one copy per parameter tensor.
        self.flat = self.layout.share_storage(params)
        self.w0 = self.flat.clone()
        self.directions = torch.stack([d.to(device, dtype).reshape(-1) for d in directions])
        self.buffers = dict(self.model.named_buffers())
        self.inputs = inputs.to(device, dtype)
        self.targets = targets.to(device)
        self.memberships = memberships.to(device, torch.float64)
        self.counts = self.memberships.sum(dim=1)
        if bool((self.counts == 0).any()):
            raise AnalysisError("a group has no samples in the evaluation set")
        n_samples = int(self.targets.shape[0])
        self.batch_size = int(batch_size) if batch_size else max(1, min(n_samples, 4096))

    def _reduce(self, losses: torch.Tensor,
                hits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample ``(P, N)`` losses and hits -> per-group ``(P, G)`` means."""
        group_loss = losses.to(torch.float64) @ self.memberships.T / self.counts
        group_acc = 100.0 * (hits.to(torch.float64) @ self.memberships.T) / self.counts
        return group_loss, group_acc

    @torch.inference_mode()
    def _loop(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_samples = self.targets.shape[0]
        losses = torch.empty(coords.shape[0], n_samples, dtype=self.dtype, device=self.device)
        hits = torch.empty(coords.shape[0], n_samples, dtype=torch.bool, device=self.device)
        for row, c in enumerate(coords.tolist()):
            torch.add(self.w0, self.directions[0], alpha=c[0], out=self.flat)
            for k in range(1, len(c)):
                self.flat.add_(self.directions[k], alpha=c[k])
            for start in range(0, n_samples, self.batch_size):
                stop = start + self.batch_size
                logits = self.model(self.inputs[start:stop])
                y = self.targets[start:stop]
                losses[row, start:stop] = self.loss_fn(logits, y)
                hits[row, start:stop] = logits.argmax(dim=1) == y
        return self._reduce(losses, hits)

    @torch.inference_mode()
    def _vmap(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_samples = self.targets.shape[0]
        layout, model, buffers = self.layout, self.model, self.buffers

        def forward(flat_weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return functional_call(model, {**layout.named(flat_weights), **buffers}, (x,))

        batched = torch.func.vmap(forward, in_dims=(0, None))
        out_loss, out_acc = [], []
        for first in range(0, coords.shape[0], self.chunk):
            block = coords[first:first + self.chunk].to(self.device, self.dtype)
            weights = self.w0 + block @ self.directions          # (K, n)
            k = weights.shape[0]
            losses = torch.empty(k, n_samples, dtype=self.dtype, device=self.device)
            hits = torch.empty(k, n_samples, dtype=torch.bool, device=self.device)
            for start in range(0, n_samples, self.batch_size):
                stop = start + self.batch_size
                x, y = self.inputs[start:stop], self.targets[start:stop]
                logits = batched(weights, x)                     # (K, B, C)
                flat_logits = logits.reshape(-1, logits.shape[-1])
                losses[:, start:stop] = self.loss_fn(flat_logits, y.repeat(k)).view(k, -1)
                hits[:, start:stop] = logits.argmax(dim=-1) == y
            group_loss, group_acc = self._reduce(losses, hits)
            out_loss.append(group_loss)
            out_acc.append(group_acc)
        return torch.cat(out_loss), torch.cat(out_acc)

    def __call__(self, coords: Union[np.ndarray, Sequence[Sequence[float]]]
                 ) -> tuple[np.ndarray, np.ndarray]:
        """``(P, k)`` coordinates -> ``(P, G)`` mean losses and ``(P, G)`` accuracies in %."""
        coords = torch.as_tensor(np.asarray(coords, dtype=np.float64)).reshape(
            -1, self.directions.shape[0])
        if self.method == "loop":
            loss, acc = self._loop(coords)
        else:
            loss, acc = self._vmap(coords)
        return loss.cpu().numpy(), acc.cpu().numpy()
