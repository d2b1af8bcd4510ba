"""Step time of SAM, ImbSAM and SSE-SAM as a ratio to an SGD step, side by side in one run.

Every method gets its own copy of the same model and steps on the same batch; in each round
the methods run one after another (the order rotating between rounds, so none always runs
first), after warm-up rounds. A sample is the mean of ``k`` consecutive steps, ``k`` chosen so
that an SGD sample lasts at least 20 ms (1 for ResNet-32 on a CPU). Ratios are taken within a
round (neighbouring measurements share the machine's load, which matters on a shared CPU) and
the median over rounds is reported, with each method's median step time. ``ours / seed`` is
our SSE-SAM step (3F+4B in stage I, 2F+3B in stage II) over a seed-style step (4F+4B, the seed
README's usage of the ``SSESAM`` class) in the same stage.

    python bench/bench_optim_step.py                  # ResNet-32 (CIFAR-100-LT batch) + MLP
    python bench/bench_optim_step.py --threads 1 --repeats 9
    python bench/bench_optim_step.py --device cuda --repeats 20
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.data import class_counts, split_groups  # noqa: E402
from train.losses import build_loss  # noqa: E402
from train.models import build_model, count_parameters  # noqa: E402
from train.optim import SSESAM, GroupSAM, group_sample_weights, preset  # noqa: E402

RHO, HEAD_RHO, TAIL_RHO, GAMMA, EPOCHS = 0.05, 0.05, 0.1, 0.7, 200
PASSES = {"sgd": "1F+1B", "sam": "2F+2B", "imbsam": "2F+3B", "ssesam-I": "3F+4B",
          "ssesam-II": "2F+3B", "seed-I": "4F+4B", "seed-II": "4F+4B"}

# name: (model, input shape, classes, n_max, imbalance factor, eta)
SETUPS = {
    "resnet32": ("resnet32", (3, 32, 32), 100, 500, 100, 100),  # CIFAR-100-LT, IF 100
    "mlp": ("mlp", (1, 8, 8), 10, 120, 100, 40),  # digits-LT
}


def _batch(setup, batch_size, device, seed=0):
    """Random images; labels drawn from the long-tailed class profile (so ~ realistic mix)."""
    _, shape, classes, n_max, imb, eta = setup
    gen = torch.Generator().manual_seed(seed)
    counts = torch.tensor(class_counts(n_max, classes, imb), dtype=torch.float)
    targets = torch.multinomial(counts, batch_size, replacement=True, generator=gen)
    inputs = torch.randn(batch_size, *shape, generator=gen)
    tail = split_groups(counts.long().tolist(), eta)["tail"]
    return inputs.to(device), targets.to(device), torch.tensor(tail, device=device)


def _group_step(model, name, epoch, inputs, targets, tail):
    """One GroupSAM step of preset ``name`` in ``epoch``, as the training loop makes it."""
    p = preset(name, rho=RHO, head_rho=HEAD_RHO, tail_rho=TAIL_RHO, gamma=GAMMA, epochs=EPOCHS)
    classes = model[-1].out_features if isinstance(model, nn.Sequential) else model.fc.out_features
    group_of_class = torch.zeros(classes, dtype=torch.long, device=inputs.device)
    if p.groups == ("head", "tail"):
        group_of_class[tail] = 1
    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
    step = GroupSAM(model, base)
    loss_fn = build_loss("CE", [1] * classes)
    rhos = p.rhos(epoch)

    def run():
        weights = group_sample_weights(targets, group_of_class, len(p.groups))
        step.step(inputs, targets, loss_fn, rhos, weights)

    return run


def _seed_step(model, stage, inputs, targets, tail_classes):
    """The seed README's usage of the SSESAM class: 4 forwards + 4 backwards per step."""
    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
    optimizer = SSESAM(base, model, head_rho=HEAD_RHO, tail_rho=TAIL_RHO, gamma=GAMMA,
                       total_epochs=EPOCHS)
    if stage == 2:
        optimizer.rho_is[0] = 0.0  # as after update_rho() passed gamma * epochs
    lossFunc = nn.CrossEntropyLoss(reduction="none")

    def run():
        tail_mask = torch.where((targets[:, None] == tail_classes[None, :]).sum(1) == 1, True,
                                False)
        logits = model(inputs)
        head_loss = lossFunc(logits[~tail_mask], targets[~tail_mask]).sum() / targets.size(0)
        head_loss.backward(retain_graph=True)
        optimizer.compute_and_add_epsilon(n_i=0)
        logits = model(inputs)
        head_loss = lossFunc(logits[~tail_mask], targets[~tail_mask]).sum() / targets.size(0)
        head_loss.backward(retain_graph=True)
        optimizer.compute_grad_sum_and_restore_p()
        logits = model(inputs)
        tail_loss = lossFunc(logits[tail_mask], targets[tail_mask]).sum() / targets.size(0)
        tail_loss.backward(retain_graph=True)
        optimizer.compute_and_add_epsilon(n_i=1)
        logits = model(inputs)
        tail_loss = lossFunc(logits[tail_mask], targets[tail_mask]).sum() / targets.size(0)
        tail_loss.backward(retain_graph=True)
        optimizer.compute_grad_sum_and_restore_p()
        optimizer.update()

    return run


def bench_setup(key, device, batch_size, repeats, warmup):
    setup = SETUPS[key]
    name, shape, classes = setup[:3]
    model = build_model(name, shape, classes, seed=0).to(device).train()
    inputs, targets, tail = _batch(setup, batch_size, device)
    late = EPOCHS - 1  # an epoch of stage II
    runs = {
        "sgd": _group_step(copy.deepcopy(model), "sgd", 0, inputs, targets, tail),
        "sam": _group_step(copy.deepcopy(model), "sam", 0, inputs, targets, tail),
        "imbsam": _group_step(copy.deepcopy(model), "imbsam", 0, inputs, targets, tail),
        "ssesam-I": _group_step(copy.deepcopy(model), "ssesam", 0, inputs, targets, tail),
        "ssesam-II": _group_step(copy.deepcopy(model), "ssesam", late, inputs, targets, tail),
        "seed-I": _seed_step(copy.deepcopy(model), 1, inputs, targets, tail),
        "seed-II": _seed_step(copy.deepcopy(model), 2, inputs, targets, tail),
    }
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def sample(run, k):
        sync()
        began = time.perf_counter()
        for _ in range(k):
            run()
        sync()
        return (time.perf_counter() - began) / k

    k = 1
    while sample(runs["sgd"], k) * k < 0.02 and k < 4096:
        k *= 2
    names = list(runs)
    times = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        measured = {n: sample(runs[n], k) for n in order}
        if r >= warmup:
            for n in names:
                times[n].append(measured[n])
    medians = {n: statistics.median(t) for n, t in times.items()}
    ratios = {n: statistics.median(a / b for a, b in zip(times[n], times["sgd"])) for n in names}
    for stage in ("I", "II"):
        ratios[f"ours/seed-{stage}"] = statistics.median(
            a / b for a, b in zip(times[f"ssesam-{stage}"], times[f"seed-{stage}"]))
    tail_share = float(torch.isin(targets, tail).float().mean())
    return model, medians, ratios, k, tail_share


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N [cpu]")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds [5]")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first [1]")
    parser.add_argument("--batch_size", type=int, default=128, help="[128]")
    parser.add_argument("--models", default="resnet32,mlp", help="resnet32, mlp [both]")
    parser.add_argument("--threads", type=int, help="torch intra-op threads [torch's default]")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, {args.warmup} warm-up + {args.repeats} timed rounds, "
          "medians")
    for key in args.models.split(","):
        model, med, ratio, k, tail_share = bench_setup(key, device, args.batch_size,
                                                       args.repeats, args.warmup)
        print(f"\n{key} ({count_parameters(model):,} params), tail share of the batch "
              f"{tail_share:.2f}, {k} step(s) per sample")
        print(f"{'step':<10} {'passes':>6} {'median ms':>10} {'x SGD':>7}")
        for n, t in med.items():
            print(f"{n:<10} {PASSES[n]:>6} {1e3 * t:>10.2f} {ratio[n]:>7.2f}")
        print(f"ours / seed-style: stage I {ratio['ours/seed-I']:.2f}, "
              f"stage II {ratio['ours/seed-II']:.2f}")


if __name__ == "__main__":
    main()
