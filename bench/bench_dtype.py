"""float64 against float32 Hessian-vector products, and a block of 10 against 10 single products,
for models of increasing size: the measurements behind ``landscape.hessian.auto_dtype`` (the
analysis dtype's parameter-count threshold) and ``landscape.slq.default_probe_batch`` (when SLQ
multiplies its probes together).

    .venv/bin/python bench/bench_dtype.py                 # CPU, one thread, ~2 minutes
    .venv/bin/python bench/bench_dtype.py --device cuda --threads 8 --samples 512

Each model is freshly initialised (a product's cost does not depend on the weights' values) and
evaluated on ``--samples`` random inputs of its dataset's shape with random labels, cross
entropy, eval mode, through :class:`landscape.hvp.GroupHessian` (its default method). Times are
the minimum over ``--repeats`` interleaved repetitions, after one warm-up. Figures go to
BENCHMARKS.md ("Analysis dtype and probe blocks").
"""

from __future__ import annotations

import argparse
import time

import torch

from landscape.hvp import GroupHessian
from train.models import build_model, count_parameters

# (label, model, width, input shape, classes): digits-sized MLPs and CNN, then CIFAR ResNets.
MODELS = [
    ("MLP-16", "mlp", 16, (1, 8, 8), 10),
    ("MLP-64 (the demo's)", "mlp", 64, (1, 8, 8), 10),
    ("MLP-256", "mlp", 256, (1, 8, 8), 10),
    ("MLP-1024", "mlp", 1024, (1, 8, 8), 10),
    ("CNN-16", "cnn", 16, (1, 8, 8), 10),
    ("ResNet-8", "resnet8", 16, (3, 32, 32), 100),
    ("ResNet-20", "resnet20", 16, (3, 32, 32), 100),
    ("ResNet-32", "resnet32", 16, (3, 32, 32), 100),
]


def _operator(model, shape, classes, samples, dtype, device) -> GroupHessian:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, *shape, generator=generator)
    y = torch.randint(0, classes, (samples,), generator=generator)
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    return GroupHessian(model, loss, x.to(device), y.to(device), dtype=dtype)


def _seconds(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


def measure(label, name, width, shape, classes, args, device) -> dict:
    model = build_model(name, shape, classes, width=width, seed=0).eval()
    n = count_parameters(model)
    ops = {dt: _operator(model, shape, classes, args.samples, dt, device)
           for dt in (torch.float64, torch.float32)}
    block = torch.randn(n, 10, dtype=torch.float64)
    cases = {
        "f64": lambda: ops[torch.float64].matmat(block[:, :1]),
        "f32": lambda: ops[torch.float32].matmat(block[:, :1]),
        "f64 block 10": lambda: ops[torch.float64].matmat(block),
        "f64 10 singles": lambda: [ops[torch.float64].matmat(block[:, k:k + 1])
                                   for k in range(10)],
    }
    if n > args.block_limit:  # a ResNet's block of 10 in float64 is minutes on a CPU
        cases.pop("f64 block 10")
        cases.pop("f64 10 singles")
    for fn in cases.values():  # warm-up: graph caches, allocator, kernels
        fn()
    best = {key: float("inf") for key in cases}
    for _ in range(args.repeats):
        for key, fn in cases.items():
            best[key] = min(best[key], _seconds(fn, device))
    return {"label": label, "params": n, **best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block_limit", type=int, default=300_000,
                        help="skip the block measurements above this many parameters")
    parser.add_argument("--only", help="comma-separated labels' prefixes to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, {args.threads} thread(s), {args.samples} "
          f"samples, min of {args.repeats}")
    print("| model | params | 1 HVP f64 (ms) | 1 HVP f32 (ms) | f64 / f32 | block of 10 f64 "
          "(ms) | 10 singles f64 (ms) | block / singles |")
    print("|---|---|---|---|---|---|---|---|")
    wanted = None if args.only is None else tuple(args.only.split(","))
    for entry in MODELS:
        if wanted is not None and not entry[0].startswith(wanted):
            continue
        r = measure(*entry, args, device)
        block = r.get("f64 block 10")
        singles = r.get("f64 10 singles")
        tail = (f"{1e3 * block:.2f} | {1e3 * singles:.2f} | {block / singles:.2f}"
                if block is not None else "not measured | | ")
        print(f"| {r['label']} | {r['params']:,} | {1e3 * r['f64']:.2f} | {1e3 * r['f32']:.2f} | "
              f"{r['f64'] / r['f32']:.2f} | {tail} |", flush=True)


if __name__ == "__main__":
    main()
