"""Writes small CIFAR-10 / CIFAR-100 datasets in the real on-disk format, for tests.

The real files are Python pickles of dicts: ``data`` is a ``uint8`` array ``(N, 3072)`` (the
1,024 red values of an image, then green, then blue, each plane row-major), labels are a list
of ints under ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100, with ``coarse_labels``).
CIFAR-10 has ``cifar-10-batches-py/data_batch_1 .. data_batch_5`` and ``test_batch``; CIFAR-100
has ``cifar-100-python/train`` and ``test``. The original files were written by Python 2 with
numpy's ``numpy.core.multiarray._reconstruct``; the pickles written here name that same module
(numpy 2 would write ``numpy._core``) so that the reader is tested against the real names.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class WrittenCifar:
    """What was written: the folder, and the train / test images and labels in file order."""

    root: Path
    train_data: np.ndarray  # (N, 3072) uint8, the concatenation of the train files
    train_labels: np.ndarray
    test_data: np.ndarray
    test_labels: np.ndarray


def _dump(path: Path, batch: dict) -> None:
    data = pickle.dumps(batch, protocol=2)
    # The names the original (numpy 1.x, Python 2) files use; GLOBAL opcodes are text lines.
    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(data)


def _labels(per_class: int, num_classes: int, rng: np.random.RandomState) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)  # classes interleaved in file order, as in the real files
    return labels


def write_cifar(root: str | Path, name: str, train_per_class: int, test_per_class: int,
                seed: int = 0) -> WrittenCifar:
    """Writes ``name`` (``cifar10`` or ``cifar100``) with random images under ``root``."""
    rng = np.random.RandomState(seed)
    num_classes = 10 if name == "cifar10" else 100
    train_labels = _labels(train_per_class, num_classes, rng)
    test_labels = _labels(test_per_class, num_classes, rng)
    train_data = rng.randint(0, 256, size=(len(train_labels), 3072)).astype(np.uint8)
    test_data = rng.randint(0, 256, size=(len(test_labels), 3072)).astype(np.uint8)
    root = Path(root)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for i, part in enumerate(np.array_split(np.arange(len(train_labels)), 5), start=1):
            _dump(folder / f"data_batch_{i}",
                  {"batch_label": f"training batch {i} of 5", "data": train_data[part],
                   "labels": [int(v) for v in train_labels[part]],
                   "filenames": [f"img_{j}.png" for j in part]})
        _dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "data": test_data,
                                      "labels": [int(v) for v in test_labels]})
    elif name == "cifar100":
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for split, data, labels in (("train", train_data, train_labels),
                                    ("test", test_data, test_labels)):
            _dump(folder / split, {"batch_label": split, "data": data,
                                   "fine_labels": [int(v) for v in labels],
                                   "coarse_labels": [int(v) // 5 for v in labels]})
    else:
        raise ValueError(name)
    return WrittenCifar(root, train_data, train_labels, test_data, test_labels)
