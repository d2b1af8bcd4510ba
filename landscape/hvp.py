"""A class group's loss and its Hessian-vector product, as an operator on flat parameter vectors.

For a group ``G`` of classes with evaluation samples ``(x_i, y_i), i = 1..N`` (every sample of
the group in the chosen split, not augmented, model in eval mode so that BatchNorm uses its
running statistics), the group loss is the plain mean

.. math::  L_G(w) = \\frac{1}{N} \\sum_{i=1}^{N} \\ell(f(x_i; w), y_i),

and the operator is :math:`v \\mapsto H v` with :math:`H = \\nabla^2 L_G(w)`. The samples are
processed in batches ``B_1, ..., B_b``; each batch contributes
:math:`\\nabla^2 \\big(\\frac{1}{N} \\sum_{i \\in B_j} \\ell_i\\big) v`, i.e. its HVP weighted by
``|B_j| / N``, so the sum is exactly the HVP of the mean loss whatever the batch size (up to
floating-point rounding).

The samples are tensors, or a lazy source (``targets=None``): any object with ``len`` (``N``)
and ``batches(batch_size, start, stop)`` yielding the normalised ``(x, y)`` of samples
``start .. stop - 1``, such as a streamed run's :class:`train.stream.StreamSamples`
(:meth:`landscape.load.Run.group_samples`); its batches are read again on every pass, so only
one batch is in memory, and the weighting above is unchanged.

Vectors are flat, in the layout of :class:`landscape.layout.ParamLayout` (the trainable
parameters of ``model.named_parameters()`` in that order, each flattened). With ``params``
(``fnmatch`` globs on the names, e.g. ``"layer4.*,fc.*"``), the operator is the block
:math:`H_{SS} = \nabla^2_{w_S} L_G(w)` of the selected parameters :math:`S`, every other
parameter fixed at its value; its vectors are in the selection's layout (``layout``,
:meth:`landscape.layout.ParamLayout.select`; ``full_layout.embed`` places them in the whole).

How the HVP is computed (``method``; ``bench/bench_hessian.py`` compares them, figures in
BENCHMARKS.md, "Hessian analysis"):

* ``"double-backward"`` (reverse-over-reverse): one forward, one backward with
  ``create_graph=True`` for the gradient, then one backward of ``<grad, v>``. A block of ``k``
  vectors reuses the same gradient graph: ``k`` extra backward passes, vectorised with
  ``is_grads_batched=True``.
* ``"forward-over-reverse"``: ``torch.func.jvp`` of ``torch.func.grad``, ``vmap``-ed over the
  columns of a block.

``"double-backward"`` is the default, by that measurement, and so is keeping the single
batch's gradient graph between products (``cache_graph``).

>>> import torch
>>> model = torch.nn.Linear(3, 2)
>>> x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
>>> op = GroupHessian(model, torch.nn.CrossEntropyLoss(reduction="none"), x, y)
>>> op.n_params, tuple(op.matmat(torch.eye(op.n_params, dtype=torch.float64)).shape), op.hvps
(8, (8, 8), 8)
>>> GroupHessian(model, torch.nn.CrossEntropyLoss(reduction="none"), x, y, params="bias").n_params
2
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from scipy.sparse.linalg import LinearOperator
from torch.func import functional_call

from landscape import _distributed
from landscape.layout import ParamLayout, Patterns, parse_patterns
from landscape.options import HVP_METHODS

__all__ = ["GroupHessian", "HVP_METHODS", "DEFAULT_METHOD", "default_batch_size"]

DEFAULT_METHOD = "double-backward"

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_batch_size(n_samples: int, device: torch.device) -> int:
    """The batch size used when none is given: the whole group on a GPU (halved on
    out-of-memory, see :meth:`GroupHessian.matmat`), at most 1024 samples on a CPU, where larger
    batches gain nothing and only cost memory."""
    if device.type == "cuda":
        return max(1, n_samples)
    return max(1, min(n_samples, 1024))


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error))


class GroupHessian:
    """The Hessian of a group's mean loss at the model's weights, as a matrix-free operator.

    Args:
        model: the network; it is copied, cast to ``dtype`` and put in eval mode (the caller's
            module is left untouched).
        loss_fn: per-sample loss ``(logits, targets) -> (B,)``.
        inputs: the group's samples (already normalised, not augmented), or a lazy source of
            them (module docstring) with ``targets=None``.
        targets: their class ids.
        batch_size: samples per forward pass (default :func:`default_batch_size`). Results do not
            depend on it beyond rounding.
        dtype: computation dtype of parameters, inputs and products (default float64).
        method: ``"double-backward"`` or ``"forward-over-reverse"`` (see module docstring).
        progress: called with the number of HVPs after each product (e.g. ``tqdm.update``).
        cache_graph: with ``"double-backward"``, when all samples are one batch, keep that
            batch's gradient graph between products, so that each product is one backward pass
            instead of a forward and two backward passes. The graph is what one product holds at
            its peak anyway, so this costs no extra peak memory; with several batches it would
            (every batch's graph), and it is not done. Default True.
        params: ``fnmatch`` patterns (a comma-separated string or a list) of the parameters
            whose Hessian block is wanted; the others stay fixed (default: all of them).

    The weights are those of ``model`` at construction (``params``; not to be reassigned once
    products have been taken, as a cached graph would keep the old ones).

    Attributes:
        layout: the layout of the operator's vectors (the selection with ``params``).
        full_layout: the layout of all the model's trainable parameters.
        param_patterns: the ``params`` patterns, parsed (``None``: all parameters).
        n_params: length of the flat parameter vector.
        n_samples: ``N``, the number of samples averaged over.
        hvps: Hessian-vector products computed so far (a block of ``k`` vectors counts ``k``).
    """

    def __init__(self, model: nn.Module, loss_fn: PerSampleLoss, inputs,
                 targets: Optional[torch.Tensor], *, batch_size: Optional[int] = None,
                 dtype: torch.dtype = torch.float64, method: str = DEFAULT_METHOD,
                 progress: Optional[Callable[[int], object]] = None,
                 cache_graph: bool = True, params: Optional[Patterns] = None):
        if method not in HVP_METHODS:
            raise ValueError(f"unknown HVP method {method!r} "
                             f"(choose from {', '.join(HVP_METHODS)})")
        self.source = inputs if targets is None else None
        if self.source is None and inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"{inputs.shape[0]} inputs but {targets.shape[0]} targets")
        if (len(self.source) if self.source is not None else inputs.shape[0]) == 0:
            raise ValueError("the group has no samples")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dtype = dtype
        self.method = method
        self.progress = progress
        # A private copy: casting to float64 and eval mode must not change the caller's model.
        self._model = copy.deepcopy(model).to(dtype=dtype).eval()
        self.device = next(iter(self._model.parameters())).device
        self.full_layout = ParamLayout.of(self._model)
        self.layout = self.full_layout if params is None else self.full_layout.select(params)
        self.param_patterns = None if params is None else parse_patterns(params)
        for name, p in self._model.named_parameters():  # the fixed ones: no gradient graph
            p.requires_grad_(name in self.layout.names)
        self.params = [p.detach() for p in self.layout.parameters(self._model)]
        self.buffers = {name: b for name, b in self._model.named_buffers()}
        self.n_params = self.layout.n
        self.loss_fn = loss_fn
        if self.source is None:
            self.inputs = inputs.to(self.device, dtype)
            self.targets = targets.to(self.device)
        self.n_samples = len(self.source) if self.source is not None else int(inputs.shape[0])
        self.batch_size = int(batch_size) if batch_size else default_batch_size(
            self.n_samples, self.device)
        self.hvps = 0
        self.cache_graph = bool(cache_graph)
        self._graph = None  # (params, grads) of the single batch, see cache_graph
        self.classes: Optional[list[int]] = None  # set by from_run
        self.loss_name: Optional[str] = None

    # Construction from a checkpoint ---------------------------------------------------------

    @classmethod
    def from_run(cls, run, group, split: str = "train", loss: Optional[str] = None,
                 batch_size: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                 method: str = DEFAULT_METHOD,
                 progress: Optional[Callable[[int], object]] = None,
                 cache_graph: bool = True, params: Optional[Patterns] = None
                 ) -> "GroupHessian":
        """The operator of ``run``'s loss restricted to ``group`` (``head``, ``tail``, ``all`` or
        class ids) over every ``split`` sample of the group; ``loss`` defaults to the run's;
        ``params`` selects a Hessian block (see the class). A streamed run's samples are read
        in batches from its files (:meth:`landscape.load.Run.group_samples`)."""
        if getattr(run, "streamed", False):
            inputs, targets = run.group_samples(group, split), None
        else:
            inputs, targets = run.group_data(group, split)
        op = cls(run.model, run.loss_fn(loss), inputs, targets, batch_size=batch_size,
                 dtype=dtype or torch.float64, method=method, progress=progress,
                 cache_graph=cache_graph, params=params)
        op.classes = run.classes(group)
        op.loss_name = loss or run.config.loss
        return op

    # Flat vectors <-> parameter-shaped lists ----------------------------------------------------

    def parameter_vector(self) -> torch.Tensor:
        """The weights ``w`` as one flat vector (:attr:`layout`)."""
        return self.layout.flatten(self.params)

    def _batches(self, batch_size: int):
        # Under torchrun, this rank's share of the samples only; the sums over batches are
        # then summed over the ranks (landscape._distributed).
        first, stop = _distributed.sample_range(self.n_samples)
        if self.source is not None:
            for x, y in self.source.batches(batch_size, first, stop):
                yield x.to(self.device, self.dtype), y.to(self.device)
            return
        for start in range(first, stop, batch_size):
            end = min(start + batch_size, stop)
            yield self.inputs[start:end], self.targets[start:end]

    def _batch_loss(self, params: Sequence[torch.Tensor], x: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
        """``sum_{i in batch} l_i / N``: the batch's share of the group mean."""
        state = {**self.layout.named(params), **self.buffers}
        logits = functional_call(self._model, state, (x,))
        return self.loss_fn(logits, y).sum() / self.n_samples

    # The loss and its gradient -----------------------------------------------------------------

    def loss(self) -> float:
        """The group's mean loss ``L_G(w)``."""
        with torch.no_grad():
            total = torch.zeros((), dtype=self.dtype, device=self.device)
            for x, y in self._batches(self.batch_size):
                total += self._batch_loss(self.params, x, y)
            return float(_distributed.sum_(total))

    def gradient(self) -> torch.Tensor:
        """``grad L_G(w)`` as a flat vector."""
        total = torch.zeros(self.n_params, dtype=self.dtype, device=self.device)
        for x, y in self._batches(self.batch_size):
            params = [p.clone().requires_grad_(True) for p in self.params]
            grads = torch.autograd.grad(self._batch_loss(params, x, y), params)
            total += self.layout.flatten(grads)
        return _distributed.sum_(total)

    # Hessian-vector products -----------------------------------------------------------------

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` of length ``n_params``."""
        return self.matmat(v.reshape(-1, 1)).reshape(-1)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` for ``V`` of shape ``(n_params, k)``: ``k`` products sharing each forward pass.

        On a CUDA out-of-memory error the batch size is halved and the block recomputed.
        """
        if V.ndim != 2 or V.shape[0] != self.n_params:
            raise ValueError(f"expected shape ({self.n_params}, k), got {tuple(V.shape)}")
        columns = V.T.to(self.device, self.dtype).contiguous()  # (k, n): vmap over dim 0
        while True:
            try:
                out = self._block_product(columns, self.batch_size)
                break
            except RuntimeError as error:
                if not _is_out_of_memory(error) or self.batch_size == 1:
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.batch_size = max(1, self.batch_size // 2)
                self._graph = None
        self.hvps += V.shape[1]
        if self.progress is not None:
            self.progress(V.shape[1])
        return out.T

    def _block_product(self, columns: torch.Tensor, batch_size: int) -> torch.Tensor:
        """``(k, n)`` vectors -> ``(k, n)`` products, accumulated over batches."""
        k = columns.shape[0]
        tangents = self.layout.unflatten(columns)  # each (k, *shape)
        total = torch.zeros_like(columns)
        for x, y in self._batches(batch_size):
            if self.method == "double-backward":
                parts = self._double_backward(tangents, x, y, k)
            else:
                parts = self._forward_over_reverse(tangents, x, y)
            total += self.layout.flatten(parts)
        return _distributed.sum_(total)

    def _gradient_graph(self, x, y):
        """``(params, grads)`` with the graph of ``grads`` kept for differentiation; reused
        across products when the whole share of samples is one batch (see ``cache_graph``)."""
        if self._graph is not None:
            return self._graph
        params = [p.clone().requires_grad_(True) for p in self.params]
        grads = torch.autograd.grad(self._batch_loss(params, x, y), params, create_graph=True)
        first, stop = _distributed.sample_range(self.n_samples)
        if self.cache_graph and stop - first <= self.batch_size:
            self._graph = (params, grads)
        return params, grads

    def _double_backward(self, tangents, x, y, k):
        params, grads = self._gradient_graph(x, y)
        keep = self._graph is not None
        if k == 1:
            products = torch.autograd.grad(grads, params, [t[0] for t in tangents],
                                           allow_unused=True, retain_graph=keep)
            return [torch.zeros_like(p) if h is None else h.unsqueeze(0)
                    for p, h in zip(params, products)]
        # One graph for the gradient, k vector-Jacobian products of it, vectorised.
        products = torch.autograd.grad(grads, params, tangents, is_grads_batched=True,
                                       allow_unused=True, retain_graph=keep)
        return [torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) if h is None else h
                for p, h in zip(params, products)]

    def _forward_over_reverse(self, tangents, x, y):
        params = tuple(self.params)

        def gradient(*ps):
            return torch.func.grad(lambda *q: self._batch_loss(q, x, y),
                                   argnums=tuple(range(len(ps))))(*ps)

        def product(*ts):
            return torch.func.jvp(gradient, params, ts)[1]

        with warnings.catch_warnings():
            # Forward-mode AD loads torch's own jvp decompositions through torch.jit.script on
            # first use, which warns that torch.jit.script is deprecated: torch's concern, not
            # the caller's.
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*",
                                    category=DeprecationWarning)
            if tangents[0].shape[0] == 1:
                return [h.unsqueeze(0) for h in product(*[t[0] for t in tangents])]
            return list(torch.func.vmap(product)(*tangents))

    # SciPy -----------------------------------------------------------------------------------

    def as_linear_operator(self) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out) over this operator;
        its products count in :attr:`hvps` too."""

        def matvec(v):
            v = torch.as_tensor(np.asarray(v, dtype=np.float64).reshape(-1))
            return self.matvec(v).detach().cpu().double().numpy()

        def matmat(V):
            V = torch.as_tensor(np.asarray(V, dtype=np.float64))
            return self.matmat(V).detach().cpu().double().numpy()

        n = self.n_params
        return LinearOperator((n, n), matvec=matvec, rmatvec=matvec, matmat=matmat,
                              dtype=np.float64)

    def __repr__(self) -> str:
        return (f"GroupHessian(n_params={self.n_params}, n_samples={self.n_samples}, "
                f"batch_size={self.batch_size}, dtype={self.dtype}, method={self.method!r})")
