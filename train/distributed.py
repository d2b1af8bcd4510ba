"""Data parallelism with ``torchrun``: process-group set-up and the few collectives training needs.

Launch::

    torchrun --nproc_per_node 2 -m train --dataset cifar100 --opt ssesam --out checkpoints/c100

``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`setup` reads them and calls ``torch.distributed.init_process_group`` with NCCL when the
run is on CUDA (one GPU per process, ``cuda:LOCAL_RANK``) and gloo on the CPU. Without those
variables nothing is initialised and every helper here behaves as for one process
(:func:`world` is 1, :func:`is_main` is true, the reductions do nothing).

How the trainer uses it (``train/loop.py``):

* Every rank draws the same global permutation and the same augmentation numbers from the
  ``(seed, epoch)`` generator, so every rank knows every global batch; rank ``r`` keeps the
  ``r``-th of ``world`` near-equal contiguous parts of it (``torch.tensor_split``).
* Each rank weighs its samples by ``1 / global batch size`` (group means: by the global group
  size, one tiny all-reduce), so that the SUM over ranks of the local group gradients is the
  global group gradient exactly, also for an uneven last batch. The group-SAM step therefore
  reduces gradients with :func:`all_reduce_sum`; perturbations use the global group gradients
  and one global norm per group, as with one process.
* Parameters are broadcast from rank 0 once at the start; after that every rank applies the
  same reduced gradient, so they stay equal.
* BatchNorm uses per-rank batch statistics (as ``DistributedDataParallel`` does without
  ``SyncBatchNorm``); the running statistics are averaged over ranks at the end of every epoch,
  so evaluation and checkpoints are the same whichever rank computes them. A model with
  BatchNorm therefore trains slightly differently with 2 ranks than with 1; a model without it
  (``mlp``) trains the same, to float rounding.
* Only rank 0 writes the run folder (``is_writer``); every rank evaluates the (identical) model.
  Every rank reads the folder (``--resume``) and the dataset, so on several machines both must
  be on a shared file system, and CIFAR should be downloaded before the launch.

``SyncBatchNorm`` is not offered: its kernels run on GPUs only (no CPU test of it is possible
here), and the SAM family's extra forwards at perturbed weights would each add a collective per
BatchNorm layer. Multi-GPU numbers are not measured yet.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["setup", "cleanup", "launched", "is_distributed", "world", "rank", "local_rank",
           "is_main", "barrier", "all_reduce_sum", "all_reduce_mean", "broadcast_module",
           "average_buffers", "shard_bounds",
           "DistributedError"]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """The torchrun environment cannot be used as asked (e.g. more ranks than GPUs)."""


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (its environment variables are set)."""
    return all(name in os.environ for name in _ENV)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0)."""
    return rank() == 0


def setup(device: str = "auto", timeout_s: float = 1800.0) -> Optional[str]:
    """Initialises the process group from torchrun's variables; returns the device to train on.

    Args:
        device: the run's ``--device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
        timeout_s: how long a collective may wait for the other ranks.

    Returns:
        ``None`` when not launched by torchrun (nothing done); else the device name for this
        rank: ``cuda:LOCAL_RANK`` for ``auto`` / ``cuda`` when CUDA is available, ``cpu``
        otherwise. NCCL is used for CUDA, gloo for the CPU.
    """
    if not launched():
        return None
    if is_distributed():
        return _device_name(device)
    name = _device_name(device)
    backend = "nccl" if name.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(name))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            **({"device_id": torch.device(name)} if backend == "nccl" else {}))
    return name


def _device_name(device: str) -> str:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if device in ("auto", "cuda"):
        if not torch.cuda.is_available():
            raise DistributedError("device cuda asked for, but CUDA is not available")
        if local >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} "
                                   "GPUs on this machine: use --nproc_per_node <= GPUs")
        return f"cuda:{local}"
    if device.startswith("cuda:"):
        raise DistributedError("under torchrun each rank takes cuda:LOCAL_RANK; pass --device "
                               "cuda or auto, not a fixed GPU")
    return device


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed() and world() > 1:
        dist.barrier()


def _coalesced(tensors: Sequence[torch.Tensor], collective) -> None:
    """Runs ``collective(flat)`` in place once per dtype on the flattened ``tensors`` and copies
    the result back: one collective per dtype instead of one per tensor."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        collective(flat)
        torch._foreach_copy_(group, [part.view_as(t) for part, t in
                                     zip(flat.split([t.numel() for t in group]), group)])


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sums each tensor over the ranks, in place (nothing happens with one process)."""
    if world() > 1 and len(tensors):
        _coalesced(tensors, lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM))


def all_reduce_mean(tensors: Sequence[torch.Tensor]) -> None:
    """Averages each (floating-point) tensor over the ranks, in place."""
    if world() > 1 and len(tensors):
        _coalesced(tensors, lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
        torch._foreach_div_(list(tensors), float(world()))


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copies rank ``src``'s parameters and buffers to every rank (what DDP does at start)."""
    if world() <= 1:
        return
    with torch.no_grad():
        tensors = [p.data for p in module.parameters()] + list(module.buffers())
        _coalesced(tensors, lambda flat: dist.broadcast(flat, src=src))


def average_buffers(module: nn.Module) -> None:
    """Averages the floating-point buffers (BatchNorm running statistics) over the ranks.

    Integer buffers (``num_batches_tracked``) are the same on every rank and are left alone.
    """
    if world() <= 1:
        return
    floats = [b for b in module.buffers() if b.is_floating_point()]
    with torch.no_grad():
        all_reduce_mean(floats)


def shard_bounds(size: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` of ``range(size)``, split as ``torch.tensor_split``
    splits it."""
    base, extra = divmod(size, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)
