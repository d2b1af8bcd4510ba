"""Folder and list-file datasets decoded in DataLoader workers, for sets too large to cache.

:func:`load_stream` reads the same layouts as :func:`train.folder.load_folder` and makes the
same long-tailed cut (:func:`train.folder.kept_training`), but keeps only the file list.
:func:`make_loader` builds one DataLoader for a whole run: ``workers`` processes (persistent
across epochs) decode with Pillow and apply the augmentation of :mod:`train.stream.augment`;
batches are ``uint8`` (a quarter of the bytes of float32 to copy), in pinned memory when the
run is on CUDA, and normalised on the device by :func:`stream_batches`. Batch order and
sharding come from :class:`train.stream.sampler.EpochBatches`, so a batch is a function of
``(seed, epoch, batch number, rank, world)`` alone, whatever the number of workers.

The normalisation is ImageNet's (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`, the statistics the
ImageNet recipes use): computing the kept images' own statistics, as the cache does, would cost
a decode of the whole set before the first step.

:func:`choose_decode` is the automatic choice between the two paths: the cache holds every file
of both splits as ``uint8`` in memory, so stream above :data:`CACHE_LIMIT_BYTES`;
:func:`resolve_decode` applies it to a folder (``Config.decode``), and a streamed run without
``image_size`` gets :data:`STREAM_IMAGE_SIZE`. :class:`StreamSamples` serves a fixed list of
files (a class group's, for the Hessian) as test-view batches, never all in memory.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from train.data import DataError, DatasetSpec, normalize
from train.folder import FolderIndex, _content_key, folder_spec, kept_training, scan
from train.options import CACHE_LIMIT_BYTES, DECODES
from train.stream.augment import draw_crop, resolve_backend, sample_generator, \
    test_transform, train_transform
from train.stream.sampler import EpochBatches

__all__ = ["CACHE_LIMIT_BYTES", "DECODES", "IMAGENET_MEAN", "IMAGENET_STD", "STREAM_IMAGE_SIZE",
           "cache_bytes", "choose_decode", "resolve_decode", "StreamData", "load_stream",
           "load_stream_cached", "FolderImages", "StreamLoader", "make_loader", "run_loaders",
           "stream_batches",
           "StreamSamples"]

STREAM_IMAGE_SIZE = 224  # a streamed run's image_size when none is given (ImageNet's)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cache_bytes(n_images: int, image_shape: Sequence[int]) -> int:
    """Bytes of ``n_images`` uint8 images of ``image_shape`` ``(C, H, W)``."""
    return int(n_images) * math.prod(int(d) for d in image_shape)


def choose_decode(n_images: int, image_shape: Sequence[int], *,
                  limit: int = CACHE_LIMIT_BYTES) -> str:
    """``"cache"`` when the uint8 cache fits in ``limit`` bytes, else ``"stream"``.

    ``n_images`` counts every file of both splits as :func:`train.folder.scan` lists them (the
    cache decodes a split whole, before the cut), e.g. ImageNet-LT's 115,846 training and
    50,000 test images at ``(3, 224, 224)`` are 25 GB: stream; CIFAR's 60,000 at
    ``(3, 32, 32)`` are 184 MB: cache.

    >>> choose_decode(115_846 + 50_000, (3, 224, 224)), choose_decode(60_000, (3, 32, 32))
    ('stream', 'cache')
    """
    return "cache" if cache_bytes(n_images, image_shape) <= limit else "stream"


def resolve_decode(decode: str, data_dir, image_size=None, train_list=None, test_list=None
                   ) -> str:
    """``decode`` of a folder dataset with ``auto`` resolved by :func:`choose_decode`.

    The cache's image shape is ``(3, image_size, image_size)``, or without ``image_size`` the
    first training image's (read from its header: the cache keeps the images' own size).
    """
    if decode != "auto":
        return decode
    train, test = scan(data_dir, train_list, test_list)
    if image_size is not None:
        shape = (3, image_size, image_size)
    else:
        from PIL import Image

        try:
            with Image.open(train.root / train.paths[0]) as image:
                shape = (3, image.height, image.width)
        except OSError as error:
            raise DataError(f"{train.root / train.paths[0]}: not a readable image "
                            f"({type(error).__name__})") from None
    # The limit is read here at each call (choose_decode's default is fixed at import).
    return choose_decode(len(train.paths) + len(test.paths), shape, limit=CACHE_LIMIT_BYTES)


@dataclass(frozen=True)
class StreamData:
    """A streamed dataset: the kept training files, the test files, and what the run needs.

    Attributes:
        spec: the dataset spec (``folder_spec`` with ImageNet's normalisation).
        train: the kept training files, in the cut's order (dataset index = position here).
        test: every test file.
        counts: training images per class.
        classes: the class names.
        fingerprint: the cached path's ``LongTailData.fingerprint`` of the same files.
    """

    spec: DatasetSpec
    train: FolderIndex
    test: FolderIndex
    counts: list[int]
    classes: list[str]
    fingerprint: str = ""

    def to(self, device) -> "StreamData":
        """Itself: the files stay on disk, the loaders move each batch (as ``LongTailData.to``
        moves the tensors)."""
        return self


def load_stream(data_dir, imb_factor: float = 1.0, selection: str = "first",
                image_size: int = 224, train_list=None, test_list=None) -> StreamData:
    """The files of a folder or two list files, cut as :func:`train.folder.load_folder` cuts."""
    if image_size < 1:
        raise DataError(f"image_size must be >= 1, got {image_size}")
    train, test = scan(data_dir, train_list, test_list)
    kept, counts = kept_training(train, test, imb_factor, selection, train_list is not None)
    train = FolderIndex(train.root, tuple(train.paths[k] for k in kept),
                        tuple(train.labels[k] for k in kept), train.classes)
    spec = folder_spec("folder", len(train.classes), max(counts), (3, image_size, image_size),
                       IMAGENET_MEAN, IMAGENET_STD)
    key = _content_key(train, range(len(train.paths)), test)
    return StreamData(spec, train, test, list(counts), list(train.classes), key)


@functools.lru_cache(maxsize=2)
def _loaded(root: str, imb_factor: float, selection: str, image_size: int, train_list,
            test_list) -> StreamData:
    return load_stream(root, imb_factor, selection, image_size, train_list, test_list)


def load_stream_cached(data_dir, imb_factor: float, selection: str, image_size: int,
                       train_list=None, test_list=None) -> StreamData:
    """:func:`load_stream`, remembered for this process (a config's spec, its trainer and its
    analysis ask for the same files)."""
    absolute = [None if p is None else str(Path(p).resolve()) for p in (train_list, test_list)]
    return _loaded(str(Path(data_dir).resolve()), float(imb_factor), selection, int(image_size),
                   *absolute)


def _open_rgb(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:  # PIL.UnidentifiedImageError is an OSError
        raise DataError(f"{path}: not a readable image ({type(error).__name__})") from None


class FolderImages(Dataset):
    """The images of a :class:`FolderIndex`, decoded and augmented one at a time.

    An item's key is ``(epoch, index)``; with ``train`` the crop and flip come from
    :func:`sample_generator` ``(seed, epoch, index)``, else the test view is returned.
    """

    def __init__(self, index: FolderIndex, train: bool, image_size: int, seed: int,
                 backend: str = "auto"):
        self.index, self.train, self.image_size, self.seed = index, train, image_size, seed
        self.backend = resolve_backend(backend)  # resolved once, before workers start

    def __len__(self) -> int:
        return len(self.index.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, i = key
        image = _open_rgb(self.index.root / self.index.paths[i])
        if not self.train:
            return test_transform(image, self.image_size, self.backend), self.index.labels[i]
        crop = draw_crop(image.height, image.width, sample_generator(self.seed, epoch, i))
        return (train_transform(image, self.image_size, crop, self.backend),
                self.index.labels[i])


class _Collate:
    """Stacks a batch; an empty part (a short last batch over many ranks) keeps its shape."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, samples):
        if not samples:
            return (torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.uint8),
                    torch.empty(0, dtype=torch.int64))
        images, labels = zip(*samples)
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers x intra-op threads would oversubscribe the cores


def _worker_message(error: DataError) -> str:
    """The one-line message of a DataError re-raised from a worker (which adds a traceback)."""
    last = str(error).strip().splitlines()[-1]
    return last.split("DataError: ", 1)[1] if "DataError: " in last else last


class StreamLoader:
    """One DataLoader kept for a whole run; :meth:`batches` iterates one epoch of it.

    Iterate one epoch at a time: with persistent workers a new epoch's iteration ends the
    previous one.
    """

    def __init__(self, dataset: FolderImages, sampler: EpochBatches, workers: int,
                 device: torch.device):
        if workers < 0:
            raise DataError(f"workers must be >= 0, got {workers}")
        self.dataset, self.sampler, self.device = dataset, sampler, device
        self.loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                 collate_fn=_Collate(dataset.image_size),
                                 pin_memory=device.type == "cuda",
                                 persistent_workers=workers > 0,
                                 worker_init_fn=_one_thread if workers > 0 else None)

    def __len__(self) -> int:
        """Global batches per epoch."""
        return self.sampler.batches_per_epoch

    def batches(self, epoch: int, start_batch: int = 0
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's ``(uint8 images, labels)`` of global batches ``start_batch, ...``."""
        self.sampler.set_epoch(epoch, start_batch)
        return self._iterate()

    def _iterate(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            yield from self.loader
        except DataError as error:
            raise DataError(_worker_message(error)) from None


def make_loader(index: FolderIndex, train: bool, batch_size: int, *, workers: int = 0,
                seed: int = 0, image_size: int = 224, rank: int = 0, world: int = 1,
                device: torch.device | str = "cpu", backend: str = "auto") -> StreamLoader:
    """A :class:`StreamLoader` over ``index`` for training (shuffled, augmented) or testing.

    Args:
        index: the split's files (``StreamData.train`` or ``.test``).
        train: shuffle and augment (else file order and the test view).
        batch_size: the global batch size; this rank gets its part of each batch.
        workers: decoding processes (0: in this process).
        seed: the run's seed (order and augmentation).
        image_size: the side of the square images returned.
        rank, world: this process and the number of processes (torchrun).
        device: where the batches go; pinned memory when it is CUDA.
        backend: ``auto``, ``torchvision`` or ``tensor`` (:mod:`train.stream.augment`).
    """
    if image_size < 1:
        raise DataError(f"image_size must be >= 1, got {image_size}")
    dataset = FolderImages(index, train, image_size, seed, backend)
    sampler = EpochBatches(len(dataset), batch_size, seed=seed, shuffle=train, rank=rank,
                           world=world)
    return StreamLoader(dataset, sampler, workers, torch.device(device))


def run_loaders(data: StreamData, batch_size: int, *, workers: int, seed: int,
                device: torch.device | str, rank: int = 0, world: int = 1
                ) -> tuple[StreamLoader, StreamLoader]:
    """A training run's two loaders: training (this rank's part of every global batch) and
    test (every test image, on every rank: each rank evaluates the whole test set)."""
    size = data.spec.image_shape[-1]
    common = dict(workers=workers, seed=seed, image_size=size, device=device)
    return (make_loader(data.train, True, batch_size, rank=rank, world=world, **common),
            make_loader(data.test, False, batch_size, **common))


def stream_batches(loader: StreamLoader, spec: DatasetSpec, epoch: int, start_batch: int = 0
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised ``(inputs, targets)`` on the loader's device: the streamed ``train_batches``."""
    non_blocking = loader.device.type == "cuda"  # the batches are in pinned memory
    for images, labels in loader.batches(epoch, start_batch):
        images = images.to(loader.device, non_blocking=non_blocking)
        yield normalize(images, spec), labels.to(loader.device, non_blocking=non_blocking)


class StreamSamples:
    """A fixed list of files as normalised, un-augmented batches (the test view), decoded again
    for every pass: a class group's samples for :class:`landscape.hvp.GroupHessian`.

    Args:
        index: the files, in the order the batches follow.
        spec: the run's dataset spec (normalisation).
        image_size: the side of the square images.
        workers: decoding processes per pass (0: in this process).
        device: where the batches go.
    """

    def __init__(self, index: FolderIndex, spec: DatasetSpec, image_size: int, *,
                 workers: int = 0, device: torch.device | str = "cpu"):
        self.index, self.spec, self.image_size = index, spec, image_size
        self.workers, self.device = workers, torch.device(device)
        self._loader = None  # (key, StreamLoader): the last range's, its workers kept

    def __len__(self) -> int:
        return len(self.index.paths)

    @property
    def targets(self) -> torch.Tensor:
        return torch.tensor(self.index.labels, dtype=torch.int64)

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(inputs, targets)`` of samples ``start .. stop - 1`` in batches of ``batch_size``."""
        stop = len(self) if stop is None else stop
        if stop <= start:
            return iter(())
        key = (start, stop, batch_size)
        if self._loader is None or self._loader[0] != key:
            part = FolderIndex(self.index.root, self.index.paths[start:stop],
                               self.index.labels[start:stop], self.index.classes)
            self._loader = key, make_loader(part, False, batch_size, workers=self.workers,
                                            image_size=self.image_size, device=self.device)
        return stream_batches(self._loader[1], self.spec, epoch=0)
