"""ImageNet-style augmentation of one decoded image, with its random numbers drawn per sample.

Training: ``RandomResizedCrop(size)`` (a crop of area fraction ``s ~ U(0.08, 1)`` of the image and
aspect ratio ``r`` with ``log r ~ U(log 3/4, log 4/3)``, up to 10 tries, else the central crop
of the clamped ratio; resized bilinearly, antialiased, to ``size x size``) then a horizontal
flip with probability 1/2. Test: the shorter side resized to ``size * 8 // 7`` (256 for 224) and
the centre ``size x size`` cropped.

The crop and the flip are drawn by :func:`draw_crop` from a generator of its own for every
sample, :func:`sample_generator` ``(seed, epoch, index)``, never from a worker's global random
state: any number of DataLoader workers and any resume point give the same pixels.

Two backends apply the drawn crop: ``torchvision`` (``torchvision.transforms.functional`` on the
Pillow image) where torchvision imports (through :func:`train._torchvision.import_torchvision`),
and ``tensor``, small torch ops of our own (``F.interpolate(..., antialias=True)``) where it
does not. Both follow torchvision's size and rounding rules; their pixels differ only where
the two bilinear kernels (Pillow's, torch's antialiased one) round differently, by less than one
grey level on average in ``tests/test_stream.py``.

Example:
    >>> from PIL import Image
    >>> image = Image.new("RGB", (40, 30), (200, 10, 0))
    >>> crop = draw_crop(30, 40, sample_generator(seed=0, epoch=0, index=7))
    >>> crop == draw_crop(30, 40, sample_generator(seed=0, epoch=0, index=7))
    True
    >>> out = train_transform(image, 16, crop, backend="tensor")
    >>> tuple(out.shape), out.dtype, out[:, 0, 0].tolist()
    ((3, 16, 16), torch.uint8, [200, 10, 0])
    >>> tuple(test_transform(image, 16, backend="tensor").shape)
    (3, 16, 16)
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["BACKENDS", "SCALE", "RATIO", "CropFlip", "sample_generator", "draw_crop",
           "resize_size", "resolve_backend", "train_transform", "test_transform"]

BACKENDS = ("auto", "torchvision", "tensor")
SCALE = (0.08, 1.0)  # area fraction of the training crop (torchvision's default)
RATIO = (3 / 4, 4 / 3)  # aspect ratio width / height of the training crop
_ATTEMPTS = 10


@dataclass(frozen=True)
class CropFlip:
    """One training sample's crop box (in the decoded image's pixels) and flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The CPU generator of one sample's augmentation: a hash of ``(seed, epoch, index)``.

    ``index`` is the sample's position in the dataset (not in the epoch's order), so the
    numbers do not depend on the order, the worker or the rank that reads it.
    """
    key = struct.pack("<3q", int(seed), int(epoch), int(index))
    digest = hashlib.blake2b(key, digest_size=8, person=b"sse-stream").digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def draw_crop(height: int, width: int, generator: torch.Generator) -> CropFlip:
    """RandomResizedCrop's box (torchvision's ``get_params`` rule) and a flip, from ``generator``.

    Tries up to 10 boxes of area ``s * height * width`` and ratio ``r`` (module docstring);
    the first that fits is placed uniformly. If none fits, the whole image cut centrally to the
    nearest allowed ratio is used.
    """
    area = height * width
    log_low, log_high = math.log(RATIO[0]), math.log(RATIO[1])
    box = None
    for _ in range(_ATTEMPTS):
        target = area * _uniform(*SCALE, generator)
        ratio = math.exp(_uniform(log_low, log_high, generator))
        w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            box = (top, left, h, w)
            break
    if box is None:
        if width / height < RATIO[0]:
            w, h = width, int(round(width / RATIO[0]))
        elif width / height > RATIO[1]:
            w, h = int(round(height * RATIO[1])), height
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    flip = bool(torch.rand((), generator=generator) < 0.5)
    return CropFlip(*box, flip=flip)


def resize_size(size: int) -> int:
    """The test transform's shorter side before the centre crop: ``size * 8 // 7`` (224 -> 256)."""
    return size * 8 // 7


@functools.lru_cache(maxsize=None)
def _torchvision_functional():
    """``torchvision.transforms.functional`` and its ``InterpolationMode``, or None."""
    try:
        from train._torchvision import import_torchvision

        transforms = import_torchvision().transforms
        return transforms.functional, transforms.InterpolationMode
    except (ImportError, RuntimeError, OSError, AttributeError):
        return None


def resolve_backend(backend: str = "auto") -> str:
    """``torchvision`` or ``tensor``: ``auto`` takes torchvision when it imports.

    Raises:
        ValueError: an unknown name, or ``torchvision`` asked for where it does not import.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown augmentation backend {backend!r} (choose from "
                         f"{', '.join(BACKENDS)})")
    if backend == "tensor" or (backend == "auto" and _torchvision_functional() is None):
        return "tensor"
    if _torchvision_functional() is None:
        raise ValueError("augmentation backend torchvision asked for, but torchvision does not "
                         "import here")
    return "torchvision"


def _to_tensor(image) -> torch.Tensor:
    """A Pillow RGB image as a ``(3, H, W)`` uint8 tensor."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def _resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear, antialiased resize of ``(3, H, W)`` uint8 pixels, rounded back to uint8."""
    out = F.interpolate(pixels[None].float(), size=(height, width), mode="bilinear",
                        align_corners=False, antialias=True)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _shorter_side_to(height: int, width: int, short: int) -> tuple[int, int]:
    """torchvision's ``resize(img, short)`` size: shorter side ``short``, longer side truncated."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def train_transform(image, size: int, crop: CropFlip, backend: str = "auto") -> torch.Tensor:
    """The training view of a Pillow RGB image: ``crop`` resized to ``size``, flipped if drawn.

    Returns:
        ``(3, size, size)`` uint8.
    """
    if resolve_backend(backend) == "torchvision":
        tf, mode = _torchvision_functional()
        view = tf.resized_crop(image, crop.top, crop.left, crop.height, crop.width,
                               [size, size], interpolation=mode.BILINEAR, antialias=True)
        return _to_tensor(tf.hflip(view) if crop.flip else view)
    pixels = _to_tensor(image)[:, crop.top:crop.top + crop.height,
                               crop.left:crop.left + crop.width]
    out = _resize(pixels, size, size)
    return out.flip(-1) if crop.flip else out


def test_transform(image, size: int, backend: str = "auto") -> torch.Tensor:
    """The test view: shorter side to :func:`resize_size`, then the centre ``size x size``.

    Returns:
        ``(3, size, size)`` uint8.
    """
    short = resize_size(size)
    if resolve_backend(backend) == "torchvision":
        tf, mode = _torchvision_functional()
        view = tf.resize(image, short, interpolation=mode.BILINEAR, antialias=True)
        return _to_tensor(tf.center_crop(view, [size, size]))
    height, width = _shorter_side_to(image.height, image.width, short)
    pixels = _to_tensor(image)
    if (height, width) != tuple(pixels.shape[1:]):
        pixels = _resize(pixels, height, width)
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return pixels[:, top:top + size, left:left + size].contiguous()
