"""Training throughput (images/s): our device path against a seed-style loop, side by side.

For every (model, optimizer, batch size) the two loops train the same model on the same
CIFAR-shaped long-tailed data (random ``uint8`` images in a ``LongTailData``, CIFAR-100-LT
IF 100 class profile, 10,847 images) on the same device, one after the other in one run:

* ``ours``: ``train.loop.Trainer``: the whole training set on the device, batches drawn from
  the epoch's permutation, crop + flip batched on the device, the group-SAM step (SGD 1F+1B,
  SSE-SAM stage I 3F+4B), no host synchronisation inside a step; ``--channels_last``,
  ``--bf16``, ``--compile`` as the training CLI's flags.
* ``seed``: the seed code's shape: a ``torch.utils.data.DataLoader`` over a ``Dataset`` whose
  ``__getitem__`` pads, crops, flips and normalises one image at a time (per-image tensor
  ops; torchvision's transforms are not importable everywhere), the batch copied to the device,
  and for SSE-SAM 4 forwards + 4 backwards with ``train.optim.SSESAM`` (boolean tail masks);
  SGD is a plain 1F+1B ``torch.optim.SGD`` step.

Both loops run ``--warmup`` untimed steps; then ``--rounds`` rounds alternate between them
(so a change in the machine's load hits both), each round timing ``--steps`` consecutive steps
of one loop with the device synchronised at both ends. The table gives the median images/s
per step and the ratio ours / seed (and on CUDA the peak device memory of each loop).

    python bench/bench_train_throughput.py --quick            # CPU-sized default run
    python bench/bench_train_throughput.py --device cuda --rounds 5 --steps 20
    python bench/bench_train_throughput.py --device cuda --channels_last --bf16
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import Config  # noqa: E402
from train.data import SPECS, LongTailData, class_counts, epoch_generator, split_groups, \
    train_batches  # noqa: E402
from train.loop import Trainer  # noqa: E402
from train.models import build_model  # noqa: E402
from train.optim import SSESAM  # noqa: E402

HEAD_RHO, TAIL_RHO, GAMMA, EPOCHS, ETA = 0.05, 0.1, 0.7, 200, 100


def cifar_shaped_data(seed: int = 0) -> LongTailData:
    """CIFAR-100-LT (IF 100) shaped: 10,847 random uint8 training images, 1,000 test images."""
    spec = SPECS["cifar100"]
    counts = class_counts(spec.n_max, spec.num_classes, 100)
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    x = torch.randint(0, 256, (len(y), 3, 32, 32), generator=g, dtype=torch.uint8)
    test_y = torch.arange(spec.num_classes).repeat(10)
    test_x = torch.randint(0, 256, (len(test_y), 3, 32, 32), generator=g, dtype=torch.uint8)
    return LongTailData(spec, x, y, test_x, test_y, counts)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------
# Ours: the project's trainer.

def ours(model_name, opt, batch_size, data, device, flags):
    """A function running one training step of the project's trainer (stage I)."""
    config = Config(dataset="cifar100", model=model_name, opt=opt, batch_size=batch_size,
                    epochs=EPOCHS, head_rho=HEAD_RHO, tail_rho=TAIL_RHO, gamma=GAMMA, eta=ETA,
                    device=str(device), **flags)
    trainer = Trainer.build(config, data=data)
    trainer.model.train()
    rhos = config.preset().rhos(0)  # stage I

    def batches():
        epoch = 0
        while True:
            yield from train_batches(trainer.data, batch_size, epoch_generator(config.seed, epoch))
            epoch += 1

    stream = batches()

    def step():
        x, y = next(stream)
        trainer.train_step(x, y, rhos, y.shape[0])

    return step


# ------------------------------------------------------------------------------------------
# Seed-style: DataLoader with per-image transforms, SSESAM with 4 forwards + 4 backwards.

class PerImageDataset(torch.utils.data.Dataset):
    """Pad 4, random 32x32 crop, random flip, scale and normalise: one image per call."""

    def __init__(self, data: LongTailData):
        self.x, self.y, self.spec = data.train_x, data.train_y, data.spec
        self.mean = torch.tensor(self.spec.mean).view(3, 1, 1)
        self.std = torch.tensor(self.spec.std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        pad = self.spec.pad
        image = F.pad(self.x[i], (pad, pad, pad, pad))
        top, left = random.randint(0, 2 * pad), random.randint(0, 2 * pad)
        image = image[:, top:top + 32, left:left + 32]
        if random.random() < 0.5:
            image = image.flip(2)
        image = (image.float() / 255.0 - self.mean) / self.std
        return image, int(self.y[i])


def seed_style(model_name, opt, batch_size, data, device, workers):
    """A function running one seed-style training step."""
    model = build_model(model_name, (3, 32, 32), data.spec.num_classes, seed=0).to(device)
    model.train()
    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
    sse = SSESAM(base, model, head_rho=HEAD_RHO, tail_rho=TAIL_RHO, gamma=GAMMA,
                 total_epochs=EPOCHS)
    tail = torch.tensor(split_groups(data.counts, ETA)["tail"], device=device)
    criterion = nn.CrossEntropyLoss(reduction="none")
    loader = torch.utils.data.DataLoader(
        PerImageDataset(data), batch_size=batch_size, shuffle=True, num_workers=workers,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0)

    def group_loss(x, y, mask):
        return criterion(model(x)[mask], y[mask]).sum() / y.shape[0]

    def step(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if opt == "sgd":
            base.zero_grad()
            criterion(model(x), y).mean().backward()
            base.step()
            return
        is_tail = torch.isin(y, tail)
        for group, mask in enumerate((~is_tail, is_tail)):  # 2 forwards + 2 backwards each
            group_loss(x, y, mask).backward()
            sse.compute_and_add_epsilon(n_i=group)
            group_loss(x, y, mask).backward()
            sse.compute_grad_sum_and_restore_p()
        sse.update()

    def stream():
        while True:
            yield from loader

    batches = stream()
    return lambda: step(*next(batches))


def measure(runners: dict, device: torch.device, rounds: int, steps: int, warmup: int) -> dict:
    """Median seconds per step of each runner (see the module docstring)."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    sync(device)
    times: dict = {name: [] for name in runners}
    for r in range(rounds):
        order = list(runners) if r % 2 == 0 else list(runners)[::-1]
        for name in order:
            began = time.perf_counter()
            for _ in range(steps):
                runners[name]()
            sync(device)
            times[name].append((time.perf_counter() - began) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


# ------------------------------------------------------------------------------------------

def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    gpu = "GPU present, not used" if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()}-core CPU ({platform.machine()}, {torch.get_num_threads()} "
            f"threads), {gpu}")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet32,resnet34")
    p.add_argument("--opts", default="sgd,ssesam")
    p.add_argument("--batch_sizes", default="64,128")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds [5; --quick: 3, 1 for resnet34]")
    p.add_argument("--steps", type=int, default=None, help="steps per round [10; --quick: 1]")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps [5; --quick: 1]")
    p.add_argument("--quick", action="store_true", help="a short run sized for a CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers of the seed-style loop [4 on CUDA, 0 on the CPU]")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    try:
        args.models = [m for m in args.models.split(",") if m]
        args.opts = [o for o in args.opts.split(",") if o]
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
        bad = ([m for m in args.models if m not in ("resnet32", "resnet34")] +
               [o for o in args.opts if o not in ("sgd", "ssesam")])
        if bad:
            raise ValueError(f"unknown model or optimizer {bad[0]!r} (models resnet32, "
                             "resnet34; optimizers sgd, ssesam)")
        if any(b < 1 for b in args.batch_sizes) or not args.batch_sizes:
            raise ValueError("batch sizes must be integers >= 1")
        for name in ("rounds", "steps", "warmup", "workers"):
            if getattr(args, name) is not None and getattr(args, name) < 0:
                raise ValueError(f"--{name} must be >= 0")
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        args.device = torch.device(args.device)
        if args.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but CUDA is not available")
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    args.rounds_given = args.rounds is not None
    args.rounds = args.rounds if args.rounds is not None else (3 if args.quick else 5)
    args.steps = args.steps if args.steps is not None else (1 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    if args.steps < 1 or args.rounds < 1:
        print("error: --steps and --rounds must be >= 1", file=sys.stderr)
        sys.exit(2)
    if args.workers is None:
        args.workers = 4 if args.device.type == "cuda" else 0
    return args


def main(argv=None) -> None:
    args = parse(argv)
    flags = {"channels_last": args.channels_last, "bf16": args.bf16, "compile": args.compile}
    data = cifar_shaped_data()
    print(f"# training throughput, {machine(args.device)}, torch {torch.__version__}, "
          f"{datetime.date.today()}")
    print(f"# {len(data.train_y)} CIFAR-shaped images; {args.warmup} warm-up steps, then "
          f"{args.rounds} alternating rounds"
          f"{' (1 for resnet34)' if args.quick and not args.rounds_given else ''} of "
          f"{args.steps} timed step(s), median per step; "
          f"ours: {', '.join(k for k, v in flags.items() if v) or 'float32'}; seed-style "
          f"DataLoader workers: {args.workers}; SSE-SAM in stage I (ours 3F+4B, seed 4F+4B)")
    print("| model | optimizer | batch | seed-style img/s | ours img/s | ours / seed |"
          + (" peak MiB seed / ours |" if args.device.type == "cuda" else ""))
    print("|---|---|---|---|---|---|" + ("---|" if args.device.type == "cuda" else ""))
    on_device = data.to(args.device)
    for model_name in args.models:
        for opt in args.opts:
            for batch_size in args.batch_sizes:
                runners, peaks = {}, {}
                for name in ("seed", "ours"):
                    if args.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(args.device)
                    runners[name] = (seed_style(model_name, opt, batch_size, data, args.device,
                                                args.workers) if name == "seed" else
                                     ours(model_name, opt, batch_size, on_device, args.device,
                                          flags))
                    for _ in range(args.warmup):
                        runners[name]()
                    if args.device.type == "cuda":
                        peaks[name] = torch.cuda.max_memory_allocated(args.device) / 2**20
                rounds = args.rounds
                if args.quick and not args.rounds_given and model_name == "resnet34":
                    rounds = 1  # ~15 s per forward + backward at batch 64 on 2 CPU cores
                seconds = measure(runners, args.device, rounds, args.steps, warmup=0)
                seed, fast = batch_size / seconds["seed"], batch_size / seconds["ours"]
                memory = (f" {peaks['seed']:.0f} / {peaks['ours']:.0f} |" if peaks else "")
                print(f"| {model_name} | {opt} | {batch_size} | {seed:.1f} | {fast:.1f} | "
                      f"{fast / seed:.2f}x |{memory}", flush=True)
                del runners

if __name__ == "__main__":
    main()
