"""Data-path throughput (images/s) on the CPU: streamed decoding with 0/1/2 workers against the
cached in-memory path, on a generated folder of JPEGs, in one run.

* ``cached``: :func:`train.folder.load_folder` decodes every image once (timed apart, as
  ``decode once``) into a uint8 tensor; an epoch is :func:`train.data.train_batches` (random
  crop with padding + flip by one gather, then normalisation).
* ``stream``: :func:`train.stream.make_loader` decodes every image again each epoch with Pillow
  in ``workers`` DataLoader processes (RandomResizedCrop + flip), and
  :func:`train.stream.stream_batches` normalises; the workers persist across epochs, so the
  first epoch (which starts them) is reported apart from the later ones.

Every epoch is consumed whole (no model), so this is the data path's ceiling. Each row gives the
median images/s over ``--epochs`` epochs after the first, and the ratio to the cached path.

    python bench/bench_stream.py                    # 2,000 JPEGs of 64x64 to 56x56, 5 epochs
    python bench/bench_stream.py --images 5000 --source 256 --image_size 224 --workers 0 2 4 8
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.data import epoch_generator, train_batches  # noqa: E402
from train.folder import load_folder  # noqa: E402
from train.stream import load_stream, make_loader, stream_batches  # noqa: E402
from train.stream.augment import resolve_backend  # noqa: E402

CLASSES = 10


def write_jpegs(root: Path, images: int, side: int, seed: int = 0) -> None:
    """``images`` training JPEGs (``CLASSES`` balanced classes) and 5 test images a class."""
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", images // CLASSES), ("test", 5)):
        for c in range(CLASSES):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                noise = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
                noise.resize((side, side), Image.BICUBIC).save(folder / f"{i:05d}.jpg",
                                                               quality=90)


def timed_epochs(epoch_iter, epochs: int) -> list[float]:
    """Seconds of each epoch; ``epoch_iter(e)`` yields the batches of epoch ``e``."""
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        for _ in epoch_iter(epoch):
            pass
        times.append(time.perf_counter() - start)
    return times


def row(name: str, n: int, times: list[float], cached: float | None) -> tuple:
    steady = n / statistics.median(times[1:])
    ratio = "1.00x" if cached is None else f"{steady / cached:.3f}x"
    return name, f"{n / times[0]:,.0f}", f"{steady:,.0f}", ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="training JPEGs to generate")
    parser.add_argument("--source", type=int, default=64, help="side of the generated JPEGs")
    parser.add_argument("--image_size", type=int, default=56, help="side of the batches")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5, help="epochs per path (>= 2)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--backend", default="auto", help="auto, torchvision or tensor")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core for the main process; workers take the others

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_jpegs(root, args.images, args.source)
        start = time.perf_counter()
        cached_data = load_folder(root, image_size=args.image_size, cache_dir=Path(tmp) / "c")
        decode_s = time.perf_counter() - start
        n, decoded = len(cached_data.train_y), len(cached_data.train_y) + len(cached_data.test_y)
        times = timed_epochs(lambda e: train_batches(cached_data, args.batch_size,
                                                     epoch_generator(0, e)), args.epochs)
        rows = [row("cached (train_batches)", n, times, None)]
        cached = float(rows[0][2].replace(",", ""))
        streamed = load_stream(root, image_size=args.image_size)
        for workers in args.workers:
            loader = make_loader(streamed.train, True, args.batch_size, workers=workers,
                                 image_size=args.image_size, backend=args.backend)
            times = timed_epochs(lambda e, loader=loader: stream_batches(loader, streamed.spec, e),
                                 args.epochs)
            rows.append(row(f"stream, {workers} workers", n, times, cached))
            del loader  # ends its workers before the next row starts its own

    print(f"# {datetime.date.today()}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, backend "
          f"{resolve_backend(args.backend)}")
    print(f"# {n} JPEGs {args.source}x{args.source} -> {args.image_size}x{args.image_size}, "
          f"batch {args.batch_size}, {args.epochs} epochs; cached decode once: "
          f"{decode_s:.2f} s ({decoded / decode_s:,.0f} images/s, {decoded} images of both splits)")
    print("| path | first epoch images/s | later epochs images/s (median) | vs cached |")
    print("|---|---|---|---|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
