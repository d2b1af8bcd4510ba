"""One Hessian-vector product over 10,000 CIFAR-shaped images and one 51 x 51 loss surface: time
and peak memory, with the project's own operators.

* HVP: ``landscape.hvp.GroupHessian`` (float64 by default, the analysis default) over
  ``--images`` random CIFAR-shaped images of a ResNet-32 (or ``--model resnet34``) in eval
  mode; one warm-up product, then ``--repeats`` timed products (median).
* Surface: ``landscape.surface.SurfaceEvaluator`` (float32, the surface default) over the same
  images along two random filter-normalised directions, on a ``--grid`` x ``--grid`` grid on
  [-1, 1]^2; one warm-up point, then the whole grid timed.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` of each part; on the CPU the peak
resident set size of the process (it only grows, so it bounds both parts together).

Under ``torchrun`` the work is shared as in ``python -m landscape`` (samples of the HVP, grid
points of the surface) and rank 0 prints::

    python bench/bench_analysis_device.py --quick                     # CPU-sized
    python bench/bench_analysis_device.py --device cuda               # 10,000 images, 51 x 51
    torchrun --standalone --nproc_per_node 2 bench/bench_analysis_device.py --quick
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from landscape import _distributed  # noqa: E402
from landscape.directions import random_directions  # noqa: E402
from landscape.hvp import GroupHessian  # noqa: E402
from landscape.surface import SurfaceEvaluator, grid_axis  # noqa: E402
from train.data import SPECS, normalize  # noqa: E402
from train.losses import build_loss  # noqa: E402
from train.models import build_model, count_parameters  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (device)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process RSS)"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    gpu = "GPU present, not used" if torch.cuda.is_available() else "no GPU"
    threads = torch.get_num_threads()
    return f"{os.cpu_count()}-core CPU ({platform.machine()}, {threads} threads), {gpu}"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("resnet32", "resnet34"), default="resnet32")
    p.add_argument("--images", type=int, default=None, help="[10000; --quick: 128]")
    p.add_argument("--grid", type=int, default=None, help="points per axis [51; --quick: 3]")
    p.add_argument("--repeats", type=int, default=None, help="timed HVPs [3; --quick: 1]")
    p.add_argument("--hvp_dtype", choices=("float64", "float32"), default=None,
                   help="[float64, the analysis default; --quick: float32, because float64 "
                        "convolutions on a CPU take PyTorch's slow reference path]")
    p.add_argument("--hvp_batch", type=int, default=None,
                   help="samples per HVP forward [the operator's default]")
    p.add_argument("--surface_batch", type=int, default=None,
                   help="samples per surface forward [the evaluator's default]")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="a short run sized for a CPU")
    args = p.parse_args(argv)
    args.images = args.images if args.images is not None else (128 if args.quick else 10000)
    args.grid = args.grid if args.grid is not None else (3 if args.quick else 51)
    args.hvp_dtype = args.hvp_dtype or ("float32" if args.quick else "float64")
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    problems = [f"--{name} must be >= {low}" for name, low in
                (("images", 1), ("grid", 2), ("repeats", 1)) if getattr(args, name) < low]
    problems += [f"--{name} must be >= 1" for name in ("hvp_batch", "surface_batch")
                 if getattr(args, name) is not None and getattr(args, name) < 1]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        problems.append(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append("--device cuda asked for, but CUDA is not available")
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        sys.exit(2)
    return args


def main(argv=None) -> None:
    args = parse(argv)
    device = torch.device(_distributed.setup(args.device) or args.device)
    say = print if _distributed.is_writer() else (lambda *a, **k: None)
    spec = SPECS["cifar100"]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), generator=g, dtype=torch.uint8)
    targets = torch.randint(0, spec.num_classes, (args.images,), generator=g)
    inputs = normalize(images, spec).to(device)
    targets = targets.to(device)
    model = build_model(args.model, spec.image_shape, spec.num_classes, seed=0).to(device).eval()
    loss_fn = build_loss("CE", [1] * spec.num_classes, 0.05, 0.75).to(device)
    say(f"# analysis on the device, {machine(device)}, {_distributed.world()} process(es), "
        f"torch {torch.__version__}, {datetime.date.today()}")
    say(f"# {args.model} ({count_parameters(model):,} parameters), {args.images:,} CIFAR-shaped "
        f"images; HVP {args.hvp_dtype}, surface float32 {args.grid} x {args.grid}")

    # One Hessian-vector product.
    reset_peak(device)
    dtype = torch.float64 if args.hvp_dtype == "float64" else torch.float32
    op = GroupHessian(model, loss_fn, inputs, targets, batch_size=args.hvp_batch, dtype=dtype)
    v = torch.randn(op.n_params, generator=torch.Generator().manual_seed(1), dtype=dtype)
    op.matvec(v)  # warm-up
    times = []
    for _ in range(args.repeats):
        sync(device)
        began = time.perf_counter()
        op.matvec(v)
        sync(device)
        times.append(time.perf_counter() - began)
    hvp_seconds, hvp_memory, hvp_batch = statistics.median(times), peak_mib(device), op.batch_size
    del op

    # One surface.
    reset_peak(device)
    directions = [d.vector for d in random_directions(model, 2, seed=0)]
    memberships = torch.ones(1, args.images, dtype=torch.bool)
    evaluator = SurfaceEvaluator(model, loss_fn, inputs, targets, memberships, directions,
                                 batch_size=args.surface_batch)
    axis = grid_axis(args.grid)
    b, a = np.meshgrid(axis, axis, indexing="ij")
    coords = np.stack([a.reshape(-1), b.reshape(-1)], axis=1)
    evaluator(coords[:1])  # warm-up
    sync(device)
    began = time.perf_counter()
    loss, _ = _distributed.evaluate_shared(evaluator, coords)
    sync(device)
    surface_seconds = time.perf_counter() - began
    assert np.isfinite(loss).all()

    say("| part | size | seconds | per unit | peak memory |")
    say("|---|---|---|---|---|")
    say(f"| HVP (median of {args.repeats}) | {args.images:,} images, batch {hvp_batch} | "
        f"{hvp_seconds:.2f} | {args.images / hvp_seconds:.0f} images/s | {hvp_memory} |")
    say(f"| surface | {len(coords)} points x {args.images:,} images, batch "
        f"{evaluator.batch_size} | {surface_seconds:.1f} | {surface_seconds / len(coords):.3f} "
        f"s/point | {peak_mib(device)} |")
    _distributed.barrier()
    if _distributed.world() > 1:
        from train.distributed import cleanup

        cleanup()


if __name__ == "__main__":
    main()
