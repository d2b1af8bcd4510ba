"""Long-tailed datasets, head/tail groups, and on-device mini-batches with batched augmentation.

Class ``c`` of ``C`` keeps ``n_c = int(n_max * (1 / IF) ** (c / (C - 1)))`` training images,
where ``IF`` is the imbalance factor (``n_0 / n_{C-1}``). The test set stays balanced.

Three datasets:

* ``cifar10`` / ``cifar100``: the standard CIFAR python batches, read from ``data_dir`` (or
  downloaded by torchvision where the network allows). ``n_max`` is 5000 / 500.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images), real data that needs
  no network. The last 50 images of every class (file order) are the balanced test set; the
  first 120 or more of the rest form the training pool, so ``n_max = 120``.

Images are kept as ``uint8`` on the device. Augmentation (random crop with zero padding, then a
horizontal flip) is drawn per image and applied to a whole batch by one gather, and
normalisation follows, so a batch costs a handful of tensor ops and no Python loop over images.
All randomness comes from ``torch.Generator`` objects seeded from ``(seed, epoch)``: an epoch's
order and augmentation are a pure function of the run's seed and the epoch number, which makes
resuming exact without saving generator states.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from train.options import check_choice

__all__ = [
    "DatasetSpec",
    "SPECS",
    "LongTailData",
    "class_counts",
    "split_groups",
    "accuracy_splits",
    "load_dataset",
    "augment", "draw_augmentation", "apply_augmentation",
    "normalize",
    "train_batches",
    "epoch_generator",
]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
# Pixel mean and standard deviation of all 1,797 scikit-learn digits, scaled to [0, 1].
DIGITS_MEAN = (0.30526028624095713,)
DIGITS_STD = (0.3760492217920148,)
DIGITS_TEST_PER_CLASS = 50


class DataError(ValueError):
    """A dataset cannot be built from the given arguments or files."""


@dataclass(frozen=True)
class DatasetSpec:
    """What is fixed about a dataset: shape, class profile, normalisation and augmentation.

    Attributes:
        many_above: a class is in the "many" accuracy split when its train count is above this.
        few_below: a class is in the "few" split when its train count is below this.
        pixel_scale: raw pixel value that maps to 1.0 (255 for CIFAR, 16 for digits).
        pad: zero padding of the random crop, in pixels (0: no crop).
        flip: whether training images are flipped horizontally at random.
        default_eta: the tail threshold ``--eta`` when none is given.
        default_model: the ``--model`` when none is given.
        default_lr, default_epochs: ``--lr`` and ``--epochs`` when none is given.
    """

    name: str
    num_classes: int
    n_max: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixel_scale: float
    pad: int
    flip: bool
    many_above: int
    few_below: int
    default_eta: int
    default_model: str = "resnet32"
    default_lr: float = 0.01
    default_epochs: int = 200


SPECS = {
    "cifar10": DatasetSpec("cifar10", 10, 5000, (3, 32, 32), CIFAR_MEAN, CIFAR_STD, 255.0, 4, True,
                           many_above=1000, few_below=200, default_eta=100),
    "cifar100": DatasetSpec("cifar100", 100, 500, (3, 32, 32), CIFAR_MEAN, CIFAR_STD, 255.0, 4,
                            True, many_above=100, few_below=20, default_eta=100),
    # Digits are not mirror-symmetric, so no flip; a 1-pixel shift is the 8x8 analogue of 4/32.
    "digits": DatasetSpec("digits", 10, 120, (1, 8, 8), DIGITS_MEAN, DIGITS_STD, 16.0, 1, False,
                          many_above=60, few_below=20, default_eta=40, default_model="mlp",
                          default_lr=0.1, default_epochs=60),  # the demo's: an MLP that learns
}


def class_counts(n_max: int, num_classes: int, imb_factor: float) -> list[int]:
    """Training images per class of the exponential long-tailed profile.

    ``n_c = int(n_max * (1 / imb_factor) ** (c / (num_classes - 1)))``; e.g. CIFAR-100 with
    ``imb_factor=100`` gives 500, 476, ..., 5 (10,847 images).
    """
    if imb_factor < 1:
        raise DataError(f"imb_factor must be >= 1, got {imb_factor}")
    if num_classes == 1:
        return [n_max]
    return [int(n_max * (1.0 / imb_factor) ** (c / (num_classes - 1))) for c in range(num_classes)]


def split_groups(counts: Sequence[int], eta: float) -> dict[str, list[int]]:
    """Head and tail classes: a class is tail when its train count is strictly below ``eta``."""
    if eta <= 0:
        raise DataError(f"eta must be > 0, got {eta}")
    tail = [c for c, n in enumerate(counts) if n < eta]
    head = [c for c, n in enumerate(counts) if n >= eta]
    return {"head": head, "tail": tail}


def accuracy_splits(counts: Sequence[int], spec: DatasetSpec) -> dict[str, list[int]]:
    """Many / medium / few classes by train count, with the dataset's thresholds."""
    many = [c for c, n in enumerate(counts) if n > spec.many_above]
    few = [c for c, n in enumerate(counts) if n < spec.few_below]
    medium = [c for c, n in enumerate(counts) if spec.few_below <= n <= spec.many_above]
    return {"many": many, "medium": medium, "few": few}


@dataclass
class LongTailData:
    """A long-tailed training set and a balanced test set, as ``uint8`` tensors.

    ``train_x`` is ``(N, C, H, W)`` ``uint8``; ``train_y`` is ``(N,)`` ``int64``. Move both sets
    to a device with :meth:`to`; :func:`normalize` turns a batch into model inputs. An image
    folder's data (:mod:`train.folder`) also names its ``classes`` and carries the
    ``fingerprint`` of its files.
    """

    spec: DatasetSpec
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    counts: list[int]
    classes: Optional[list[str]] = None
    fingerprint: Optional[str] = None

    def to(self, device: torch.device | str) -> "LongTailData":
        return dataclasses.replace(self, train_x=self.train_x.to(device),
                                   train_y=self.train_y.to(device),
                                   test_x=self.test_x.to(device), test_y=self.test_y.to(device),
                                   counts=list(self.counts))


@functools.lru_cache(maxsize=None)
def _channel_stats(spec: DatasetSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per (dataset, device): a fresh host-to-device copy per batch would wait for
    # the device.
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    return mean, std


def normalize(images: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """``uint8`` images to float32 model inputs: scale to [0, 1], subtract mean, divide by std."""
    mean, std = _channel_stats(spec, images.device)
    return (images.float() / spec.pixel_scale - mean) / std


def draw_augmentation(count: int, pad: int, flip: bool, generator: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image crop offsets ``(count, 2)`` in ``0..2 pad`` and flips ``(count,)``, on the CPU.

    Drawn on the CPU so that a run's augmentation is the same on every device.
    """
    offsets = torch.randint(0, 2 * pad + 1, (count, 2), generator=generator)
    flips = (torch.rand(count, generator=generator) < 0.5 if flip
             else torch.zeros(count, dtype=torch.bool))
    return offsets, flips


def apply_augmentation(images: torch.Tensor, pad: int, offsets: torch.Tensor,
                       flips: torch.Tensor) -> torch.Tensor:
    """Crops (zero padding ``pad``, top-left corners ``offsets``) then flips, in one gather.

    Args:
        images: ``(B, C, H, W)`` batch, any dtype, on any device.
        pad: crop padding in pixels; 0 disables cropping.
        offsets: ``(B, 2)`` row and column of each crop in the padded image, on ``images``'
            device.
        flips: ``(B,)`` booleans: mirror the crop left-right.
    """
    b, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    rows = offsets[:, :1] + torch.arange(h, device=device)  # (B, H) rows of the padded image
    cols = offsets[:, 1:] + torch.arange(w, device=device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # a flip reverses the crop's columns
    batch = torch.arange(b, device=device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def augment(images: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding ``pad``) then random horizontal flip, per image, in one gather.

    Args:
        images: ``(B, C, H, W)`` batch, any dtype, on any device.
        pad: crop padding in pixels; 0 disables cropping.
        flip: flip each image left-right with probability 1/2.
        generator: CPU generator the offsets and flips are drawn from.
    """
    offsets, flips = draw_augmentation(images.shape[0], pad, flip, generator)
    return apply_augmentation(images, pad, offsets.to(images.device), flips.to(images.device))


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of one epoch's order and augmentation: a function of (seed, epoch)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))


def train_batches(data: LongTailData, batch_size: int, generator: torch.Generator,
                  augmentation: bool = True, shard: Optional[tuple[int, int]] = None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled, augmented, normalised training batches (the last may be short).

    The whole epoch's permutation and augmentation are drawn up front on the CPU and moved
    once, so a step needs no host synchronisation.

    With ``shard=(rank, world)`` (data parallelism) every global batch of ``batch_size`` is
    drawn and augmented whole, with the same random numbers as one process, and only its
    ``rank``-th of ``world`` near-equal contiguous parts (``torch.tensor_split``) is normalised
    and yielded; a part may be empty when the last batch is shorter than ``world``.
    """
    n, spec, device = data.train_y.shape[0], data.spec, data.train_y.device
    augmenting = augmentation and bool(spec.pad or spec.flip)
    order = torch.randperm(n, generator=generator)
    offsets, flips = draw_augmentation(n if augmenting else 0, spec.pad, spec.flip, generator)
    # One copy of the epoch's random numbers to the device; from pinned memory it does not
    # block the host, so no step waits for the device.
    order, offsets, flips = (_to_device(t, device) for t in (order, offsets, flips))
    for start in range(0, n, batch_size):
        index = order[start:start + batch_size]
        images = data.train_x[index]
        if augmenting:
            images = apply_augmentation(images, spec.pad, offsets[start:start + batch_size],
                                        flips[start:start + batch_size])
        targets = data.train_y[index]
        if shard is not None:
            images = images.tensor_split(shard[1])[shard[0]]
            targets = targets.tensor_split(shard[1])[shard[0]]
        yield normalize(images, data.spec), targets


# --------------------------------------------------------------------------------------------
# Building the datasets


def _select(labels: np.ndarray, counts: Sequence[int], selection: str) -> np.ndarray:
    """Indices of the kept training images, class by class.

    ``first`` keeps the first ``n_c`` images of class ``c`` in file order (the SSE-SAM code);
    ``shuffled`` shuffles each class's indices with one ``RandomState(0)``, class after class,
    and keeps the first ``n_c`` (the LDAM / Saddle-SAM code).
    """
    check_choice("selection", selection, DataError)
    rng = np.random.RandomState(0)
    kept = []
    for c, n_c in enumerate(counts):
        index = np.flatnonzero(labels == c)
        if len(index) < n_c:
            raise DataError(f"class {c} has {len(index)} images, the profile asks for {n_c}")
        if selection == "shuffled":
            rng.shuffle(index)
        kept.append(index[:n_c])
    return np.concatenate(kept)


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = digits.target.astype(np.int64)
    test = np.concatenate([np.flatnonzero(labels == c)[-DIGITS_TEST_PER_CLASS:] for c in range(10)])
    is_train = np.ones(len(labels), dtype=bool)
    is_train[test] = False
    return images[is_train], labels[is_train], images[np.sort(test)], labels[np.sort(test)]


def load_dataset(name: str, imb_factor: float, selection: str = "first",
                 data_dir: str | os.PathLike = "data", download: bool = True) -> LongTailData:
    """Builds the long-tailed training set and the balanced test set of ``name``.

    Args:
        name: ``digits``, ``cifar10`` or ``cifar100``.
        imb_factor: ratio of the largest to the smallest class, >= 1.
        selection: ``first`` or ``shuffled`` (see :func:`_select`).
        data_dir: folder holding ``cifar-10-batches-py/`` or ``cifar-100-python/``.
        download: try torchvision's download when the CIFAR files are missing.
    """
    check_choice("dataset", name, DataError)
    spec = SPECS[name]
    counts = class_counts(spec.n_max, spec.num_classes, imb_factor)
    if name == "digits":
        train_x, train_y, test_x, test_y = _digits()
    else:
        from train.cifar import load_cifar

        train_x, train_y, test_x, test_y = load_cifar(name, data_dir, download)
    highest = max(train_y.max(initial=0), test_y.max(initial=0))
    if train_y.min(initial=0) < 0 or highest >= spec.num_classes:
        raise DataError(f"{name}: labels outside 0..{spec.num_classes - 1}")
    kept = _select(train_y, counts, selection)
    return LongTailData(spec, torch.from_numpy(np.ascontiguousarray(train_x[kept])),
                        torch.from_numpy(train_y[kept]), torch.from_numpy(test_x),
                        torch.from_numpy(test_y), counts)
