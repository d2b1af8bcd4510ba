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

A *selection* (``select``: ``fnmatch`` patterns on the names) is the layout of a subset of the
parameters, in the same order; ``positions`` places its flat vectors inside the whole layout's,
and ``blocks`` names the top-level modules that hold parameters:

>>> sub = layout.select("1.*")
>>> sub.names, sub.n, layout.positions(sub).tolist()
(('1.weight', '1.bias'), 3, [8, 9, 10])
>>> layout.embed(sub, torch.ones(3)).tolist()
[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
>>> layout.blocks()
{'0': ('0.*',), '1': ('1.*',)}
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from landscape.errors import AnalysisError

__all__ = ["ParamLayout", "parse_patterns"]

Patterns = Union[str, Sequence[str]]


def parse_patterns(patterns: Patterns) -> tuple[str, ...]:
    """``"layer4.*,fc.*"`` or ``["layer4.*", "fc.*"]`` -> ``("layer4.*", "fc.*")``.

    Raises:
        AnalysisError: no pattern, or an empty one (``"fc.*,"``).
    """
    items = patterns.split(",") if isinstance(patterns, str) else list(patterns)
    items = [str(item).strip() for item in items]
    if not items or not all(items):
        raise AnalysisError(f"params {patterns!r}: an empty pattern (give globs such as "
                            "layer4.*,fc.*)")
    return tuple(items)


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

    def select(self, patterns: Patterns) -> "ParamLayout":
        """The layout of the parameters whose names match any of ``patterns``
        (:func:`parse_patterns`; ``fnmatch`` globs, case-sensitive: ``*`` also matches dots),
        in this layout's order.

        Raises:
            AnalysisError: a bad pattern list, or no parameter matches (the message lists the
                top-level blocks there are).
        """
        wanted = parse_patterns(patterns)
        keep = [i for i, name in enumerate(self.names)
                if any(fnmatch.fnmatchcase(name, pattern) for pattern in wanted)]
        if not keep:
            raise AnalysisError(f"params {','.join(wanted)}: no parameter matches (top-level "
                                f"blocks: {', '.join(self.blocks()) or 'none'})")
        return ParamLayout(tuple(self.names[i] for i in keep), tuple(self.shapes[i] for i in keep))

    def positions(self, sub: "ParamLayout") -> torch.Tensor:
        """Indices of ``sub``'s flat entries in this layout's flat vector (``sub`` a
        :meth:`select` of this layout)."""
        where = dict(zip(self.names, zip(self.offsets, self.sizes)))
        missing = [name for name in sub.names if name not in where]
        if missing:
            raise ValueError(f"parameter {missing[0]!r} is not in the layout")
        return torch.cat([torch.arange(where[name][0], where[name][0] + where[name][1])
                          for name in sub.names])

    def embed(self, sub: "ParamLayout", flat: torch.Tensor) -> torch.Tensor:
        """``sub``'s flat vector(s) ``(..., sub.n)`` -> this layout's, zero elsewhere."""
        out = flat.new_zeros(*flat.shape[:-1], self.n)
        out[..., self.positions(sub).to(flat.device)] = flat
        return out

    def blocks(self) -> dict[str, tuple[str, ...]]:
        """``{block: patterns}`` of the top-level blocks holding parameters, in order: a
        top-level module ``name`` gives ``("name.*",)``, a parameter of the root module its own
        name."""
        out: dict[str, tuple[str, ...]] = {}
        for name in self.names:
            head, dot, _ = name.partition(".")
            out.setdefault(head, (f"{head}.*",) if dot else (name,))
        return out

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
