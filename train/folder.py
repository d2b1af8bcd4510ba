"""Image-folder and list-file datasets: any images Pillow reads, cut to a long-tailed profile.

Two layouts under a root folder ``data_dir``:

* **Folders**: ``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*``. The classes are the
  sorted folder names of ``train/`` (label ``c`` = the ``c``-th name); ``test/`` must use the
  same names. Files are taken in sorted name order, and the balanced training set is cut to the
  long-tailed profile ``n_c = int(n_max * (1 / IF) ** (c / (C - 1)))`` with ``n_max`` the
  smallest class's count (so a balanced set keeps its size at ``IF = 1``), keeping the first
  ``n_c`` (``selection="first"``) or a seeded shuffle's first ``n_c`` (``"shuffled"``), as for
  CIFAR.
* **List files** (ImageNet-LT / iNaturalist style): ``train_list`` and ``test_list`` hold one
  ``relative/path label`` per line, paths relative to ``data_dir``, integer labels
  ``0..C-1`` with ``C`` = the largest training label + 1. A list is already long-tailed and is
  kept as it is (``imb_factor`` and ``selection`` do not apply).

Every image is decoded once (converted to RGB; with ``image_size`` its shorter side resized to
``image_size`` and the centre ``image_size x image_size`` cropped, else all images must share
one size) and cached as ``uint8`` in ``SSE_CACHE_DIR`` (default ``~/.cache/sse-sam-landscape``),
in one file per split written atomically and keyed by the file list, the files' sizes and
mtimes and ``image_size``: a changed, added or removed image makes a new cache. The
normalisation statistics (per-channel mean and standard deviation) are those of the kept
training images. Augmentation is CIFAR's: a random crop with ``image_size / 8`` pixels of zero
padding and a horizontal flip.

Example:
    >>> import tempfile, numpy as np
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> for split, n in (("train", 4), ("test", 2)):
    ...     for name in ("cat", "dog"):
    ...         (root / split / name).mkdir(parents=True)
    ...         for i in range(n):
    ...             Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / split / name / f"{i}.png")
    >>> data = load_folder(root, imb_factor=2, cache_dir=root / "cache")
    >>> data.counts, data.spec.num_classes, tuple(data.train_x.shape), data.classes
    ([4, 2], 2, (6, 3, 8, 8), ['cat', 'dog'])
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["FolderIndex", "scan", "kept_training", "load_folder", "load_folder_cached",
           "folder_counts", "folder_spec", "default_cache_dir", "CACHE_FORMAT"]

CACHE_FORMAT = "sse-image-cache/1"
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                   ".pgm"}


def _error(message: str) -> Exception:
    from train.data import DataError  # late: train.data imports this module

    return DataError(message)


@dataclass(frozen=True)
class FolderIndex:
    """The files of one split and their labels, in the order they are kept.

    Attributes:
        root: the folder the paths are relative to.
        paths: relative paths, one per image.
        labels: integer label of each image.
        classes: the class names (folders) or ``["0", "1", ...]`` (list files).
    """

    root: Path
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def fingerprint(self, image_size: Optional[int]) -> str:
        """SHA-256 of the file list, each file's size and mtime, and ``image_size``."""
        digest = hashlib.sha256(json.dumps([CACHE_FORMAT, image_size]).encode())
        for path, label in zip(self.paths, self.labels):
            try:
                stat = (self.root / path).stat()
            except OSError as error:
                raise _error(f"{self.root / path}: cannot read ({error.strerror})") from None
            digest.update(json.dumps([path, label, stat.st_size, stat.st_mtime_ns]).encode())
        return digest.hexdigest()


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


def _scan_folders(root: Path, split: str, classes: Optional[Sequence[str]]) -> FolderIndex:
    top = root / split
    if not top.is_dir():
        raise _error(f"{top}: no such folder (expected {root}/{{train,test}}/<class>/<images>)")
    names = sorted(p.name for p in top.iterdir() if p.is_dir())
    if classes is None:
        classes = names
    elif set(names) - set(classes):
        extra = sorted(set(names) - set(classes))[0]
        raise _error(f"{top / extra}: class {extra!r} has no training folder")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _image_files(top / name) if (top / name).is_dir() else []
        paths += [f"{split}/{name}/{f.name}" for f in files]
        labels += [label] * len(files)
    if not paths:
        raise _error(f"{top}: no images (expected {top}/<class>/<images>)")
    return FolderIndex(root, tuple(paths), tuple(labels), tuple(classes))


def _read_list(root: Path, list_file: Path, num_classes: Optional[int]) -> FolderIndex:
    try:
        lines = Path(list_file).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise _error(f"{list_file}: cannot read the list ({error})") from None
    paths, labels = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)
        try:
            label = int(parts[1])
        except (IndexError, ValueError):
            raise _error(f"{list_file}:{number}: expected 'relative/path label', got "
                         f"{line.strip()[:60]!r}") from None
        if label < 0 or (num_classes is not None and label >= num_classes):
            bound = "" if num_classes is None else f" (the training list has 0..{num_classes - 1})"
            raise _error(f"{list_file}:{number}: label {label} out of range{bound}")
        paths.append(parts[0])
        labels.append(label)
    if not paths:
        raise _error(f"{list_file}: no images listed")
    count = num_classes if num_classes is not None else max(labels) + 1
    return FolderIndex(root, tuple(paths), tuple(labels), tuple(str(c) for c in range(count)))


def scan(data_dir, train_list=None, test_list=None) -> tuple[FolderIndex, FolderIndex]:
    """The training and test files of ``data_dir`` (folders) or of the two list files."""
    root = Path(data_dir)
    if (train_list is None) != (test_list is None):
        raise _error("give both --train_list and --test_list, or neither")
    if train_list is None:
        train = _scan_folders(root, "train", None)
        return train, _scan_folders(root, "test", train.classes)
    train = _read_list(root, Path(train_list), None)
    return train, _read_list(root, Path(test_list), len(train.classes))


def default_cache_dir() -> Path:
    """``$SSE_CACHE_DIR``, else ``~/.cache/sse-sam-landscape``."""
    return Path(os.environ.get("SSE_CACHE_DIR") or Path.home() / ".cache" / "sse-sam-landscape")


def _decode(path: Path, image_size: Optional[int]) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image_size is not None:
                scale = image_size / min(image.size)
                size = (max(image_size, round(image.width * scale)),
                        max(image_size, round(image.height * scale)))
                image = image.resize(size, Image.BILINEAR)
                left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
                image = image.crop((left, top, left + image_size, top + image_size))
            return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    except OSError as error:  # PIL.UnidentifiedImageError is an OSError
        raise _error(f"{path}: not a readable image ({type(error).__name__})") from None


def _size_text(shape) -> str:
    return f"{shape[2]}x{shape[1]}"


def _decode_all(index: FolderIndex, image_size: Optional[int]) -> np.ndarray:
    images = [_decode(index.root / p, image_size) for p in index.paths]
    for path, image in zip(index.paths, images):
        if image.shape != images[0].shape:
            raise _error(f"{index.root / path}: size {_size_text(image.shape)} differs from "
                         f"{_size_text(images[0].shape)} ({index.root / index.paths[0]}); pass "
                         "--image_size N to resize every image")
    return np.stack(images)


def _cached_images(index: FolderIndex, image_size: Optional[int], cache_dir: Path) -> np.ndarray:
    """The split's decoded images, from the cache when its key matches, else decoded and cached."""
    from train.io import atomic_write_bytes

    key = index.fingerprint(image_size)
    path = Path(cache_dir) / f"images-{key[:32]}.npz"
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) == key:
                return stored["images"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # absent or damaged: decode again
    images = _decode_all(index, image_size)
    buffer = io.BytesIO()
    np.savez(buffer, images=images, key=np.array(key))
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
    except OSError:
        pass  # a read-only cache folder only costs the next run a decode
    return images


def folder_spec(name: str, num_classes: int, n_max: int, image_shape, mean, std):
    """The :class:`train.data.DatasetSpec` of a folder dataset; CIFAR's split rules, scaled.

    Many / few thresholds and the default ``eta`` scale with ``n_max`` as CIFAR's do
    (``n_max / 5`` and ``n_max / 25``: 100 and 20 for CIFAR-100, 1000 and 200 for CIFAR-10).
    """
    from train.data import DatasetSpec

    return DatasetSpec(name, num_classes, n_max, tuple(image_shape), tuple(mean), tuple(std),
                       255.0, max(1, image_shape[1] // 8), True, many_above=n_max // 5,
                       few_below=max(1, n_max // 25), default_eta=max(1, n_max // 5))


def kept_training(train: FolderIndex, test: FolderIndex, imb_factor: float, selection: str,
                  listed: bool) -> tuple[np.ndarray, list[int]]:
    """The long-tailed cut: positions in ``train`` of the kept images, and the class counts.

    Folders (``listed`` false) are cut to the profile of the module docstring with
    ``selection``; a list file (``listed`` true) is kept whole. Raises a one-line error when a
    class is left with no training image or has no test image.
    """
    from train.data import _select, class_counts

    labels = np.asarray(train.labels, dtype=np.int64)
    available = np.bincount(labels, minlength=len(train.classes))
    if not listed:
        counts = class_counts(int(available.min()), len(train.classes), imb_factor)
    else:
        counts = [int(n) for n in available]
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        how = "no training images" if listed else (
            f"no image left after the cut to imbalance factor {imb_factor:g}")
        raise _error(f"class {train.classes[empty[0]]!r} has {how}")
    no_test = sorted(set(range(len(train.classes))) - set(test.labels))
    if no_test:
        raise _error(f"class {train.classes[no_test[0]]!r} has no test images")
    kept = np.arange(len(labels)) if listed else _select(labels, counts, selection)
    return kept, counts


def load_folder(data_dir, imb_factor: float = 1.0, selection: str = "first",
                image_size: Optional[int] = None, train_list=None, test_list=None,
                cache_dir=None):
    """Builds a :class:`train.data.LongTailData` from an image folder or two list files.

    Args:
        data_dir: the root folder (see the module docstring for both layouts).
        imb_factor: ratio of the largest to the smallest kept class (folders only).
        selection: ``first`` or ``shuffled`` (folders only), as for CIFAR.
        image_size: resize (shorter side, then centre crop) to this square size.
        train_list, test_list: list files; both or neither.
        cache_dir: where decoded images are cached (default :func:`default_cache_dir`).

    Returns:
        The data, with ``.classes`` set to the class names.
    """
    from train.data import LongTailData

    if image_size is not None and image_size < 1:
        raise _error(f"image_size must be >= 1, got {image_size}")
    train, test = scan(data_dir, train_list, test_list)
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    kept, counts = kept_training(train, test, imb_factor, selection, train_list is not None)
    labels = np.asarray(train.labels, dtype=np.int64)
    train_images = _cached_images(train, image_size, cache_dir)
    test_images = _cached_images(test, image_size, cache_dir)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise _error(f"{data_dir}: training images are {_size_text(train_images.shape[1:])}, test "
                     f"images {_size_text(test_images.shape[1:])}; pass --image_size N")
    train_x = torch.from_numpy(np.ascontiguousarray(train_images[kept]))
    pixels = train_x.double().div_(255.0)
    mean = pixels.mean(dim=(0, 2, 3)).tolist()
    std = pixels.std(dim=(0, 2, 3), unbiased=False).clamp_min(1e-6).tolist()
    spec = folder_spec("folder", len(train.classes), max(counts), train_images.shape[1:], mean, std)
    return LongTailData(spec, train_x, torch.from_numpy(labels[kept]),
                        torch.from_numpy(test_images),
                        torch.as_tensor(test.labels, dtype=torch.int64), counts,
                        classes=list(train.classes), fingerprint=_content_key(train, kept, test))


def _content_key(train: FolderIndex, kept: np.ndarray, test: FolderIndex) -> str:
    """SHA-256 of the kept training files and the test files (paths, labels, byte sizes): what
    a rebuilt dataset must match. Unlike the cache key it leaves out mtimes, so a copied
    folder still matches."""
    digest = hashlib.sha256()
    for index, positions in ((train, kept), (test, range(len(test.paths)))):
        for i in positions:
            path = index.root / index.paths[i]
            digest.update(json.dumps([index.paths[i], index.labels[i],
                                      path.stat().st_size]).encode())
    return digest.hexdigest()


def _resolved(data_dir, train_list, test_list) -> tuple[str, list[Optional[str]]]:
    """Absolute paths: the memo keys of one folder, however a caller spells it."""
    lists = [None if p is None else str(Path(p).resolve()) for p in (train_list, test_list)]
    return str(Path(data_dir).resolve()), lists


@functools.lru_cache(maxsize=2)
def _loaded(root: str, imb_factor: float, selection: str, image_size: Optional[int],
            train_list: Optional[str], test_list: Optional[str]):
    return load_folder(root, imb_factor, selection, image_size, train_list, test_list)


def load_folder_cached(data_dir, imb_factor: float, selection: str, image_size=None,
                       train_list=None, test_list=None):
    """:func:`load_folder`, remembered for this process (a config's spec, its trainer and its
    analysis all ask for the same data)."""
    root, lists = _resolved(data_dir, train_list, test_list)
    return _loaded(root, float(imb_factor), selection, image_size, *lists)


@functools.lru_cache(maxsize=8)
def _counts(root: str, imb_factor: float, selection: str, train_list, test_list):
    train, test = scan(root, train_list, test_list)
    return kept_training(train, test, imb_factor, selection, train_list is not None)[1]


def folder_counts(data_dir, imb_factor: float, selection: str, train_list=None,
                  test_list=None) -> list[int]:
    """The kept training images per class, from the file names alone (nothing decoded)."""
    root, lists = _resolved(data_dir, train_list, test_list)
    return list(_counts(root, float(imb_factor), selection, *lists))
