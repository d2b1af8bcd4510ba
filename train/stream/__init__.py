r"""Streamed image-folder and list-file datasets: decoded in DataLoader workers, exact on resume.

For sets whose ``uint8`` cache would not fit in memory (ImageNet-LT at 224 px is about 17 GB of
training pixels), ``train.stream`` keeps only the file list and decodes every batch again:

* :mod:`train.stream.loader`: :func:`load_stream` (the files and the long-tailed cut of
  :func:`train.folder.load_folder`), :func:`make_loader` (one persistent DataLoader a run,
  pinned memory on CUDA), :func:`stream_batches` (normalised batches on the device, the
  streamed ``train.data.train_batches``), :func:`choose_decode` (``cache`` or ``stream``) and
  :func:`resolve_decode` (``Config.decode``), :class:`StreamSamples` (a class group's files as
  test-view batches, for the Hessian).
* :mod:`train.stream.augment`: RandomResizedCrop + flip for training, resize + centre crop
  for testing, with torchvision or with small tensor ops, from a generator per sample.
* :mod:`train.stream.sampler`: :class:`EpochBatches`, the epoch's global order (the cached
  path's permutation) split across torchrun ranks, from any batch on.

What fixes a batch: ``(seed, epoch, batch number, rank, world)`` and the files; not the number
of workers, not the batches read before it.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())  # ImageNet-LT style: two list files
    >>> for i in range(6):
    ...     Image.new("RGB", (20, 16), (40 * i, 0, 0)).save(root / f"{i}.png")
    >>> _ = (root / "train.txt").write_text("0.png 0\n1.png 0\n2.png 1\n3.png 0\n")
    >>> _ = (root / "test.txt").write_text("4.png 0\n5.png 1\n")
    >>> data = load_stream(root, image_size=8, train_list=root / "train.txt",
    ...                    test_list=root / "test.txt")
    >>> data.counts, data.test.paths, data.spec.image_shape
    ([3, 1], ('4.png', '5.png'), (3, 8, 8))
    >>> loader = make_loader(data.train, True, 4, seed=0, image_size=8)
    >>> [tuple(x.shape) for x, _ in stream_batches(loader, data.spec, epoch=0)]
    [(4, 3, 8, 8)]
"""

from train.stream.augment import BACKENDS, CropFlip, draw_crop, sample_generator, \
    test_transform, train_transform
from train.stream.loader import CACHE_LIMIT_BYTES, DECODES, IMAGENET_MEAN, IMAGENET_STD, \
    STREAM_IMAGE_SIZE, FolderImages, StreamData, StreamLoader, StreamSamples, cache_bytes, \
    choose_decode, load_stream, load_stream_cached, make_loader, resolve_decode, run_loaders, \
    stream_batches
from train.stream.sampler import EpochBatches

__all__ = ["BACKENDS", "CropFlip", "draw_crop", "sample_generator", "test_transform",
           "train_transform", "CACHE_LIMIT_BYTES", "DECODES", "IMAGENET_MEAN", "IMAGENET_STD",
           "STREAM_IMAGE_SIZE", "FolderImages", "StreamData", "StreamLoader", "StreamSamples",
           "cache_bytes", "choose_decode", "load_stream", "load_stream_cached", "make_loader",
           "resolve_decode", "run_loaders", "stream_batches", "EpochBatches"]
