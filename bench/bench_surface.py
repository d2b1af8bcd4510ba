"""Grid points per second of a 2-D loss surface: landscape.surface against the plain approach.

Side by side, on a fixed model (seeded initial weights) and fixed data, for the same grid:

* ``reference``: a Python loop over grid points that loads the perturbed weights with
  ``load_state_dict`` and evaluates the head, tail and overall losses (and accuracies) as three
  separate passes, each over its own samples;
* ``loop``: :class:`landscape.surface.SurfaceEvaluator` with ``method="loop"`` (parameters as views
  of one flat buffer, one pass per point for all groups);
* ``vmap``: the same with ``method="vmap"`` (``torch.func.vmap`` over chunks of points).

Each configuration is timed ``--repeats`` times, the three approaches interleaved so that they
share the machine's load, and the median is reported, with the ratio to the reference.

    .venv/bin/python bench/bench_surface.py              # digits MLP, digits CNN, ResNet-32
    .venv/bin/python bench/bench_surface.py --quick      # smaller grids, 3 repeats
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from landscape.directions import random_directions  # noqa: E402
from landscape.surface import SurfaceEvaluator  # noqa: E402
from train.data import load_dataset, normalize, split_groups  # noqa: E402
from train.models import build_model  # noqa: E402


def reference(model, groups, directions, coords) -> None:
    """The plain approach: load_state_dict per point, one pass per group."""
    names = [name for name, _ in model.named_parameters()]
    base = {k: v.clone() for k, v in model.state_dict().items()}
    parts = []
    for d in directions:  # per-parameter views of each flat direction
        offset, views = 0, []
        for name in names:
            size = base[name].numel()
            views.append(d[offset:offset + size].view_as(base[name]))
            offset += size
        parts.append(views)
    model.eval()
    for a, b in coords:
        state = dict(base)
        for k, name in enumerate(names):
            state[name] = base[name] + a * parts[0][k] + b * parts[1][k]
        model.load_state_dict(state)
        with torch.no_grad():
            for x, y in groups:
                logits = model(x)
                float(F.cross_entropy(logits, y))
                float((logits.argmax(1) == y).float().mean())
    model.load_state_dict(base)


def case(name, model, x, y, tail_classes, grid, repeats, chunk):
    is_tail = torch.isin(y, torch.tensor(tail_classes))
    memberships = torch.stack([~is_tail, is_tail, torch.ones_like(is_tail)])
    groups = [(x[~is_tail], y[~is_tail]), (x[is_tail], y[is_tail]), (x, y)]
    directions = [d.vector for d in random_directions(model, 2, seed=0)]
    axis = np.linspace(-1, 1, grid)
    coords = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    loss_fn = lambda logits, t: F.cross_entropy(logits, t, reduction="none")  # noqa: E731
    evaluators = {
        "loop": SurfaceEvaluator(model, loss_fn, x, y, memberships, directions, method="loop"),
        "vmap": SurfaceEvaluator(model, loss_fn, x, y, memberships, directions, method="vmap",
                                 chunk=chunk),
    }
    runs = {"reference": lambda: reference(model, groups, directions, coords),
            **{k: (lambda e=e: e(coords)) for k, e in evaluators.items()}}
    for fn in runs.values():  # warm-up (allocator, first-call overheads)
        fn()
    seconds = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            began = time.perf_counter()
            fn()
            seconds[k].append(time.perf_counter() - began)
    rate = {k: len(coords) / statistics.median(v) for k, v in seconds.items()}
    return {"case": name, "points": len(coords), "samples": int(y.shape[0]), **rate}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller grids, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--chunk", type=int, default=8, help="points per vmapped call")
    parser.add_argument("--cases", default="mlp,cnn,resnet32",
                        help="comma-separated subset of mlp, cnn, resnet32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    data = load_dataset("digits", 20.0)
    x, y = normalize(data.train_x, data.spec), data.train_y
    tail = split_groups(data.counts, 40)["tail"]
    cifar_x = torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cifar_y = torch.arange(128) % 10
    cases = {
        "mlp": ("digits MLP (width 64)", build_model("mlp", (1, 8, 8), 10, 64, seed=0), x, y,
                tail, 11 if args.quick else 21),
        "cnn": ("digits CNN (width 16, BN)", build_model("cnn", (1, 8, 8), 10, 16, seed=0), x, y,
                tail, 7 if args.quick else 11),
        "resnet32": ("ResNet-32, 128 CIFAR-shaped images",
                     build_model("resnet32", (3, 32, 32), 10, 16, seed=0), cifar_x, cifar_y,
                     list(range(5, 10)), 2 if args.quick else 3),
    }
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in cases]
    if unknown:
        print(f"error: unknown case {unknown[0]!r} (choose from {', '.join(cases)})",
              file=sys.stderr)
        return 2
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {repeats}, load average before "
          f"{os.getloadavg()[0]:.1f}")
    print("| case | grid points | samples | reference pts/s | loop pts/s | vmap pts/s "
          "| loop / ref | vmap / ref |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model, xs, ys, tail_classes, grid in (cases[c] for c in chosen):
        r = case(name, model, xs, ys, tail_classes, grid, repeats, args.chunk)
        print(f"| {r['case']} | {r['points']} | {r['samples']} | {r['reference']:.1f} | "
              f"{r['loop']:.1f} | {r['vmap']:.1f} | {r['loop'] / r['reference']:.2f}x | "
              f"{r['vmap'] / r['reference']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
