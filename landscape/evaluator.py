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
from landscape.options import SURFACE_METHODS

__all__ = ["SurfaceEvaluator", "METHODS"]

METHODS = SURFACE_METHODS


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
        states: for each direction ``None`` or a flat vector over the floating-point buffers
            (:func:`landscape.directions.state_names`): a point's BatchNorm statistics are then
            :math:`s + \\sum_k c_k s_k` (directions without states count as zeros).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, inputs: torch.Tensor,
                 targets: torch.Tensor, memberships: torch.Tensor,
                 directions: Sequence[torch.Tensor], *, dtype: torch.dtype = torch.float32,
                 method: str = "loop", batch_size: Optional[int] = None, chunk: int = 8,
                 states: Optional[Sequence[Optional[torch.Tensor]]] = None):
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
        self._moving_states(states or (), len(directions))
        self.inputs = inputs.to(device, dtype)
        self.targets = targets.to(device)
        self.memberships = memberships.to(device, torch.float64)
        self.counts = self.memberships.sum(dim=1)
        if bool((self.counts == 0).any()):
            raise AnalysisError("a group has no samples in the evaluation set")
        n_samples = int(self.targets.shape[0])
        self.batch_size = int(batch_size) if batch_size else max(1, min(n_samples, 4096))

    def _moving_states(self, states: Sequence[Optional[torch.Tensor]], count: int) -> None:
        """The state directions as a ``(k, m)`` matrix over the floating-point buffers, or
        ``None`` when no direction moves them."""
        from landscape.directions import state_names

        self.state_names = state_names(self.model)
        self.state_directions = None
        if all(s is None for s in states):
            return
        tensors = [self.buffers[name] for name in self.state_names]
        self.s0 = torch.cat([t.reshape(-1) for t in tensors])
        rows = []
        for k in range(count):
            given = states[k] if k < len(states) else None
            if given is not None and given.numel() != self.s0.numel():
                raise AnalysisError(f"a direction moves {given.numel()} buffer entries, the "
                                    f"model has {self.s0.numel()} (direction of another model?)")
            rows.append(torch.zeros_like(self.s0) if given is None
                        else given.to(self.device, self.dtype).reshape(-1))
        self.state_directions = torch.stack(rows)

    def _named_states(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat buffer values -> ``{name: tensor}`` of the floating-point buffers."""
        out, offset = {}, 0
        for name in self.state_names:
            size = self.buffers[name].numel()
            out[name] = flat[..., offset:offset + size].reshape(
                *flat.shape[:-1], *self.buffers[name].shape)
            offset += size
        return out

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
            if self.state_directions is not None:
                point = self.s0 + torch.as_tensor(c, dtype=self.dtype, device=self.device) \
                    @ self.state_directions
                for name, value in self._named_states(point).items():
                    self.buffers[name].copy_(value)
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

        def forward(flat_weights: torch.Tensor, flat_states: torch.Tensor,
                    x: torch.Tensor) -> torch.Tensor:
            moved = {} if self.state_directions is None else self._named_states(flat_states)
            return functional_call(model, {**layout.named(flat_weights), **buffers, **moved},
                                   (x,))

        batched = torch.func.vmap(forward, in_dims=(0, 0, None))
        out_loss, out_acc = [], []
        for first in range(0, coords.shape[0], self.chunk):
            block = coords[first:first + self.chunk].to(self.device, self.dtype)
            weights = self.w0 + block @ self.directions          # (K, n)
            k = weights.shape[0]
            states = (weights[:, :0] if self.state_directions is None
                      else self.s0 + block @ self.state_directions)   # (K, m)
            losses = torch.empty(k, n_samples, dtype=self.dtype, device=self.device)
            hits = torch.empty(k, n_samples, dtype=torch.bool, device=self.device)
            for start in range(0, n_samples, self.batch_size):
                stop = start + self.batch_size
                x, y = self.inputs[start:stop], self.targets[start:stop]
                logits = batched(weights, states, x)             # (K, B, C)
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
