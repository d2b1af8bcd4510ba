"""The group-SAM family against a plain slow float64 reference, pass counts, and SSESAM.

The reference (``_reference_run``) is written out step by step: per-group losses normalised as
configured, gradients at ``w``, an explicit perturbation applied to a float64 *copy* of the
model, the gradient there, and SGD with momentum and weight decay written by hand. The
implementation runs on a float64 copy of the same model; parameters, BatchNorm running
statistics and the returned batch losses must agree to 1e-6 (absolute) after 5 steps.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from fractions import Fraction

import pytest
import torch
import torch.nn as nn

import train
from train.models import build_model
from train.optim import (GroupSAM, OptimError, SSESAM, group_sample_weights, preset,
                         switch_epoch)

NUM_CLASSES = 10
TAIL = (6, 7, 8, 9)
BATCH = 24
LR, MOMENTUM, WD = 0.1, 0.9, 1e-2
RHO, HEAD_RHO, TAIL_RHO = 0.2, 0.15, 0.3
EPOCHS, GAMMA = 5, 0.5  # SSE-SAM: stage I is epochs 0, 1, 2 (ceil(2.5) = 3), stage II 3, 4
ATOL = 1e-6


# --------------------------------------------------------------------------------------------
# Reference


def _ce(logits, targets):
    """Per-sample cross-entropy, written out."""
    return torch.logsumexp(logits, 1) - logits.gather(1, targets[:, None])[:, 0]


def _reference_rhos(name, epoch, gamma=GAMMA, epochs=EPOCHS):
    """Radii per group in 0-based ``epoch``; stage II from ceil(gamma * epochs), exactly."""
    if name == "sgd":
        return {"all": 0.0}
    if name == "sam":
        return {"all": RHO}
    if name == "imbsam":
        return {"head": 0.0, "tail": RHO}
    switch = math.ceil(Fraction(str(gamma)) * epochs)
    return {"head": HEAD_RHO if epoch < switch else 0.0, "tail": TAIL_RHO}


def _reference_weights(targets, groups, reduction, tail_scale):
    """(G, B) float64: membership / B (or / group size), times the group's scale."""
    rows = []
    for group in groups:
        member = [1.0 if group == "all" or (group == "tail") == (int(t) in TAIL) else 0.0
                  for t in targets]
        denominator = len(member) if reduction == "batch" else max(sum(member), 1.0)
        scale = tail_scale if group == "tail" else 1.0
        rows.append([m * scale / denominator for m in member])
    return torch.tensor(rows, dtype=torch.float64)


def _grads(loss, params, retain):
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _reference_step(model, x, y, rhos, weights, buffers, bn_update):
    """One step of the family, explicitly; returns the batch loss at w."""
    params = list(model.parameters())
    model.train()
    losses = _ce(model(x), y)  # forward at w: updates running statistics
    group_losses = [(w * losses).sum() for w in weights]
    at_w = [_grads(loss, params, retain=True) for loss in group_losses]
    total = [torch.zeros_like(p) for p in params]
    for g, rho in enumerate(rhos):
        if rho == 0:
            total = [t + a for t, a in zip(total, at_w[g])]
            continue
        norm = math.sqrt(sum(float((a * a).sum()) for a in at_w[g]))
        perturbed = copy.deepcopy(model)  # w + e on a copy: w itself is never touched
        with torch.no_grad():
            for p, a in zip(perturbed.parameters(), at_w[g]):
                p.add_(rho * a / (norm + 1e-12))
        loss = (weights[g] * _ce(perturbed(x), y)).sum()
        total = [t + a for t, a in zip(total, _grads(loss, list(perturbed.parameters()), False))]
        if bn_update == "all":  # the perturbed forward's running statistics are kept
            for mine, theirs in zip(model.buffers(), perturbed.buffers()):
                mine.data.copy_(theirs.data)
    with torch.no_grad():  # SGD, momentum, weight decay (torch's convention), by hand
        for i, (p, g) in enumerate(zip(params, total)):
            d = g + WD * p
            buffers[i] = d.clone() if buffers[i] is None else MOMENTUM * buffers[i] + d
            p.sub_(LR * buffers[i])
    return float(sum(loss.detach() for loss in group_losses))


def _batches(composition, steps=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    head = torch.tensor([c for c in range(NUM_CLASSES) if c not in TAIL])
    tail = torch.tensor(TAIL)
    out = []
    for step in range(steps):
        x = torch.randn(BATCH, 1, 8, 8, generator=gen, dtype=torch.float64)
        if composition == "no_tail":
            y = head[torch.randint(0, len(head), (BATCH,), generator=gen)]
        elif composition == "tail_only":
            y = tail[torch.randint(0, len(tail), (BATCH,), generator=gen)]
        else:  # mixed, with one batch lacking tail samples in the middle
            y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)
            if step == 2:
                y = head[torch.randint(0, len(head), (BATCH,), generator=gen)]
        out.append((x, y))
    return out


def _model(name, seed=0):
    width = 16 if name == "mlp" else 4
    return build_model(name, (1, 8, 8), NUM_CLASSES, width=width, seed=seed).double()


def _group_of_class(groups):
    """Group index of each class: all 0 for ("all",); 1 for the tail of ("head", "tail")."""
    group_of_class = torch.zeros(NUM_CLASSES, dtype=torch.long)
    if groups == ("head", "tail"):
        group_of_class[list(TAIL)] = 1
    return group_of_class


def _preset(name, gamma=GAMMA):
    return preset(name, rho=RHO, head_rho=HEAD_RHO, tail_rho=TAIL_RHO, gamma=gamma,
                  epochs=EPOCHS)


def _run_both(name, model_name, composition, reduction="batch", tail_scale=1.0,
              bn_update="w", gamma=GAMMA, dtype=torch.float64):
    reference = _model(model_name)
    model = copy.deepcopy(reference).to(dtype)
    p = _preset(name, gamma)
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    step = GroupSAM(model, base, bn_update=bn_update)
    group_of_class = _group_of_class(p.groups)
    scale = torch.tensor([1.0, tail_scale]) if p.groups == ("head", "tail") else None
    buffers = [None] * len(list(reference.parameters()))
    for epoch, (x, y) in enumerate(_batches(composition)):  # one step per epoch
        rhos = _reference_rhos(name, epoch, gamma)
        assert p.groups == tuple(rhos) and p.rhos(epoch) == tuple(rhos.values())
        ref_loss = _reference_step(reference, x, y, list(rhos.values()),
                                   _reference_weights(y, p.groups, reduction, tail_scale),
                                   buffers, bn_update)
        weights = group_sample_weights(y, group_of_class, len(p.groups), reduction, scale)
        loss = step.step(x.to(dtype), y, _ce, p.rhos(epoch), weights)
        assert float(loss) == pytest.approx(ref_loss, abs=ATOL if dtype == torch.float64 else 1e-4)
    return reference, model


def _assert_same_state(reference, model, atol=ATOL):
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.isfinite(b.double()).all(), name
        torch.testing.assert_close(b.double(), a.double(), rtol=0, atol=atol, msg=name)


# --------------------------------------------------------------------------------------------
# The presets against the reference


@pytest.mark.parametrize("composition", ["mixed", "no_tail", "tail_only"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("name", ["sgd", "sam", "imbsam", "ssesam"])
def test_preset_matches_reference(name, model_name, composition):
    reference, model = _run_both(name, model_name, composition)
    _assert_same_state(reference, model)
    initial = _model(model_name)
    moved = max((a - b).abs().max().item() for a, b in
                zip(initial.parameters(), model.parameters()))
    assert moved > 1e-3  # the steps did something


@pytest.mark.parametrize("name", ["imbsam", "ssesam"])
@pytest.mark.parametrize("reduction,tail_scale", [("group", 1.0), ("batch", 2.0), ("group", 2.0)])
@pytest.mark.parametrize("composition", ["mixed", "no_tail"])
def test_group_reduction_and_tail_scale(name, reduction, tail_scale, composition):
    reference, model = _run_both(name, "cnn", composition, reduction, tail_scale)
    _assert_same_state(reference, model)


@pytest.mark.parametrize("name", ["sgd", "sam", "imbsam", "ssesam"])
def test_bn_update_all_matches_reference(name):
    reference, model = _run_both(name, "cnn", "mixed", bn_update="all")
    _assert_same_state(reference, model)


def test_bn_running_stats_only_at_w():
    """bn_update='w' and 'all' give the same weights' path inputs but different statistics."""
    _, at_w = _run_both("sam", "cnn", "mixed", bn_update="w")
    _, at_all = _run_both("sam", "cnn", "mixed", bn_update="all")
    bn_w, bn_all = at_w[1], at_all[1]
    assert int(bn_w.num_batches_tracked) == 5 and int(bn_all.num_batches_tracked) == 10
    assert not torch.allclose(bn_w.running_mean, bn_all.running_mean, atol=1e-6)


@pytest.mark.parametrize("composition", ["mixed", "no_tail"])
def test_ssesam_gamma_zero(composition):
    """gamma = 0: no stage I, so SSE-SAM is ImbSAM with rho = tail_rho, step for step."""
    assert _preset("ssesam", gamma=0.0).switch == 0
    reference, model = _run_both("ssesam", "mlp", composition, gamma=0.0)
    _assert_same_state(reference, model)
    imbsam = _train_group_sam(preset("imbsam", rho=TAIL_RHO, epochs=EPOCHS), composition)
    ssesam = _train_group_sam(_preset("ssesam", gamma=0.0), composition)
    _assert_same_state(imbsam, ssesam, atol=1e-12)  # the same radii: the same arithmetic
    with_stage_one = _train_group_sam(_preset("ssesam"), composition)  # the tolerance can fail
    differ = max((a - b).abs().max().item() for a, b in
                 zip(with_stage_one.parameters(), ssesam.parameters()))
    assert differ > 1e-4


def _train_group_sam(p, composition, model_name="mlp"):
    """The model after one GroupSAM step per epoch of ``p`` on ``_batches(composition)``."""
    model = _model(model_name)
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    step = GroupSAM(model, base)
    for epoch, (x, y) in enumerate(_batches(composition)):
        weights = group_sample_weights(y, _group_of_class(p.groups), len(p.groups))
        step.step(x, y, _ce, p.rhos(epoch), weights)
    return model


def test_float32_model_close_to_reference():
    reference, model = _run_both("ssesam", "cnn", "mixed", dtype=torch.float32)
    _assert_same_state(reference, model, atol=1e-4)


def test_presets_differ():
    """The tolerance can tell the optimizers apart: each pair differs by far more than 1e-6."""
    finals = {name: torch.cat([p.flatten()
                               for p in _run_both(name, "mlp", "mixed")[1].parameters()])
              for name in ("sgd", "sam", "imbsam", "ssesam")}
    names = sorted(finals)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (finals[a] - finals[b]).abs().max() > 1e-4, (a, b)


# --------------------------------------------------------------------------------------------
# Presets, switch epoch, errors


GAMMA_GRID = [(0.7, 200), (0.7, 10), (0.5, 3), (0.28, 25), (0.07, 100), (0.14, 50), (0.0, 5),
              (0.95, 20), (0.33, 3), (0.1, 1)]


@pytest.mark.parametrize("gamma,epochs", GAMMA_GRID)
def test_switch_epoch_is_exact_ceil(gamma, epochs):
    expected = math.ceil(Fraction(str(gamma)) * epochs)  # exact rational arithmetic
    assert switch_epoch(gamma, epochs) == expected
    p = preset("ssesam", head_rho=0.05, tail_rho=0.1, gamma=gamma, epochs=epochs)
    assert [p.stage(e) for e in range(epochs)] == [1] * expected + [2] * (epochs - expected)
    assert all(p.rhos(e) == ((0.05 if e < expected else 0.0), 0.1) for e in range(epochs))


@pytest.mark.parametrize("kwargs,match", [({"rho": -0.1}, "rho"),
                                          ({"head_rho": float("nan")}, "head_rho"),
                                          ({"tail_rho": float("inf")}, "tail_rho"),
                                          ({"gamma": 1.0}, "gamma"), ({"gamma": -0.01}, "gamma")])
def test_preset_rejects_bad_values(kwargs, match):
    with pytest.raises(OptimError, match=match):
        preset("ssesam", **kwargs)


def test_every_optimizer_name_is_a_preset():
    from train.options import OPTIMIZER_LABELS, OPTIMIZERS

    assert {preset(name).name for name in OPTIMIZERS} == set(OPTIMIZERS)
    assert tuple(OPTIMIZER_LABELS) == OPTIMIZERS


def test_preset_errors_and_bn_update():
    with pytest.raises(OptimError, match="unknown optimizer"):
        preset("adam")
    model = _model("mlp")
    with pytest.raises(OptimError, match="bn_update"):
        GroupSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), bn_update="perturbed")
    with pytest.raises(OptimError, match="reduction"):
        group_sample_weights(torch.tensor([0]), torch.zeros(10, dtype=torch.long), 1, "mean")


# --------------------------------------------------------------------------------------------
# Forward / backward counts


class _CountBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output, counts):
        ctx.counts = counts
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        ctx.counts["backward"] += 1
        return grad, None


class _Counted(nn.Module):
    """Counts forwards (hook on the wrapped model) and backwards through its output."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.counts = {"forward": 0, "backward": 0}
        inner.register_forward_hook(self._count_forward)

    def _count_forward(self, module, inputs, output):
        self.counts["forward"] += 1

    def forward(self, x):
        return _CountBackward.apply(self.inner(x), self.counts)

    def reset(self):
        self.counts.update(forward=0, backward=0)


@pytest.mark.parametrize("composition", ["mixed", "no_tail"])
@pytest.mark.parametrize("name,epoch,forwards,backwards", [
    ("sgd", 0, 1, 1), ("sam", 0, 2, 2), ("imbsam", 0, 2, 3),
    ("ssesam", 0, 3, 4), ("ssesam", EPOCHS - 1, 2, 3)])
def test_pass_counts(name, epoch, forwards, backwards, composition):
    model = _Counted(_model("cnn"))
    step = GroupSAM(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    p = _preset(name)
    x, y = _batches(composition, steps=1)[0]
    weights = group_sample_weights(y, _group_of_class(p.groups), len(p.groups))
    step.step(x, y, _ce, p.rhos(epoch), weights)
    assert model.counts == {"forward": forwards, "backward": backwards}


# --------------------------------------------------------------------------------------------
# The seed's SSESAM API


class _SeedSSESAM:
    """A literal transcription of the seed code's SSE-SAM optimizer (``ssesam.py``)."""

    def __init__(self, optimizer, model, head_rho, tail_rho, gamma=0, total_epochs=200):
        self.optimizer = optimizer
        self.model = model
        self.rho_is = [head_rho, tail_rho]
        self.state = defaultdict(dict)
        self.total_epochs = total_epochs
        if 0 < gamma < 1:
            self.epoch_count = 0
            self.cut_epoch = total_epochs * gamma

    @torch.no_grad()
    def compute_and_add_epsilon(self, n_i):
        norms = [torch.norm(p.grad, p=2) for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.norm(torch.stack(norms), p=2) + 1.e-16
        for p in self.model.parameters():
            if p.grad is None:
                continue
            eps = torch.clone(p.grad).detach()
            eps.mul_(self.rho_is[n_i] / grad_norm)
            self.state[p]["eps"] = eps
            p.add_(eps)
        self.optimizer.zero_grad()

    @torch.no_grad()
    def compute_grad_sum_and_restore_p(self):
        for p in self.model.parameters():
            if p.grad is None:
                continue
            if self.state[p].get("grad_sum") is None:
                self.state[p]["grad_sum"] = torch.clone(p.grad).detach()
            else:
                self.state[p]["grad_sum"] += p.grad
            p.sub_(self.state[p]["eps"])
        self.optimizer.zero_grad()

    @torch.no_grad()
    def update(self):
        for p in self.model.parameters():
            p.grad = torch.clone(self.state[p].get("grad_sum")).detach()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.state.clear()

    def update_rho(self):
        self.epoch_count += 1
        if self.cut_epoch > 0 and self.epoch_count >= self.cut_epoch:
            self.rho_is[0] = 0


def _seed_usage_step(model, optimizer, images, targets, tail_classes, lossFunc):
    """One training step written exactly like the seed README's usage example."""
    tail_mask = torch.where((targets[:, None] == tail_classes[None, :]).sum(1) == 1, True, False)

    logits = model(images)
    head_loss = lossFunc(logits[~tail_mask], targets[~tail_mask]).sum() / targets.size(0)
    head_loss.backward(retain_graph=True)
    optimizer.compute_and_add_epsilon(n_i=0)

    logits = model(images)
    head_loss = lossFunc(logits[~tail_mask], targets[~tail_mask]).sum() / targets.size(0)
    head_loss.backward(retain_graph=True)
    optimizer.compute_grad_sum_and_restore_p()

    logits = model(images)
    tail_loss = lossFunc(logits[tail_mask], targets[tail_mask]).sum() / targets.size(0)
    tail_loss.backward(retain_graph=True)
    optimizer.compute_and_add_epsilon(n_i=1)

    logits = model(images)
    tail_loss = lossFunc(logits[tail_mask], targets[tail_mask]).sum() / targets.size(0)
    tail_loss.backward(retain_graph=True)
    optimizer.compute_grad_sum_and_restore_p()

    optimizer.update()
    return head_loss + tail_loss


def _train_seed_style(cls, model, epochs, gamma, steps_per_epoch=2, composition="mixed"):
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    optimizer = cls(base, model, head_rho=HEAD_RHO, tail_rho=TAIL_RHO, gamma=gamma,
                    total_epochs=epochs)
    lossFunc = nn.CrossEntropyLoss(reduction="none")
    batches = _batches(composition, steps=epochs * steps_per_epoch, seed=1)
    model.train()
    for epoch in range(epochs):
        for x, y in batches[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch]:
            _seed_usage_step(model, optimizer, x, y, torch.tensor(TAIL), lossFunc)
        optimizer.update_rho()
    return model


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("gamma,epochs", [(0.5, 3), (0.34, 3)])
def test_ssesam_class_equals_seed_transcription(model_name, gamma, epochs):
    ours = _train_seed_style(SSESAM, _model(model_name), epochs, gamma)
    seed = _train_seed_style(_SeedSSESAM, _model(model_name), epochs, gamma)
    _assert_same_state(seed, ours, atol=1e-9)  # also BatchNorm running statistics
    assert any(p.grad is None for p in ours.parameters())  # zero_grad sets them to None


@pytest.mark.parametrize("gamma,epochs", GAMMA_GRID)
def test_ssesam_update_rho_switches_at_ceil(gamma, epochs):
    model = _model("mlp")
    sse = SSESAM(torch.optim.SGD(model.parameters(), lr=LR), model, head_rho=0.05,
                 tail_rho=0.1, gamma=gamma, total_epochs=epochs)
    expected = math.ceil(Fraction(str(gamma)) * epochs)
    head = []
    for _ in range(epochs):
        head.append(sse.rho_is[0])  # the head radius used in this epoch
        sse.update_rho()
    assert head == [0.05] * expected + [0.0] * (epochs - expected)
    assert sse.rho_is[1] == 0.1


@pytest.mark.parametrize("composition", ["mixed", "no_tail"])
@pytest.mark.parametrize("gamma", [0.5, 0.0])
def test_ssesam_class_matches_groupsam_preset(gamma, composition):
    epochs, steps = 3, 2
    ours = _train_seed_style(SSESAM, _model("mlp"), epochs, gamma, steps, composition)
    model = _model("mlp")
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    step = GroupSAM(model, base, bn_update="all")
    p = preset("ssesam", head_rho=HEAD_RHO, tail_rho=TAIL_RHO, gamma=gamma, epochs=epochs)
    batches = _batches(composition, steps=epochs * steps, seed=1)
    for i, (x, y) in enumerate(batches):
        weights = group_sample_weights(y, _group_of_class(p.groups), 2)
        step.step(x, y, _ce, p.rhos(i // steps), weights)
    _assert_same_state(ours, model, atol=1e-6)


def test_ssesam_seed_usage_counts_4f_4b():
    model = _Counted(_model("mlp"))
    base = torch.optim.SGD(model.parameters(), lr=LR)
    sse = SSESAM(base, model, head_rho=HEAD_RHO, tail_rho=TAIL_RHO, gamma=0.5, total_epochs=2)
    x, y = _batches("mixed", steps=1)[0]
    _seed_usage_step(model, sse, x, y, torch.tensor(TAIL), nn.CrossEntropyLoss(reduction="none"))
    assert model.counts == {"forward": 4, "backward": 4}


def test_ssesam_importable_and_validates():
    assert train.SSESAM is SSESAM
    from train.optim import SSESAM as again  # noqa: F401
    assert again is SSESAM
    model = _model("mlp")
    with pytest.raises(OptimError, match="gamma"):
        SSESAM(torch.optim.SGD(model.parameters(), lr=0.1), model, 0.05, 0.1, gamma=1.0)
