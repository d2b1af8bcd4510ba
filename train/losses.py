"""Per-sample losses for long-tailed data, built from the training class counts ``n_c``.

Every loss maps ``(logits (B, C), targets (B,))`` to per-sample losses ``(B,)``
(reduction ``none``): the SAM family weighs and sums them per class group.

* ``CE``: cross-entropy.
* ``LDAM`` (Cao et al. 2019): margin ``m_c = 0.5 * n_c^(-1/4) / max_k n_k^(-1/4)``; the true
  class's logit is lowered by ``s * m_y`` with ``s = 30`` before cross-entropy. As in the
  SSE-SAM seed code the margin acts on the raw logits of a plain linear head (the original
  LDAM normalises features and weights and computes ``CE(s * (cos - m))``).
* ``VS`` (Kini et al. 2021): ``CE(z_c * Delta_c + iota_c)`` with
  ``Delta_c = (n_c / n_max)^gamma_vs`` and ``iota_c = tau * log(n_c / N)``;
  seed defaults ``gamma_vs = 0.05``, ``tau = 0.75``.
* ``LA`` (logit adjustment, Menon et al. 2021): VS with ``gamma_vs = 0``; the seed README
  calls it "VA".
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.options import LOSSES, check_choice

__all__ = ["LOSSES", "build_loss", "LDAMLoss", "VSLoss"]

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CrossEntropy(nn.Module):
    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, reduction="none")


class LDAMLoss(nn.Module):
    """Label-distribution-aware margin loss on raw logits (see module docstring)."""

    def __init__(self, counts: Sequence[int], max_margin: float = 0.5, scale: float = 30.0):
        super().__init__()
        n = torch.tensor(counts, dtype=torch.float64).clamp_min(1)
        margins = n.pow(-0.25)
        self.register_buffer("margins", (margins * (max_margin / margins.max())).float())
        self.scale = scale

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        shift = self.scale * self.margins.to(logits.dtype)[targets]
        adjusted = logits - F.one_hot(targets, logits.shape[1]).to(logits.dtype) * shift[:, None]
        return F.cross_entropy(adjusted, targets, reduction="none")


class VSLoss(nn.Module):
    """Vector-scaling loss ``CE(z * Delta + iota)``; ``gamma_vs = 0`` is logit adjustment."""

    def __init__(self, counts: Sequence[int], gamma_vs: float = 0.05, tau: float = 0.75):
        super().__init__()
        n = torch.tensor(counts, dtype=torch.float64).clamp_min(1)
        self.register_buffer("delta", (n / n.max()).pow(gamma_vs).float())
        self.register_buffer("iota", (tau * torch.log(n / n.sum())).float())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        adjusted = logits * self.delta.to(logits.dtype) + self.iota.to(logits.dtype)
        return F.cross_entropy(adjusted, targets, reduction="none")


class LossError(ValueError):
    """An unknown loss name."""


def build_loss(name: str, counts: Sequence[int], gamma_vs: float = 0.05,
               tau: float = 0.75) -> nn.Module:
    """The per-sample loss ``name`` for a training set with class counts ``counts``."""
    if name == "VA":  # the seed README's name of LA
        name = "LA"
    check_choice("loss", name, LossError)
    if name == "CE":
        return CrossEntropy()
    if name == "LDAM":
        return LDAMLoss(counts)
    if name == "VS":
        return VSLoss(counts, gamma_vs=gamma_vs, tau=tau)
    return VSLoss(counts, gamma_vs=0.0, tau=tau)  # LA
