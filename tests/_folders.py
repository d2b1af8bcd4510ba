"""Small image folders for the folder-dataset tests (written by the tests, PNG: lossless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["pixels", "write_folder"]


def pixels(label: int, index: int, size=(8, 8)) -> np.ndarray:
    """A distinct, deterministic RGB image for (label, index)."""
    rng = np.random.default_rng(1000 * label + index)
    return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def write_folder(root: Path, per_class=(6, 6, 6), test=2, names=("b_cat", "a_dog", "c_emu"),
                 size=(8, 8), suffix=".png") -> Path:
    """``root/{train,test}/<name>/NNN.png`` with ``per_class`` training images per class."""
    for split, counts in (("train", per_class), ("test", [test] * len(names))):
        for c, (name, n) in enumerate(zip(sorted(names), counts)):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(pixels(c + (100 if split == "test" else 0), i, size)).save(
                    root / split / name / f"{i:03d}{suffix}")
    return root
