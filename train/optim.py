r"""SGD, SAM, ImbSAM and SSE-SAM as one group-wise SAM step.

The batch's per-sample losses :math:`l_i(w)` are split into class groups :math:`G` (``all``, or
``head`` and ``tail``), each normalised by the full batch size :math:`B`, so that the groups
add up to the usual batch mean:

.. math::
    L_G(w) = \frac{1}{B} \sum_{i \in G} l_i(w), \qquad
    e_G = \rho_G \frac{\nabla L_G(w)}{\lVert \nabla L_G(w) \rVert + 10^{-12}}, \qquad
    g = \sum_G \nabla L_G(w + e_G),

with :math:`e_G = 0` when :math:`\rho_G = 0`. The base optimizer (SGD, momentum 0.9) then steps
with :math:`g`. The norm is one global L2 norm over all parameters.

=========  ===================================  ==============================
preset     radii                                passes per step
=========  ===================================  ==============================
sgd        all: 0                               1 forward, 1 backward
sam        all: rho                             2 F, 2 B
imbsam     head: 0, tail: rho                   2 F, 3 B
ssesam     head: head_rho (epoch < switch), 0   3 F, 4 B (stage I)
           tail: tail_rho                       2 F, 3 B (stage II)
=========  ===================================  ==============================

The SSE-SAM switch is a hard step: with 0-based epochs, ``head_rho`` applies to epochs
``0 .. ceil(gamma * epochs) - 1`` and is 0 from epoch ``ceil(gamma * epochs)`` on; ``gamma = 0``
means no head perturbation at all. A group absent from the batch has a zero loss and a zero
gradient, hence a zero perturbation: no special case, no NaN, and no host synchronisation.

BatchNorm: the forward at :math:`w` runs in train mode and updates the running statistics;
the forwards at perturbed weights use the batch statistics too but leave the running ones as
they were (the usual SAM practice). ``bn_update="all"`` keeps the seed code's behaviour, which
also updates them at every perturbed weight.

:class:`SSESAM` at the end is the seed code's optimizer API, for code written against it.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from train.options import OPTIMIZERS, check_choice

__all__ = ["Preset", "preset", "switch_epoch", "GroupSAM", "SSESAM", "OPTIMIZERS"]


class OptimError(ValueError):
    """An unknown optimizer or an invalid radius / gamma."""


def switch_epoch(gamma: float, epochs: int) -> int:
    """First 0-based epoch of SSE-SAM's stage II: ``ceil(gamma * epochs)``."""
    return math.ceil(gamma * epochs - 1e-9)  # 1e-9: 0.28 * 25 is 7.000000000000001 in floats


@dataclass(frozen=True)
class Preset:
    """An optimizer of the family: its groups and each group's radius over the epochs.

    Attributes:
        name: ``sgd``, ``sam``, ``imbsam`` or ``ssesam``.
        groups: ``("all",)`` or ``("head", "tail")``.
        radii: each group's radius in stage I.
        late_radii: each group's radius from ``switch`` on (same as ``radii`` except SSE-SAM).
        switch: first epoch of stage II (``epochs`` when there is none).
    """

    name: str
    groups: tuple[str, ...]
    radii: tuple[float, ...]
    late_radii: tuple[float, ...]
    switch: int

    def rhos(self, epoch: int) -> tuple[float, ...]:
        """Radii of the groups in 0-based ``epoch``."""
        return self.radii if epoch < self.switch else self.late_radii

    def stage(self, epoch: int) -> int:
        return 1 if epoch < self.switch else 2


def preset(name: str, *, rho: float = 0.05, head_rho: float = 0.05, tail_rho: float = 0.1,
           gamma: float = 0.7, epochs: int = 200) -> Preset:
    """The preset ``name`` of the group-SAM family (see the module docstring)."""
    check_choice("opt", name, OptimError)
    for label, value in (("rho", rho), ("head_rho", head_rho), ("tail_rho", tail_rho)):
        if not (value >= 0 and math.isfinite(value)):
            raise OptimError(f"{label} must be a finite number >= 0, got {value}")
    if not 0 <= gamma < 1:
        raise OptimError(f"gamma must be in [0, 1), got {gamma}")
    if name == "sgd":
        return Preset(name, ("all",), (0.0,), (0.0,), epochs)
    if name == "sam":
        return Preset(name, ("all",), (rho,), (rho,), epochs)
    if name == "imbsam":
        return Preset(name, ("head", "tail"), (0.0, rho), (0.0, rho), epochs)
    return Preset(name, ("head", "tail"), (head_rho, tail_rho), (0.0, tail_rho),  # ssesam
                  switch_epoch(gamma, epochs))


@contextlib.contextmanager
def _running_stats_frozen(model: nn.Module, frozen: bool) -> Iterator[None]:
    """Restores every BatchNorm running statistic (and batch counter) on exit."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not frozen or not norms:
        yield
        return
    saved = [[b.clone() for b in m.buffers()] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for live, kept in zip(m.buffers(), buffers):
                    live.copy_(kept)


class GroupSAM:
    """The one group-wise SAM step of the family.

    Args:
        model: the network; its parameters are updated in place.
        base_optimizer: e.g. ``torch.optim.SGD(model.parameters(), lr, momentum=0.9)``.
        bn_update: ``"w"`` (running statistics only from the forward at ``w``) or ``"all"``.
        reduce_gradients: called on each list of group gradients before they are used; under
            data parallelism it all-reduces them in place, so that every perturbation uses the
            global group gradient and its global norm (the trainer weighs each rank's samples
            by the global batch size and sums over ranks: ``train.distributed``).
        eps: the constant added to the gradient norm.
    """

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer,
                 bn_update: str = "w",
                 reduce_gradients: Optional[Callable[[list[torch.Tensor]], None]] = None,
                 eps: float = 1e-12):
        check_choice("bn_update", bn_update, OptimError)
        self.model = model
        self.base_optimizer = base_optimizer
        self.bn_update = bn_update
        self.reduce_gradients = reduce_gradients
        self.eps = eps
        self.params = [p for p in model.parameters() if p.requires_grad]

    def _grad(self, loss: torch.Tensor, retain_graph: bool) -> list[torch.Tensor]:
        grads = torch.autograd.grad(loss, self.params, retain_graph=retain_graph,
                                    allow_unused=True, materialize_grads=True)
        grads = list(grads)
        if self.reduce_gradients is not None:
            self.reduce_gradients(grads)
        return grads

    def _forward_losses(self, inputs: torch.Tensor, targets: torch.Tensor,
                        loss_fn: Callable) -> torch.Tensor:
        return loss_fn(self.model(inputs), targets)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: Callable,
             rhos: Sequence[float], sample_weights: torch.Tensor) -> torch.Tensor:
        r"""One optimizer step; returns the batch loss at ``w`` (a tensor, not synchronised).

        Args:
            inputs, targets: the batch.
            loss_fn: per-sample loss, ``(logits, targets) -> (B,)``.
            rhos: radius of each group.
            sample_weights: ``(num_groups, B)``; row ``G`` weighs sample ``i`` in
                :math:`L_G = \sum_i W_{G,i}\, l_i` (``1/B`` for members, 0 otherwise).
        """
        losses = self._forward_losses(inputs, targets, loss_fn)  # forward at w
        group_losses = [(row * losses).sum() for row in sample_weights]
        batch_loss = torch.stack(group_losses).detach().sum()
        if all(r == 0 for r in rhos):  # plain SGD: one backward of the summed loss
            total = self._grad(sum(group_losses), retain_graph=False)
        else:
            total = self._sam_gradient(inputs, targets, loss_fn, rhos, sample_weights,
                                       group_losses)
        for p, g in zip(self.params, total):
            p.grad = g
        self.base_optimizer.step()
        return batch_loss

    def _sam_gradient(self, inputs, targets, loss_fn, rhos, sample_weights, group_losses):
        # One backward per group at w: each is either the final gradient (rho = 0) or the
        # direction of the group's perturbation.
        at_w = [self._grad(loss, retain_graph=(g < len(group_losses) - 1))
                for g, loss in enumerate(group_losses)]
        total = [torch.zeros_like(p) for p in self.params]
        for g, rho in enumerate(rhos):
            if rho == 0:
                torch._foreach_add_(total, at_w[g])
                continue
            torch._foreach_add_(total, self._gradient_at_perturbed(
                at_w[g], rho, inputs, targets, loss_fn, sample_weights[g]))
        return total

    def _gradient_at_perturbed(self, direction, rho, inputs, targets, loss_fn, weights):
        """``grad L_G(w + e_G)``, ``e_G = rho * d / (||d|| + eps)``; ``w`` restored exactly."""
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(direction)))
        scale = rho / (norm + self.eps)
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_add_(self.params, torch._foreach_mul(direction, scale))
        try:
            # The backward runs before the running statistics are restored: BatchNorm's graph
            # saves them, and restoring them first is an in-place change autograd refuses.
            with _running_stats_frozen(self.model, frozen=(self.bn_update == "w")):
                losses = self._forward_losses(inputs, targets, loss_fn)
                return self._grad((weights * losses).sum(), retain_graph=False)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, saved)

    def state_dict(self) -> dict:
        return {"base_optimizer": self.base_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.base_optimizer.load_state_dict(state["base_optimizer"])


def group_sample_weights(targets: torch.Tensor, group_of_class: torch.Tensor, num_groups: int,
                         reduction: str = "batch",
                         group_scale: Optional[torch.Tensor] = None, *,
                         batch_size: Optional[int] = None,
                         sum_over_ranks: Optional[Callable[[list[torch.Tensor]], None]] = None
                         ) -> torch.Tensor:
    r"""The ``(num_groups, B)`` weights of :meth:`GroupSAM.step`.

    Under data parallelism ``targets`` is this rank's part of a global batch; with the global
    ``batch_size`` and ``sum_over_ranks`` (an in-place all-reduce sum) the weights are those of
    the whole global batch restricted to this rank's columns, so the gradients of
    :math:`\sum_i W_{G,i} l_i` add up over the ranks to the one-process gradient, whatever the
    shard sizes.

    Args:
        targets: ``(B,)`` labels.
        group_of_class: ``(C,)`` group index of each class.
        reduction: ``"batch"`` divides every group's sum by the batch size (the family's
            definition: groups add up to the batch mean); ``"group"`` by the group's own size in
            the batch (group means, as the SSE-SAM authors' ImbSAM baseline).
        group_scale: optional ``(num_groups,)`` factor per group, e.g. ``[1, 2]`` for the ImbSAM
            authors' doubled tail loss.
        batch_size: size of the whole batch (default ``B``; the global batch under torchrun).
        sum_over_ranks: sums the group sizes over the ranks in place (``"group"`` reduction;
            one all-reduce of ``num_groups`` numbers, no host synchronisation).
    """
    check_choice("group_reduction", reduction, OptimError)
    member = (group_of_class[targets][None, :] ==
              torch.arange(num_groups, device=targets.device)[:, None]).to(torch.float32)
    if reduction == "batch":
        weights = member / (targets.shape[0] if batch_size is None else batch_size)
    else:  # group
        counts = member.sum(1, keepdim=True)
        if sum_over_ranks is not None:
            sum_over_ranks([counts])
        weights = member / counts.clamp_min(1)
    if group_scale is not None:
        weights = weights * group_scale.to(weights)[:, None]
    return weights


class SSESAM:
    """The seed code's SSE-SAM optimizer API, for code written against its README.

    The caller computes each group's loss and backward itself::

        sse = SSESAM(optimizer, model, head_rho=0.05, tail_rho=0.1, gamma=0.7, total_epochs=200)
        head_loss.backward(retain_graph=True); sse.compute_and_add_epsilon(n_i=0)
        head_loss_at_perturbed.backward();     sse.compute_grad_sum_and_restore_p()
        ... the same for the tail with n_i=1 ...
        sse.update()            # once per step
        sse.update_rho()        # once per epoch, at its end

    The numbers are the seed's: the norm has ``1e-16`` added and the perturbation is removed by
    subtraction. Three of its faults are not reproduced: ``gamma = 0`` means no head perturbation
    from the start (the seed crashes), a parameter without a gradient keeps ``grad = None``, and
    the switch is at :func:`switch_epoch` (the seed's float product can round one epoch late).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, head_rho: float,
                 tail_rho: float, gamma: float = 0, total_epochs: int = 200):
        if not 0 <= gamma < 1:
            raise OptimError(f"gamma must be in [0, 1), got {gamma}")
        self.optimizer = optimizer
        self.model = model
        self.rho_is = [float(head_rho), float(tail_rho)]
        self.total_epochs = total_epochs
        self.epoch_count = 0
        # Not the seed's float ``total_epochs * gamma``: 0.28 * 25 = 7.000000000000001 would
        # switch one epoch late, after 8 epochs instead of ceil(7) = 7.
        self.cut_epoch = switch_epoch(gamma, total_epochs)
        if gamma == 0:
            self.rho_is[0] = 0.0
        self.state: dict = defaultdict(dict)

    @torch.no_grad()
    def compute_and_add_epsilon(self, n_i: int) -> None:
        """Moves to ``w + e`` for group ``n_i`` (0 head, 1 tail) from the current gradients."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return
        grad_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in params])) + 1e-16
        for p in params:
            eps = p.grad * (self.rho_is[n_i] / grad_norm)
            self.state[p]["eps"] = eps
            p.add_(eps)
        self.optimizer.zero_grad()

    @torch.no_grad()
    def compute_grad_sum_and_restore_p(self) -> None:
        """Adds the gradient at ``w + e`` to the running sum and moves back to ``w``."""
        for p in self.model.parameters():
            if p.grad is None:
                continue
            if "grad_sum" in self.state[p]:
                self.state[p]["grad_sum"] += p.grad
            else:
                self.state[p]["grad_sum"] = p.grad.clone()
            if "eps" in self.state[p]:
                p.sub_(self.state[p]["eps"])
        self.optimizer.zero_grad()

    @torch.no_grad()
    def update(self) -> None:
        """Steps the base optimizer with the summed group gradients."""
        for p in self.model.parameters():
            summed = self.state[p].get("grad_sum") if p in self.state else None
            p.grad = None if summed is None else summed.clone()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.state.clear()

    def update_rho(self) -> None:
        """Counts one finished epoch; ``head_rho`` is 0 once ``gamma * total_epochs`` passed."""
        self.epoch_count += 1
        if self.cut_epoch > 0 and self.epoch_count >= self.cut_epoch:
            self.rho_is[0] = 0.0
