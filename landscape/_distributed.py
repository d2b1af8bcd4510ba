"""Sharing the analysis between ``torchrun`` processes; every function is a no-op for one process.

    torchrun --standalone --nproc_per_node 2 -m landscape hessian RUN --group tail --json out.json
    torchrun --standalone --nproc_per_node 2 -m landscape surface RUN --grid 51 --out surf/

* Hessian-vector products (``landscape.hvp.GroupHessian``): rank ``r`` processes its
  contiguous share of the group's samples (:func:`sample_range`); the partial products, losses
  and gradients are summed over the ranks (:func:`sum_`). Every rank then holds the same
  product, so Lanczos, SLQ and the trace estimators (whose random vectors come from seeded
  generators) run identically on every rank, with the same numbers as one process up to the
  rounding of a differently ordered sum.
* Surfaces (``landscape.surface.compute_surface``): of each block of grid points, point ``i``
  is evaluated by rank ``i % world`` and the values are gathered on every rank
  (:func:`evaluate_shared`); a point's value does not depend on which rank computed it.
* Independent items (``landscape.classes``: one class each): item ``i`` is computed by rank
  ``i % world`` on its own (:func:`map_shared`: within it :func:`sample_range` is every sample
  and :func:`sum_` sums nothing), and the results are gathered on every rank.
* Files are written by rank 0 only (:func:`is_writer`).

The process group is the one of ``train.distributed`` (NCCL on CUDA with ``cuda:LOCAL_RANK``,
gloo on the CPU).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from train import distributed as _train

__all__ = ["setup", "world", "rank", "is_writer", "barrier", "sample_range", "sum_",
           "evaluate_shared", "map_shared"]

world = _train.world
rank = _train.rank
is_writer = _train.is_main
barrier = _train.barrier
_alone = [False]  # inside map_shared: this rank works on its own items with all their samples


def setup(device: Optional[str]) -> Optional[str]:
    """Initialises the process group when launched by torchrun; returns this rank's device
    (``cuda:LOCAL_RANK`` or ``cpu``), or ``None`` when not launched by torchrun."""
    return _train.setup(device or "auto")


def sample_range(n: int) -> tuple[int, int]:
    """``[start, stop)`` of this rank's contiguous share of ``n`` samples (all of them alone)."""
    return (0, n) if _alone[0] else _train.shard_bounds(n, world(), rank())


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over the ranks in place and returns it (unchanged for one process)."""
    if world() > 1 and not _alone[0]:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def evaluate_shared(evaluate: Callable[[np.ndarray], tuple[np.ndarray, ...]],
                    coords: np.ndarray) -> tuple[np.ndarray, ...]:
    """``evaluate(coords)`` with the points shared out: rank ``r`` evaluates rows
    ``r, r + world, ...``; the results are gathered so that every rank returns the arrays
    one process would (row ``i`` of each result belongs to point ``i``)."""
    if world() <= 1 or len(coords) == 0:
        return evaluate(coords)
    mine = np.arange(rank(), len(coords), world())
    parts = evaluate(coords[mine]) if len(mine) else None
    gathered: list = [None] * world()
    dist.all_gather_object(gathered, parts)
    results = []
    for k in range(len(next(p for p in gathered if p is not None))):
        first = next(p[k] for p in gathered if p is not None)
        out = np.empty((len(coords), *first.shape[1:]), dtype=first.dtype)
        for r, p in enumerate(gathered):
            if p is not None:
                out[r::world()] = p[k]
        results.append(out)
    return tuple(results)


@contextmanager
def _on_my_own() -> Iterator[None]:
    _alone[0] = True
    try:
        yield
    finally:
        _alone[0] = False


def map_shared(compute: Callable, items: Sequence) -> list:
    """``[compute(item) for item in items]`` with the items shared out: rank ``r`` computes items
    ``r, r + world, ...`` on its own (no collective inside ``compute``), and every rank returns
    the whole list (the results are gathered; they must be picklable)."""
    if world() <= 1:
        return [compute(item) for item in items]
    with _on_my_own():
        mine = {i: compute(items[i]) for i in range(rank(), len(items), world())}
    gathered: list = [None] * world()
    dist.all_gather_object(gathered, mine)
    merged = {i: result for part in gathered for i, result in part.items()}
    return [merged[i] for i in range(len(items))]
