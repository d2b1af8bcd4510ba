"""The SSE-SAM seed code's optimizer API, for code written against its README.

The training loop does not use it: it runs :class:`train.optim.GroupSAM`, the same algorithm in
fewer passes. ``from train.optim import SSESAM`` imports it too.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn

from train.optim import OptimError, switch_epoch

__all__ = ["SSESAM"]


class SSESAM:
    """The seed code's SSE-SAM optimizer API, for code written against its README.

    The caller computes each group's loss and backward itself, at ``w`` and at the perturbed
    weights; :meth:`update` once per step, :meth:`update_rho` once per epoch, at its end.

    The numbers are the seed's: the norm has ``1e-16`` added and the perturbation is removed by
    subtraction. Three of its faults are not reproduced: ``gamma = 0`` means no head perturbation
    from the start (the seed crashes), a parameter without a gradient keeps ``grad = None``, and
    the switch is at :func:`switch_epoch` (the seed's float product can round one epoch late).

    Example:
        >>> import torch.nn as nn
        >>> model = nn.Linear(4, 3)
        >>> sse = SSESAM(torch.optim.SGD(model.parameters(), lr=0.1), model, head_rho=0.05,
        ...              tail_rho=0.1, gamma=0.5, total_epochs=2)
        >>> x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
        >>> y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
        >>> loss = nn.CrossEntropyLoss()
        >>> for epoch in range(2):
        ...     for n_i, members in enumerate((y < 2, y == 2)):  # 0: head, 1: tail
        ...         loss(model(x[members]), y[members]).backward()  # at w
        ...         sse.compute_and_add_epsilon(n_i)  # to w + e
        ...         loss(model(x[members]), y[members]).backward()  # at w + e
        ...         sse.compute_grad_sum_and_restore_p()  # back to w
        ...     sse.update()
        ...     sse.update_rho()
        >>> sse.rho_is  # the head radius is 0 from epoch ceil(0.5 * 2) = 1 on
        [0.0, 0.1]
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
