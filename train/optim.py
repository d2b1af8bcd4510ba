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
they were (the usual SAM practice). ``bn_update="all"`` keeps the seed code's running
statistics exactly: they also move at every perturbed weight and, with ``forward_per_group``
(the seed's SSE-SAM, which runs a forward at :math:`w` for each group and one at
:math:`w + e_G` even when :math:`e_G = 0`: 4 forwards a step in both stages), at the repeated
forwards at :math:`w`, which are replayed from the first one's batch statistics
(:class:`train.protocol.BatchStatistics`) instead of being run: 1 replay a step in stage I, 2
in stage II, and no extra pass.

Data parallelism (``torchrun``, :mod:`train.distributed`), ``perturbation``: each rank holds a
shard of the global batch of size :math:`B`, weighs its samples by the global weights (``1/B``),
and the step's collectives are made by the ``reduce_gradients`` hook (one all-reduce sum).

* ``"global"`` (the default): :math:`e_G` is built from the all-reduced group gradient, so the
  step is one SAM step over the global batch: the one-process step, to float rounding (the
  papers' single-GPU maths; not what the SAM paper's own multi-accelerator code did).
  All-reduces per step: one per group with :math:`\rho_G \ne 0` (its gradient at :math:`w`)
  plus one for the summed final gradient.
* ``"local"``: rank :math:`r` perturbs with its own shard's gradient,
  :math:`e_G^r = \rho_G \nabla L_G^r(w) / (\lVert \nabla L_G^r(w) \rVert + \epsilon)`, and
  only :math:`g = \sum_r \sum_G \nabla L_G^r(w + e_G^r)` is all-reduced: one all-reduce per
  step whatever the optimizer, one fewer per perturbed group. This is the SAM paper's
  implementation (Foret et al. 2021, p. 5: each accelerator computes the SAM gradient of its
  sub-batch independently and the results are averaged; the m-sharpness of its section 4.1,
  with ``m`` the per-rank batch) and what davda54/sam advises under DDP (the first pass in
  ``model.no_sync()``: its issues 18, 38 and 78). With one process both modes are one step.

=========  ===========================  =====================
preset     all-reduces, ``global``      ``local``
=========  ===========================  =====================
sgd        1                            1
sam        2                            1
imbsam     2                            1
ssesam     3 (stage I), 2 (stage II)    1
=========  ===========================  =====================

(``group_reduction="group"`` adds one all-reduce of the group sizes in either mode:
:func:`group_sample_weights`. Each all-reduce is one collective per parameter dtype.)

The seed code's optimizer API, for code written against it, is :class:`train.seed_api.SSESAM`
(also importable from here).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from train.options import OPTIMIZERS, PERTURBATIONS, check_choice
from train.protocol import BatchStatistics

__all__ = ["Preset", "preset", "switch_epoch", "GroupSAM", "group_sample_weights", "OptimError",
           "OPTIMIZERS", "PERTURBATIONS", "READS", "ignored_flags"]


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


# The optimizer settings each preset reads (the table above); the others change nothing.
# tail_scale and group_reduction act on the head/tail split, which sgd and sam do not make.
READS = {
    "sgd": (),
    "sam": ("rho",),
    "imbsam": ("rho", "tail_scale", "group_reduction"),
    "ssesam": ("head_rho", "tail_rho", "gamma", "tail_scale", "group_reduction"),
}


def ignored_flags(name: str, given) -> list[str]:
    """The settings among ``given`` (names) that preset ``name`` does not read, in the order of
    ``READS["ssesam"]`` after ``rho``: what a command line warns about instead of ignoring.

    Example:
        >>> ignored_flags("sgd", ["rho", "lr"]), ignored_flags("sam", ["head_rho", "rho"])
        (['rho'], ['head_rho'])
    """
    check_choice("opt", name, OptimError)
    known = ("rho",) + READS["ssesam"]
    given = set(given)
    return [flag for flag in known if flag in given and flag not in READS[name]]


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
        forward_per_group: with ``bn_update="all"``, also the running-statistics updates of the
            seed SSE-SAM's repeated forwards at ``w`` (see the module docstring).
        reduce_gradients: an in-place all-reduce sum of a list of tensors (under data
            parallelism; the trainer weighs each rank's samples by the global batch size:
            ``train.distributed``). It is called on the summed final gradient and, with
            ``perturbation="global"``, on each perturbed group's gradient at ``w``, so that
            its perturbation uses the global group gradient and its global norm.
        perturbation: ``"global"`` or ``"local"`` (each rank's own :math:`e_G`; see the module
            docstring).
        eps: the constant added to the gradient norm.

    Example:
        >>> model = nn.Linear(4, 3)
        >>> step = GroupSAM(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
        >>> y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
        >>> p = preset("ssesam", head_rho=0.05, tail_rho=0.1, gamma=0.5, epochs=2)
        >>> weights = group_sample_weights(y, torch.tensor([0, 0, 1]), len(p.groups))
        >>> weights.sum(1)  # head, tail: 6 and 2 of 8 samples, each weighed 1/8
        tensor([0.7500, 0.2500])
        >>> loss = step.step(x, y, nn.CrossEntropyLoss(reduction="none"), p.rhos(0), weights)
        >>> loss.shape, bool(loss > 0)  # the batch mean loss at w, before the step
        (torch.Size([]), True)
    """

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer,
                 bn_update: str = "w", forward_per_group: bool = False,
                 reduce_gradients: Optional[Callable[[list[torch.Tensor]], None]] = None,
                 perturbation: str = "global", eps: float = 1e-12):
        check_choice("bn_update", bn_update, OptimError)
        check_choice("perturbation", perturbation, OptimError)
        self.model = model
        self.base_optimizer = base_optimizer
        self.bn_update = bn_update
        self.replays = bn_update == "all" and forward_per_group
        self.reduce_gradients = reduce_gradients
        self.perturbation = perturbation
        self.eps = eps
        self.params = [p for p in model.parameters() if p.requires_grad]

    def _grad(self, loss: torch.Tensor, retain_graph: bool, reduce: bool = False
              ) -> list[torch.Tensor]:
        """This rank's gradient of ``loss``; summed over the ranks when ``reduce``."""
        grads = list(torch.autograd.grad(loss, self.params, retain_graph=retain_graph,
                                         allow_unused=True, materialize_grads=True))
        if reduce and self.reduce_gradients is not None:
            self.reduce_gradients(grads)
        return grads

    def _forward_losses(self, inputs: torch.Tensor, targets: torch.Tensor,
                        loss_fn: Callable) -> torch.Tensor:
        return loss_fn(self.model(inputs), targets)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: Callable,
             rhos: Sequence[float], sample_weights: torch.Tensor) -> torch.Tensor:
        r"""One optimizer step; returns the batch loss at ``w`` (a tensor, not synchronised).

        .. math::
            L_G(w) = \sum_i W_{G,i}\, l_i(w), \qquad
            e_G = \rho_G \frac{\nabla L_G(w)}{\lVert \nabla L_G(w) \rVert + \epsilon},
            \qquad g = \sum_G \nabla L_G(w + e_G),

        then the base optimizer steps with :math:`g` (:math:`e_G = 0` when :math:`\rho_G = 0`).

        Args:
            inputs, targets: the batch.
            loss_fn: per-sample loss, ``(logits, targets) -> (B,)``.
            rhos: radius :math:`\rho_G` of each group.
            sample_weights: ``(num_groups, B)``; row ``G`` weighs sample ``i`` in
                :math:`L_G` (``1/B`` for members, 0 otherwise: :func:`group_sample_weights`).
        """
        stats = BatchStatistics(self.model) if self.replays else contextlib.nullcontext()
        with stats:
            losses = self._forward_losses(inputs, targets, loss_fn)  # l_i(w); BN stats move
        group_losses = [(row * losses).sum() for row in sample_weights]  # L_G(w)
        if all(rho == 0 for rho in rhos):  # SGD: g = grad sum_G L_G(w), one backward
            g = self._grad(sum(group_losses), retain_graph=False)
            if self.replays:  # the seed's forwards at w: 2 per group, less the one run
                stats.replay(2 * len(rhos) - 1)
        else:
            # Every grad L_G(w) before w moves: the graph at w is unusable once w changed.
            # "global" sums a perturbed group's gradient over the ranks before it makes e_G.
            last, share = len(group_losses) - 1, self.perturbation == "global"
            grads_at_w = [self._grad(loss, retain_graph=G < last, reduce=share and rho != 0)
                          for G, (loss, rho) in enumerate(zip(group_losses, rhos))]
            g = [torch.zeros_like(p) for p in self.params]
            for G, (grad, rho, weights) in enumerate(zip(grads_at_w, rhos, sample_weights)):
                if self.replays:  # the seed's forward at w for group G > 0, and at w + 0
                    stats.replay(int(G > 0) + int(rho == 0))
                if rho != 0:  # grad L_G(w + e_G)
                    grad = self._grad_at(self._perturbation(grad, rho), inputs, targets,
                                         loss_fn, weights)
                torch._foreach_add_(g, grad)
        if self.reduce_gradients is not None:  # this rank's part of g: summed once
            self.reduce_gradients(g)
        for p, g_p in zip(self.params, g):
            p.grad = g_p
        self.base_optimizer.step()
        return torch.stack(group_losses).detach().sum()

    def _perturbation(self, grad: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
        """``e = rho * grad / (||grad|| + eps)``, one L2 norm over all parameters."""
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grad)))
        return torch._foreach_mul(grad, rho / (norm + self.eps))

    def _grad_at(self, e: list[torch.Tensor], inputs, targets, loss_fn, weights
                 ) -> list[torch.Tensor]:
        """``grad L_G(w + e)`` (BatchNorm running statistics kept unless ``bn_update="all"``);
        ``w`` is restored exactly, not by subtraction."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_add_(self.params, e)
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
                         sum_over_ranks: Optional[Callable[[list[torch.Tensor]], None]] = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
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
        dtype: of the weights: the losses' (``1/B`` in float32 would cost a float64 model
            its last eight digits).
    """
    check_choice("group_reduction", reduction, OptimError)
    member = (group_of_class[targets][None, :] ==
              torch.arange(num_groups, device=targets.device)[:, None]).to(dtype)
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


def __getattr__(name: str):
    # The seed code's optimizer API lives in train.seed_api; ``from train.optim import SSESAM``
    # keeps working (imported on first use: train.seed_api itself imports this module).
    if name == "SSESAM":
        from train.seed_api import SSESAM

        return SSESAM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
