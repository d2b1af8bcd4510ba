"""Model sizes and shapes; the per-sample losses against slow float64 reference formulas."""

from __future__ import annotations

import math

import pytest
import torch

from train.data import class_counts
from train.losses import LOSSES, LossError, build_loss
from train.models import MODELS, ModelError, build_model, count_parameters

# --------------------------------------------------------------------------------------------
# Models


def _conv(cin, cout, k):
    return cin * cout * k * k


def _bn(c):
    return 2 * c


def _resnet32_params(num_classes):
    """He et al.'s CIFAR ResNet-32: 3 stages x 5 blocks, 16/32/64, parameter-free shortcuts."""
    total = _conv(3, 16, 3) + _bn(16)
    cin = 16
    for width in (16, 32, 64):
        for _ in range(5):
            total += _conv(cin, width, 3) + _bn(width) + _conv(width, width, 3) + _bn(width)
            cin = width
    return total + 64 * num_classes + num_classes


def _resnet34_params(num_classes):
    """torchvision's ResNet-34 with a 3x3 stem, no max-pool, 1x1 conv + BN shortcuts."""
    total = _conv(3, 64, 3) + _bn(64)
    cin = 64
    for width, depth in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for _ in range(depth):
            total += _conv(cin, width, 3) + _bn(width) + _conv(width, width, 3) + _bn(width)
            if cin != width:
                total += _conv(cin, width, 1) + _bn(width)
            cin = width
    return total + 512 * num_classes + num_classes


@pytest.mark.parametrize("num_classes", [10, 100])
def test_resnet32_size(num_classes):
    model = build_model("resnet32", (3, 32, 32), num_classes)
    n = count_parameters(model)
    assert n == _resnet32_params(num_classes)  # 464,154 (10 classes), 470,004 (100)
    if num_classes == 10:  # the published size is for CIFAR-10
        assert n == 464_154 and abs(n - 0.46e6) / 0.46e6 < 0.02
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, num_classes)


def test_resnet34_size():
    model = build_model("resnet34", (3, 32, 32), 100)
    n = count_parameters(model)
    assert n == _resnet34_params(100)
    assert abs(n - 21.3e6) / 21.3e6 < 0.02  # "~21M"
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_seeded_and_leave_global_rng(name):
    shape = (1, 8, 8) if name in ("mlp", "cnn") else (3, 16, 16)
    width = None if name in ("mlp", "cnn") else 4
    before = torch.random.get_rng_state()
    a = build_model(name, shape, 5, width=width, seed=3)
    b = build_model(name, shape, 5, width=width, seed=3)
    c = build_model(name, shape, 5, width=width, seed=4)
    assert torch.equal(torch.random.get_rng_state(), before)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a(torch.zeros(3, *shape)).shape == (3, 5)


def test_every_model_name_has_one_builder():
    from train.models import BUILDERS, DEFAULT_WIDTH

    assert tuple(BUILDERS) == MODELS and tuple(DEFAULT_WIDTH) == MODELS


def test_build_model_errors():
    with pytest.raises(ModelError, match="unknown model"):
        build_model("vgg", (3, 32, 32), 10)
    with pytest.raises(ModelError, match="width"):
        build_model("mlp", (1, 8, 8), 10, width=0)


# --------------------------------------------------------------------------------------------
# Losses: slow float64 references, one sample at a time


def _ce(z, y):
    m = max(z)
    return -(z[y] - m) + math.log(sum(math.exp(v - m) for v in z))


def _ref_ce(logits, targets, counts):
    return [_ce(z, y) for z, y in zip(logits, targets)]


def _ldam_margins(counts, max_margin=0.5):
    raw = [n ** -0.25 for n in counts]
    return [max_margin * r / max(raw) for r in raw]


def _ref_ldam(logits, targets, counts, s=30.0):
    m = _ldam_margins(counts)
    out = []
    for z, y in zip(logits, targets):
        z = list(z)
        z[y] -= s * m[y]
        out.append(_ce(z, y))
    return out


def _ref_vs(logits, targets, counts, gamma_vs=0.05, tau=0.75):
    n_max, total = max(counts), sum(counts)
    delta = [(n / n_max) ** gamma_vs for n in counts]
    iota = [tau * math.log(n / total) for n in counts]
    return [_ce([zc * d + i for zc, d, i in zip(z, delta, iota)], y)
            for z, y in zip(logits, targets)]


def _ref_la(logits, targets, counts, tau=0.75):
    total = sum(counts)
    return [_ce([zc + tau * math.log(n / total) for zc, n in zip(z, counts)], y)
            for z, y in zip(logits, targets)]


REFERENCES = {"CE": _ref_ce, "LDAM": _ref_ldam, "VS": _ref_vs, "LA": _ref_la}

COUNTS = {
    "cifar10-if100": class_counts(5000, 10, 100),
    "digits-if20": class_counts(120, 10, 20),
    "balanced": [7] * 6,
    "cifar100-if100": class_counts(500, 100, 100),
}


@pytest.mark.parametrize("profile", sorted(COUNTS))
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_matches_reference(profile, name, dtype):
    counts = COUNTS[profile]
    gen = torch.Generator().manual_seed(len(counts) + len(name))
    logits = 4 * torch.randn(33, len(counts), generator=gen, dtype=torch.float64)
    targets = torch.randint(0, len(counts), (33,), generator=gen)
    targets[:2] = torch.tensor([0, len(counts) - 1])  # the largest and the smallest class
    loss = build_loss(name, counts)
    out = loss(logits.to(dtype), targets)
    assert out.shape == (33,) and out.dtype == dtype
    ref = torch.tensor(REFERENCES[name](logits.tolist(), targets.tolist(), counts),
                       dtype=torch.float64)
    # float32 buffers (margins, scales) limit even float64 logits to ~1e-7 relative
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_ldam_margins():
    counts = class_counts(500, 100, 100)
    margins = build_loss("LDAM", counts).margins.double()
    assert margins.max().item() == pytest.approx(0.5, abs=1e-7)
    assert margins[-1].item() == margins.max().item()  # the rarest class: the largest margin
    ratio = margins * torch.tensor(counts, dtype=torch.float64) ** 0.25  # m_c n_c^(1/4) = const
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()), rtol=1e-6, atol=0)
    torch.testing.assert_close(margins, torch.tensor(_ldam_margins(counts), dtype=torch.float64),
                               rtol=1e-6, atol=0)


def test_la_is_vs_with_gamma_zero_and_va_alias():
    counts = class_counts(120, 10, 20)
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(16) % 10
    la = build_loss("LA", counts)(logits, targets)
    torch.testing.assert_close(la, build_loss("VS", counts, gamma_vs=0.0)(logits, targets))
    torch.testing.assert_close(la, build_loss("VA", counts)(logits, targets))
    assert not torch.allclose(la, build_loss("VS", counts)(logits, targets))


def test_balanced_adjustments_reduce_to_ce():
    counts = [9] * 5
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    targets = torch.arange(8) % 5
    ce = build_loss("CE", counts)(logits, targets)
    # equal priors: VS / LA add the same constant to every logit, which CE ignores
    torch.testing.assert_close(build_loss("VS", counts)(logits, targets), ce)
    torch.testing.assert_close(build_loss("LA", counts)(logits, targets), ce)


@pytest.mark.parametrize("name", LOSSES)
def test_loss_gradient_matches_reference(name):
    """d loss / d logits against central differences of the float64 reference."""
    counts = class_counts(120, 10, 20)
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 7, 9])
    build_loss(name, counts)(logits, targets).sum().backward()
    h = 1e-6
    numeric = torch.zeros(4, 10, dtype=torch.float64)
    base = logits.detach().tolist()
    for i in range(4):
        for c in range(10):
            up = [row[:] for row in base]
            down = [row[:] for row in base]
            up[i][c] += h
            down[i][c] -= h
            numeric[i, c] = (REFERENCES[name](up, targets.tolist(), counts)[i]
                             - REFERENCES[name](down, targets.tolist(), counts)[i]) / (2 * h)
    torch.testing.assert_close(logits.grad, numeric, rtol=1e-4, atol=1e-6)


def test_unknown_loss():
    with pytest.raises(LossError, match="unknown loss"):
        build_loss("focal", [1, 2])
