"""The batches of one epoch for one rank, exact on resume: a DataLoader batch sampler.

An epoch's global order is the cached path's: ``torch.randperm(n, generator=
train.data.epoch_generator(seed, epoch))`` for training, ``0 .. n-1`` for testing. Global batch
``k`` is ``order[k * B:(k + 1) * B]`` (the last may be short); rank ``r`` of ``W`` takes its
``r``-th near-equal contiguous part (``torch.tensor_split``, as ``train_batches(shard=)``; a
part may be empty). Starting at batch ``k`` yields exactly batches ``k, k + 1, ...`` of the
uninterrupted epoch. Every item is ``(epoch, index)``, so that persistent workers know the
epoch of the sample they decode without any state of theirs.

Example:
    >>> batches = EpochBatches(10, 4, seed=0, shuffle=False, rank=1, world=2)
    >>> list(batches)
    [[(0, 2), (0, 3)], [(0, 6), (0, 7)], [(0, 9)]]
    >>> batches.set_epoch(3, start_batch=2)
    >>> list(batches), len(batches)
    ([[(3, 9)]], 1)
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from train.data import DataError, epoch_generator

__all__ = ["EpochBatches"]


class EpochBatches(Sampler):
    """Rank ``rank``'s part of every global batch of ``batch_size``, from ``start_batch`` on.

    Args:
        n: number of samples of the split.
        batch_size: the global batch size (over all ranks).
        seed: the run's seed; with ``shuffle`` the order is drawn from ``(seed, epoch)``.
        shuffle: training order (shuffled) or test order (file order).
        rank, world: this process and the number of processes (torchrun).
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, shuffle: bool, rank: int = 0,
                 world: int = 1):
        if n < 1 or batch_size < 1:
            raise DataError(f"need n >= 1 and batch_size >= 1, got n={n}, "
                            f"batch_size={batch_size}")
        if world < 1 or not 0 <= rank < world:
            raise DataError(f"rank {rank} is not one of world {world}")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.n // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the epoch and the first global batch the next iteration yields."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise DataError(f"start batch {start_batch} outside 0..{self.batches_per_epoch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def order(self) -> torch.Tensor:
        """The epoch's global order of sample indices."""
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch))

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order()
        for k in range(self.start_batch, self.batches_per_epoch):
            batch = order[k * self.batch_size:(k + 1) * self.batch_size]
            part = batch.tensor_split(self.world)[self.rank]
            yield [(self.epoch, i) for i in part.tolist()]
