"""The CIFAR-10 / CIFAR-100 python batches: read safely, downloaded where the network allows.

The batches are pickles; they are read by a restricted unpickler that allows only the numpy
reconstruction functions those files use, so a tampered file is refused (naming it) and none of
its code runs.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np

from train.data import DataError

__all__ = ["FILES", "read_batch", "load_cifar", "download"]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of numpy arrays and lists) and nothing else.

    The CIFAR files are pickles; a plain ``pickle.load`` would run any code a tampered file
    names. Only the numpy reconstruction functions those files use are allowed.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name} from a CIFAR file")


def read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 3, 32, 32) uint8, labels (N,) int64)`` of one CIFAR python batch."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except DataError as error:  # a refused class: say in which file
        raise DataError(f"{path}: {error}") from None
    except Exception as error:  # a truncated or foreign file: say which one
        raise DataError(f"{path}: not a readable CIFAR batch ({type(error).__name__}: {error})")
    if len(images) != len(labels):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


def load_cifar(name: str, data_dir: str | os.PathLike, download_missing: bool):
    """The whole training and test sets of ``cifar10`` or ``cifar100`` from ``data_dir``
    (downloaded there first when files are missing, ``download_missing`` is set and the
    network allows)."""
    folder, train_files, test_files, label_key, url = FILES[name]
    root = Path(data_dir)
    needed = [root / folder / f for f in train_files + test_files]
    if download_missing and not all(p.is_file() for p in needed):
        download(name, root)
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise DataError(f"{name}: {missing[0]} not found; download {url} and extract it into "
                        f"{root.resolve()} (or pass --data_dir DIR holding {folder}/)")
    train = [read_batch(p, label_key) for p in needed[:len(train_files)]]
    test = [read_batch(p, label_key) for p in needed[len(train_files):]]
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
            np.concatenate([x for x, _ in test]), np.concatenate([y for _, y in test]))


def download(name: str, root: Path) -> None:
    """Downloads CIFAR with torchvision; quietly does nothing when there is no network.

    torchvision creates ``root`` before it tries the network; a failed download removes the
    folder again if it did not exist before, so bad input leaves nothing behind.
    """
    existed = root.exists()
    try:
        from train._torchvision import import_torchvision

        datasets = import_torchvision().datasets
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        cls(str(root), train=True, download=True)
    except Exception:  # no network, or no torchvision: the caller names the missing file
        if not existed:
            shutil.rmtree(root, ignore_errors=True)
