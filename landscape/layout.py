"""The flat parameter layout every analysis shares: Hessian-vector products, Lanczos vectors,
directions, surfaces and the trajectory PCA.

A model's *trainable* parameters, in the order of ``model.named_parameters()``, each flattened
and concatenated (the layout of ``torch.nn.utils.parameters_to_vector``). Entry ``offsets[i]``
to ``offsets[i] + sizes[i]`` of a flat vector belongs to parameter ``names[i]``; a flat vector
may carry leading batch dimensions, ``(..., n)``.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
>>> layout = ParamLayout.of(model)
>>> layout.names
('0.weight', '0.bias', '1.weight', '1.bias')
>>> layout.shapes, layout.offsets, layout.n
(((2, 3), (2,), (1, 2), (1,)), (0, 6, 8, 10), 11)
>>> w = layout.flatten(model.parameters())
>>> [tuple(t.shape) for t in layout.unflatten(torch.zeros(5, layout.n))]
[(5, 2, 3), (5, 2), (5, 1, 2), (5, 1)]
>>> torch.equal(layout.unflatten(w)[2], model[1].weight)
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["ParamLayout"]


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of a model's trainable parameters, and flat vectors over them.

    Attributes:
        names: parameter names, in the order of ``model.named_parameters()``.
        shapes: their shapes.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> "ParamLayout":
        """The layout of ``model``'s parameters that require gradients."""
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        return cls(tuple(name for name, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Where each parameter starts in a flat vector."""
        starts, total = [], 0
        for size in self.sizes:
            starts.append(total)
            total += size
        return tuple(starts)

    @property
    def n(self) -> int:
        """Length of a flat vector."""
        return sum(self.sizes)

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """``model``'s parameters in this layout's order (checked against its names)."""
        found = dict(model.named_parameters())
        missing = [name for name in self.names if name not in found]
        if missing:
            raise ValueError(f"the model has no parameter {missing[0]!r} (another model?)")
        return [found[name] for name in self.names]

    def flatten(self, tensors: Iterable[torch.Tensor], dtype: Optional[torch.dtype] = None,
                device=None) -> torch.Tensor:
        """Per-parameter tensors of shapes ``(..., *shape)`` -> one ``(..., n)`` tensor (a copy,
        detached), optionally cast to ``dtype`` and moved to ``device``."""
        parts = [t.detach() for t in tensors]
        if len(parts) != len(self.shapes):
            raise ValueError(f"{len(parts)} tensors for a layout of {len(self.shapes)} parameters")
        lead = parts[0].shape[:parts[0].dim() - len(self.shapes[0])]
        return torch.cat([t.to(device=device, dtype=dtype).reshape(*lead, size)
                          for t, size in zip(parts, self.sizes)], dim=-1)

    def flatten_state(self, state: Mapping[str, torch.Tensor],
                      dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The flat vector of a ``state_dict`` (a checkpoint's ``"model"``), by name.

        Raises:
            KeyError: a parameter of the layout is not in ``state``.
        """
        missing = [name for name in self.names if name not in state]
        if missing:
            raise KeyError(missing[0])
        return self.flatten([state[name] for name in self.names], dtype=dtype)

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``(..., n)`` -> per-parameter views of shapes ``(..., *shape)``."""
        if flat.shape[-1] != self.n:
            raise ValueError(f"a flat vector of {flat.shape[-1]} entries for {self.n} parameters")
        lead = flat.shape[:-1]
        return [chunk.reshape(*lead, *shape)
                for chunk, shape in zip(torch.split(flat, self.sizes, dim=-1), self.shapes)]

    def named(self, flat_or_parts) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` of a flat vector (its views) or of per-parameter tensors, as
        ``torch.func.functional_call`` takes them."""
        parts = (self.unflatten(flat_or_parts) if isinstance(flat_or_parts, torch.Tensor)
                 else list(flat_or_parts))
        return dict(zip(self.names, parts))

    def share_storage(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """Makes ``params`` views into one new flat buffer holding their values, and returns it:
        writing the buffer (``buffer.copy_(w)``) then moves every parameter at once."""
        buffer = self.flatten(params).clone()
        for p, view in zip(params, self.unflatten(buffer)):
            p.data = view
        return buffer
