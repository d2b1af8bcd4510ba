"""``perturbation="global"|"local"``: the all-reduces each mode makes, and per-rank SAM.

``local`` on 2 gloo ranks is compared with a float64 transcription of per-shard SAM written out
here: each shard's own ``e_G`` from its own gradient (the shard's samples with the global batch
weights), the gradients at the shards' perturbed weights summed, SGD with momentum and weight
decay by hand. Parameters agree to ``1e-12`` absolute after 3 steps (float64; the two differ
only in summation order). The same ranks with ``global`` must end more than ``1e-4`` away from
the transcription, so the comparison tells the modes apart.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
from _ranks import spawn_two_ranks
import torch
import torch.nn as nn

from train import distributed
from train.config import Config, ConfigError
from train.data import load_dataset
from train.loop import Trainer
from train.models import build_model
from train.optim import GroupSAM, OptimError, group_sample_weights, preset

NUM_CLASSES, TAIL, BATCH = 10, (6, 7, 8, 9), 23  # an uneven global batch: shards of 12 and 11
LR, MOMENTUM, WD = 0.1, 0.9, 1e-2
STEPS, ATOL = 3, 1e-12
# (optimizer, model, group reduction, tail scale): both groups perturbed (ssesam, stage I),
# an unperturbed head (imbsam, with group means), one group (sam), and BatchNorm (cnn).
CASES = {"ssesam": ("ssesam", "mlp", "batch", 1.0), "imbsam": ("imbsam", "mlp", "group", 2.0),
         "sam": ("sam", "mlp", "batch", 1.0), "sam_cnn": ("sam", "cnn", "batch", 1.0)}


def _ce(logits, targets):
    return torch.logsumexp(logits, 1) - logits.gather(1, targets[:, None])[:, 0]


def _model(name):
    return build_model(name, (1, 8, 8), NUM_CLASSES, width=16 if name == "mlp" else 4,
                       seed=0).double()


def _batches():
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(BATCH, 1, 8, 8, generator=gen, dtype=torch.float64),
             torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)) for _ in range(STEPS)]


def _preset(name):
    return preset(name, rho=0.2, head_rho=0.15, tail_rho=0.3, gamma=0.5, epochs=2)


def _group_of_class(groups):
    group_of_class = torch.zeros(NUM_CLASSES, dtype=torch.long)
    if groups == ("head", "tail"):
        group_of_class[list(TAIL)] = 1
    return group_of_class


def _run(case, perturbation, reduce_gradients=None, shard=None):
    """3 steps of the case on a float64 model; ``shard = (rank, world)`` takes that rank's
    part of each global batch."""
    name, model_name, reduction, scale = CASES[case]
    p = _preset(name)
    model = _model(model_name)
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    step = GroupSAM(model, base, reduce_gradients=reduce_gradients, perturbation=perturbation)
    group_scale = torch.tensor([1.0, scale]) if p.groups == ("head", "tail") else None
    for x, y in _batches():
        if shard is not None:
            start, stop = distributed.shard_bounds(BATCH, shard[1], shard[0])
            x, y = x[start:stop], y[start:stop]
        weights = group_sample_weights(y, _group_of_class(p.groups), len(p.groups), reduction,
                                       group_scale, batch_size=BATCH, dtype=torch.float64,
                                       sum_over_ranks=distributed.all_reduce_sum)
        step.step(x, y, _ce, p.rhos(0), weights)
    return [q.detach().clone() for q in model.parameters()]


# --------------------------------------------------------------------------------------------
# The float64 transcription of per-shard SAM


def _reference_weights(y, groups, reduction, scale):
    """(G, BATCH): membership / BATCH, or / the group's size in the whole batch; x scale."""
    rows = []
    for group in groups:
        member = [float(group == "all" or (group == "tail") == (int(t) in TAIL)) for t in y]
        size = BATCH if reduction == "batch" else max(sum(member), 1.0)
        rows.append([m * (scale if group == "tail" else 1.0) / size for m in member])
    return torch.tensor(rows, dtype=torch.float64)


def _grads(model, x, y, weights):
    loss = (weights * _ce(model(x), y)).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), grads)]


def _per_shard_sam(case, world):
    name, model_name, reduction, scale = CASES[case]
    p = _preset(name)
    model = _model(model_name)
    params, momentum = list(model.parameters()), [None] * len(list(model.parameters()))
    for x, y in _batches():
        weights = _reference_weights(y, p.groups, reduction, scale)
        total = [torch.zeros_like(q) for q in params]
        for r in range(world):
            lo, hi = distributed.shard_bounds(BATCH, world, r)
            xs, ys = x[lo:hi], y[lo:hi]
            for rho, w in zip(p.rhos(0), weights[:, lo:hi]):
                at = copy.deepcopy(model)  # each shard's forwards: its own batch statistics
                if rho:
                    g = _grads(at, xs, ys, w)  # this shard's gradient alone
                    norm = math.sqrt(sum(float((a * a).sum()) for a in g))
                    with torch.no_grad():
                        for q, a in zip(at.parameters(), g):
                            q.add_(rho * a / (norm + 1e-12))
                total = [t + a for t, a in zip(total, _grads(at, xs, ys, w))]
        with torch.no_grad():
            for i, (q, g) in enumerate(zip(params, total)):
                d = g + WD * q
                momentum[i] = d.clone() if momentum[i] is None else MOMENTUM * momentum[i] + d
                q.sub_(LR * momentum[i])
    return [q.detach().clone() for q in params]


# --------------------------------------------------------------------------------------------
# One process


class _Counting:
    """A ``reduce_gradients`` hook for one process: counts its calls, changes nothing."""

    def __init__(self):
        self.calls = 0

    def __call__(self, tensors):
        self.calls += 1


@pytest.mark.parametrize("name,epoch,global_calls", [
    ("sgd", 0, 1), ("sam", 0, 2), ("imbsam", 0, 2), ("ssesam", 0, 3), ("ssesam", 1, 2)])
def test_all_reduces_per_step(name, epoch, global_calls):
    # The module docstring's table: global, one per perturbed group plus the final gradient;
    # local, the final gradient alone.
    model = nn.Linear(4, NUM_CLASSES).double()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 6, 7, 8, 9])
    p = _preset(name)
    weights = group_sample_weights(y, _group_of_class(p.groups), len(p.groups),
                                   dtype=torch.float64)
    for perturbation, expected in (("global", global_calls), ("local", 1)):
        hook = _Counting()
        step = GroupSAM(model, torch.optim.SGD(model.parameters(), lr=0.0),
                        reduce_gradients=hook, perturbation=perturbation)
        step.step(x, y, _ce, p.rhos(epoch), weights)
        assert hook.calls == expected, perturbation


@pytest.mark.parametrize("case", list(CASES))
def test_local_with_one_process_is_global(case):
    hooks = {mode: _Counting() for mode in ("global", "local")}
    runs = {mode: _run(case, mode, hooks[mode]) for mode in hooks}
    for a, b in zip(runs["global"], runs["local"]):
        assert torch.equal(a, b)  # bitwise: one process has nothing to sum
    assert hooks["local"].calls == STEPS < hooks["global"].calls  # the hook was in use
    # and the transcription with one shard is plain SAM
    for a, b in zip(runs["local"], _per_shard_sam(case, 1)):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def test_trainer_and_config_take_the_mode():
    data = load_dataset("digits", 100)
    states = {}
    for mode in ("global", "local"):
        config = Config(dataset="digits", model="mlp", opt="ssesam", epochs=2, batch_size=100,
                        device="cpu", perturbation=mode)
        trainer = Trainer.build(config, data=data)
        assert trainer.step.perturbation == mode
        trainer.train_epoch(0)
        states[mode] = trainer.model.state_dict()
    assert all(torch.equal(states["global"][k], states["local"][k]) for k in states["global"])
    assert Config().perturbation == "global" and "perturbation" in Config().identity()
    with pytest.raises(ConfigError, match="unknown perturbation 'shard'"):
        Config(perturbation="shard")
    with pytest.raises(OptimError, match="unknown perturbation"):
        GroupSAM(nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1),
                 perturbation="Local")


def test_cli_flag():
    from train.cli import parse

    assert parse(["--dataset", "digits", "--perturbation", "local"])[0].perturbation == "local"
    assert parse(["--dataset", "digits"])[0].perturbation == "global"


# --------------------------------------------------------------------------------------------
# Two gloo ranks


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert distributed.setup("cpu") == "cpu"
    results = {(case, mode): _run(case, mode, distributed.all_reduce_sum, (rank, world))
               for case in CASES for mode in ("global", "local")}
    config = Config(dataset="digits", model="mlp", opt="ssesam", gamma=0.5, epochs=2,
                    batch_size=100, device="cpu", perturbation="local")
    trainer = Trainer.build(config, data=load_dataset("digits", 100))
    trainer.train_epoch(0)
    results["trainer"] = trainer.model.state_dict()
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    distributed.cleanup()


@pytest.fixture(scope="module")
def two_ranks(tmp_path, tmp_path_factory):
    spawn_two_ranks(tmp_path_factory, _worker, str(tmp_path))
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def tmp_path(tmp_path_factory):
    return tmp_path_factory.mktemp("perturbation")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_local_on_two_ranks_is_per_shard_sam(two_ranks, case):
    reference = _per_shard_sam(case, 2)
    whole = _per_shard_sam(case, 1)  # one SAM over the global batch
    for result in two_ranks:
        local, shared = result[(case, "local")], result[(case, "global")]
        for a, b in zip(local, reference):
            torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
        if CASES[case][1] == "mlp":  # global: the one-process step (BatchNorm: per rank)
            for a, b in zip(shared, whole):
                torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
        assert max((a - b).abs().max().item() for a, b in zip(shared, reference)) > 1e-4


@pytest.mark.slow
def test_local_ranks_stay_equal_in_the_trainer(two_ranks):
    a, b = (result["trainer"] for result in two_ranks)
    assert all(torch.equal(a[k], b[k]) for k in a)
