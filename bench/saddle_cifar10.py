"""The saddle question on real CIFAR-10-LT: SGD, SAM, ImbSAM and SSE-SAM, then the saddle report.

    .venv/bin/python bench/saddle_cifar10.py --root checkpoints/cifar10-lt            # everything
    .venv/bin/python bench/saddle_cifar10.py --root checkpoints/cifar10-lt --stage train --jobs 2

Every stage resumes: run it again after an interruption and it carries on where it stopped
(training from each run's newest checkpoint, the analysis from its per-checkpoint caches).

Stages:

1. ``data``: real CIFAR-10 from the JPEG archive (``--archive``, all 60,000 images; see
   ``../shared/data/README.md``) is decoded once with Pillow into the standard CIFAR python
   batches under ``ROOT/data/cifar-10-batches-py`` (classes in sorted-name order = CIFAR-10's
   label order; within a class, the archive's file order), so that ``--dataset cifar10
   --selection first`` keeps the first ``n_c`` images of every class, as the SSE-SAM code does.
   CIFAR-10-LT IF=100 then holds 5000, 2997, ..., 50 images (12,406); the test set all 10,000.
2. ``train``: the runs of :data:`RUNS` (``--jobs`` at a time, one CPU thread each).
3. ``report``: the saddle report across the runs (see :func:`report`).

The choices (measured first, see RESULTS.md): ResNet-8 (the CIFAR ResNet family at 1 block a
stage, 75k parameters, BatchNorm), 30 epochs, batch 128, lr 0.1 cosine, weight decay 5e-4, CE.
``eta = 1000``: the tail is the classes with fewer than 1,000 images (classes 4-9, 1,536
images), which mirrors the paper's CIFAR-100 choice (eta = 100 = n_max / 5: Medium and Few are
tail).
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
COMMON = dict(dataset="cifar10", imb_factor=100.0, selection="first", eta=1000.0, model="resnet8",
              loss="CE", epochs=30, batch_size=128, lr=0.1, momentum=0.9, wd=5e-4, save_every=5,
              device="cpu")
# name -> the optimizer's settings. ImbSAM is the ImbSAM authors' own code (batch-mean
# normalisation, tail loss x2) with SSE-SAM's tail radius, so that it differs from SSE-SAM's
# second stage only by that factor; SAM uses the seed's rho.
RUNS = {
    "sgd-s9826": dict(opt="sgd", seed=9826),
    "ssesam-s9826": dict(opt="ssesam", head_rho=0.05, tail_rho=0.1, gamma=0.7, seed=9826),
    "sam-s9826": dict(opt="sam", rho=0.05, seed=9826),
    "imbsam-s9826": dict(opt="imbsam", rho=0.1, tail_scale=2.0, seed=9826),
    "sgd-s1": dict(opt="sgd", seed=1),
    "ssesam-s1": dict(opt="ssesam", head_rho=0.05, tail_rho=0.1, gamma=0.7, seed=1),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# 1. Data


def build_data(archive: Path, root: Path) -> Path:
    """Decodes the JPEG archive into CIFAR python batches under ``root/data`` (once)."""
    from PIL import Image

    from train.io import atomic_write_bytes

    folder = root / "data" / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if all((folder / n).is_file() for n in names):
        return root / "data"
    if not archive.is_file():
        sys.exit(f"saddle_cifar10: archive {archive} not found (pass --archive)")
    log(f"decoding {archive}")
    images: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in images:
                continue
            split, label = parts[-3], parts[-2]
            raw = io.BytesIO(tar.extractfile(member).read())
            pixels = np.asarray(Image.open(raw).convert("RGB"))
            images[split].setdefault(label, []).append((parts[-1], pixels))
    classes = sorted(images["train"])
    folder.mkdir(parents=True, exist_ok=True)

    def batch(split):
        x, y = [], []
        for c, name in enumerate(classes):
            for _, pixels in sorted(images[split][name], key=lambda item: item[0]):
                x.append(pixels.transpose(2, 0, 1).reshape(-1))
                y.append(c)
        return np.stack(x), y

    x, y = batch("train")
    for i in range(5):
        part = {"data": x[i * 10000:(i + 1) * 10000], "labels": y[i * 10000:(i + 1) * 10000]}
        atomic_write_bytes(folder / names[i], pickle.dumps(part, protocol=2))
    x, y = batch("test")
    atomic_write_bytes(folder / "test_batch", pickle.dumps({"data": x, "labels": y}, protocol=2))
    log(f"wrote {folder} ({len(classes)} classes)")
    return root / "data"


# --------------------------------------------------------------------------------------------
# 2. Training


def config_of(name: str, data_dir: Path):
    from train.config import Config

    return Config(**COMMON, **RUNS[name], data_dir=str(data_dir))


def finished(run_dir: Path) -> bool:
    return (run_dir / f"epoch_{COMMON['epochs']:04d}.pt").is_file()


def train_one(name: str, root: Path) -> None:
    """Trains (or resumes) one run in this process, on one CPU thread."""
    import torch

    from train.loop import train

    torch.set_num_threads(1)
    out = root / "runs" / name
    if finished(out):
        return
    resume = (out / "config.json").is_file()
    train(config_of(name, root / "data"), out, resume=resume, progress=False, log=log)


def train_all(root: Path, jobs: int, names) -> None:
    """Runs :func:`train_one` for every unfinished run, ``jobs`` processes at a time."""
    pending = [n for n in names if not finished(root / "runs" / n)]
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            log(f"training {name}")
            logfile = open(root / f"train-{name}.log", "a")
            running.append((name, subprocess.Popen(
                [sys.executable, __file__, "--root", str(root), "--stage", "train-one", name],
                stdout=logfile, stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"})))
        time.sleep(5)
        for name, proc in list(running):
            if proc.poll() is not None:
                running.remove((name, proc))
                log(f"{name} exited {proc.returncode}")
                if proc.returncode != 0:
                    sys.exit(f"saddle_cifar10: training {name} failed, see {root}/train-{name}.log")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=ROOT / "checkpoints" / "cifar10-lt")
    p.add_argument("--archive", type=Path, default=ARCHIVE)
    p.add_argument("--stage", choices=["all", "data", "train", "train-one", "report"],
                   default="all")
    p.add_argument("--jobs", type=int, default=2, help="training processes at a time")
    p.add_argument("runs", nargs="*", default=list(RUNS), help="which runs (default: all)")
    args = p.parse_args(argv)
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    if args.stage == "train-one":
        train_one(args.runs[0], root)
        return 0
    if args.stage in ("all", "data", "train"):
        build_data(args.archive, root)
    if args.stage in ("all", "train"):
        train_all(root, args.jobs, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
