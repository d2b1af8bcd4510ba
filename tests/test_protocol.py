"""``--protocol seed`` pieces (train.protocol) against the seed code's own definitions."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from train.models import build_model
from train.protocol import BatchStatistics, learning_rate, selects_best


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
@pytest.mark.parametrize("epochs", [1, 7, 200])
def test_seed_schedule_is_cosine_annealing_stepped_before_each_epoch(epochs):
    """Their loop: ``scheduler.step()`` at the start of every epoch, then the epoch's batches."""
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=epochs)
    for epoch in range(epochs):
        scheduler.step()
        theirs = sgd.param_groups[0]["lr"]
        ours = learning_rate("seed", 0.01, epoch, epochs)
        assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)
    assert learning_rate("seed", 0.01, epochs - 1, epochs) == pytest.approx(0.0, abs=1e-18)


def test_ours_schedule_starts_at_the_base_rate():
    assert learning_rate("ours", 0.1, 0, 30) == 0.1
    assert learning_rate("ours", 0.1, 15, 30) == pytest.approx(0.05, rel=1e-12)


def test_best_selection_epochs():
    assert [e for e in range(200) if selects_best("seed", e)] == list(range(9, 200, 10))
    assert not any(selects_best("ours", e) for e in range(200))


def _std_bound(n: int) -> float:
    """Relative tolerance on a sample standard deviation of n draws: 5 standard errors."""
    return 5 / math.sqrt(2 * n)


def test_seed_init_std_of_every_layer_of_resnet34():
    """The authors' measured std (stem 0.111, layer1 0.059, layer2 entry 0.042, fc 0.025) is
    torchvision's fan_out rule for convolutions and PyTorch's default for the stem and head."""
    model = build_model("resnet34", (3, 32, 32), 100, seed=0, init="seed")
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    stem_name = convs[0][0]
    for name, m in convs:
        w = m.weight
        out_channels, in_channels, kh, kw = w.shape
        if name == stem_name:
            expected = 1 / math.sqrt(3 * in_channels * kh * kw)  # U(+-1/sqrt(fan_in))
        else:
            expected = math.sqrt(2 / (out_channels * kh * kw))  # kaiming normal, fan_out
        assert w.std().item() == pytest.approx(expected, rel=_std_bound(w.numel())), name
    fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    tolerance = _std_bound(fc.weight.numel())
    assert fc.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 512), rel=tolerance)
    assert fc.bias.abs().max().item() <= 1 / math.sqrt(512)
    assert convs[0][1].weight.std().item() == pytest.approx(0.111, abs=0.004)
    assert fc.weight.std().item() == pytest.approx(0.025, abs=0.002)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_seed_init_is_a_function_of_the_seed_alone():
    a = build_model("resnet32", (3, 32, 32), 10, seed=3, init="seed")
    torch.manual_seed(123)  # the global generator plays no part
    b = build_model("resnet32", (3, 32, 32), 10, seed=3, init="seed")
    ours = build_model("resnet32", (3, 32, 32), 10, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.conv1.weight, ours.conv1.weight)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_replayed_batch_statistics_equal_another_forward(momentum):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, momentum=momentum), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 5),
                          nn.BatchNorm1d(5, momentum=momentum)).double().train()
    x = torch.randn(7, 2, 6, 6, dtype=torch.float64)
    model(x * 2 + 1)  # some history in the running statistics
    twin = copy.deepcopy(model)
    with BatchStatistics(model) as stats:
        model(x)
    twin(x)
    twin(x)
    twin(x)
    stats.replay(times=2)
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15, msg=name)
        else:
            assert torch.equal(a, b), name
