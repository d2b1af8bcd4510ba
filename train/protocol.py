r"""What ``--protocol seed`` changes: the SSE-SAM authors' code, point by point.

``ours`` (the default) is the plain reading of the paper; ``seed`` reproduces the authors' code
where it departs from that reading (``../shared/reference/algorithms.md``, "The authors'
protocol, exactly"):

* **Initialisation** (:func:`init_seed_`): torchvision's ResNet rule, every convolution
  ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` and BatchNorm weight 1, bias 0,
  except the stem convolution and the linear head, which the seed code replaces by fresh
  layers that keep PyTorch's default initialisation (``kaiming_uniform_(a=sqrt(5))``, standard
  deviation :math:`1/\sqrt{3\,\mathrm{fan\_in}}`). ``ours`` uses ``kaiming_normal_`` with
  ``fan_in`` everywhere.
* **Schedule** (:func:`learning_rate`): ``CosineAnnealingLR(T_max=epochs)`` stepped at the
  *start* of every epoch, so 0-based epoch :math:`e` trains with
  :math:`\eta_0 (1 + \cos(\pi (e + 1) / E)) / 2`: the last epoch uses 0 and :math:`\eta_0` is
  never used. ``ours`` uses :math:`\eta_0 (1 + \cos(\pi e / E)) / 2`.
* **BatchNorm** running statistics follow every forward the seed code runs (``bn_update="all"``;
  see :class:`BatchStatistics` for the forwards at ``w`` it repeats).
* **ImbSAM** with group means (``group_reduction="group"``, ``tail_scale=1``).
* **Evaluation** (:func:`selects_best`): the test set every 10th epoch, the best mean per-class
  accuracy kept as ``best.pt`` and re-evaluated with flip test-time augmentation at the end;
  reported as *test-selected*, beside the final checkpoint's accuracy.

Example:
    >>> round(learning_rate("seed", 0.01, 0, 200), 8), learning_rate("seed", 0.01, 199, 200)
    (0.00999938, 0.0)
    >>> learning_rate("ours", 0.01, 0, 200)
    0.01
    >>> [e for e in range(30) if selects_best("seed", e)]
    [9, 19, 29]
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["learning_rate", "selects_best", "init_seed_", "BatchStatistics"]

SEED_EVAL_EVERY = 10


def learning_rate(protocol: str, base_lr: float, epoch: int, epochs: int) -> float:
    """The learning rate of 0-based ``epoch`` of ``epochs`` under cosine annealing to 0."""
    step = epoch + 1 if protocol == "seed" else epoch  # the seed steps before each epoch
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / epochs))


def selects_best(protocol: str, epoch: int) -> bool:
    """Whether 0-based ``epoch`` is one the seed code evaluates (``epoch % 10 == 9``) and may
    keep as the best-on-test checkpoint; never under ``ours``, which reports the final one."""
    return protocol == "seed" and epoch % SEED_EVAL_EVERY == SEED_EVAL_EVERY - 1


@torch.no_grad()
def init_seed_(model: nn.Module) -> nn.Module:
    """Re-initialises ``model`` in place by the seed code's rule (see the module docstring).

    The first convolution is the stem; every linear layer keeps the default initialisation
    (torchvision's rule touches only convolutions and BatchNorm, and the head is replaced).
    """
    stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    for m in model.modules():
        if isinstance(m, nn.Linear) or m is stem:
            m.reset_parameters()  # PyTorch's default: kaiming_uniform_(a=sqrt(5))
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


class BatchStatistics:
    r"""Records each BatchNorm layer's batch statistics at one forward, to replay its update.

    The seed code's SSE-SAM step runs a forward at ``w`` for each group (4 forwards a step:
    ``w``, ``w + e_head``, ``w``, ``w + e_tail``), and each one updates the running statistics.
    The repeated forwards at ``w`` see the same batch at the same weights, so their batch
    statistics are those of the first: :meth:`replay` applies the update they would make,
    :math:`r \leftarrow (1 - m)\, r + m\, s` with the batch mean and unbiased variance
    :math:`s`, without running the forward again.

    Use it as a context manager around the forward at ``w``::

        with BatchStatistics(model) as stats:
            logits = model(x)
        ...
        stats.replay()          # the running statistics as after one more forward at w
    """

    def __init__(self, model: nn.Module):
        self.norms = [m for m in model.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.stats: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * len(self.norms)
        self._hooks = []

    def __enter__(self) -> "BatchStatistics":
        for i, m in enumerate(self.norms):
            self._hooks.append(m.register_forward_pre_hook(self._recorder(i)))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _recorder(self, i: int):
        def record(module: nn.Module, args) -> None:
            if module.training:
                x = args[0].detach()
                dims = [d for d in range(x.dim()) if d != 1]
                n = x.numel() // x.shape[1]
                mean = x.mean(dims)
                var = x.var(dims, unbiased=False) * (n / max(n - 1, 1))
                self.stats[i] = (mean, var)
        return record

    @torch.no_grad()
    def replay(self, times: int = 1) -> None:
        """Applies the running-statistics update of ``times`` more forwards at the recorded
        point, exactly as ``torch.nn.BatchNorm`` would (momentum, or the cumulative average
        when ``momentum is None``)."""
        for m, stat in zip(self.norms, self.stats):
            if stat is None:
                continue
            mean, var = stat
            for _ in range(times):
                m.num_batches_tracked.add_(1)
                factor = (1.0 / float(m.num_batches_tracked) if m.momentum is None
                          else m.momentum)
                m.running_mean.mul_(1 - factor).add_(mean.to(m.running_mean.dtype), alpha=factor)
                m.running_var.mul_(1 - factor).add_(var.to(m.running_var.dtype), alpha=factor)
