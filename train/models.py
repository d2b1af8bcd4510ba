"""Classifiers: the classic CIFAR ResNet-32, the seed code's ResNet-34 backbone, and small models.

* ``resnet32``: He et al. (2016) CIFAR ResNet, 3 stages x 5 basic blocks, 16/32/64 channels,
  parameter-free (option A) shortcuts, ~0.46M parameters; what Saddle-SAM used. ``resnet8``
  (1 block a stage, 75k parameters) and ``resnet20`` (3 blocks) are the same family, for CPUs.
* ``resnet34``: the SSE-SAM seed backbone, torchvision's ResNet-34 layout with a 3x3 stride-1
  stem and no max-pool, 64..512 channels, ~21M parameters. Written here rather than taken from
  ``torchvision.models`` so that training and analysis never import torchvision (whose compiled
  operators fail to load on some installs, see ``train/_torchvision.py``).
* ``resnet50``: torchvision's ResNet-50 (v1.5) layout and initialisation for ImageNet-sized
  inputs: a 7x7 stride-2 stem and a 3x3 stride-2 max-pool, [3, 4, 6, 3] bottleneck blocks
  (1x1, 3x3 with the stride, 1x1 expanding 4x), 1x1 projection shortcuts, torchvision's
  parameter names (``conv1``, ``layer1`` .. ``layer4``, ``fc``); 25,557,032 parameters for 1000
  classes. Also written here, for the same reason.
* ``mlp``: two hidden ReLU layers of ``width`` units.
* ``cnn``: two 3x3 conv + BatchNorm + ReLU layers (``width`` and ``2 * width`` channels), global
  average pooling and a linear head; small enough for exact Hessians, with BatchNorm on purpose.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.options import MODELS, check_choice

__all__ = ["MODELS", "BUILDERS", "build_model", "resnet8", "resnet20", "resnet32", "resnet34",
           "resnet50", "mlp", "cnn", "count_parameters"]


class _ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.extra // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra - half))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = _ShortcutA(planes - in_planes)
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                              nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _ResNet(nn.Module):
    def __init__(self, in_channels: int, widths: list[int], depths: list[int], num_classes: int,
                 shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for i, (planes, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(_BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        # Global average pooling: equal to the seed's 4x4 average pool on 32x32 inputs.
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _cifar_resnet(blocks: int) -> Callable[..., nn.Module]:
    """He et al.'s CIFAR ResNet of depth ``6 * blocks + 2``: 3 stages of ``blocks`` basic blocks."""
    def build(in_shape: tuple[int, int, int], num_classes: int, width: int = 16) -> nn.Module:
        return _ResNet(in_shape[0], [width, 2 * width, 4 * width], [blocks] * 3, num_classes, "A")

    build.__name__ = f"resnet{6 * blocks + 2}"
    build.__doc__ = (f"CIFAR ResNet-{6 * blocks + 2} ({blocks} blocks a stage; ``width`` = "
                     "channels of the first stage, 16 in the paper).")
    return build


resnet8, resnet20, resnet32 = _cifar_resnet(1), _cifar_resnet(3), _cifar_resnet(5)


def resnet34(in_shape: tuple[int, int, int], num_classes: int, width: int = 64) -> nn.Module:
    """The seed's ResNet-34: [3, 4, 6, 3] basic blocks, 3x3 stride-1 stem, no max-pool."""
    widths = [width, 2 * width, 4 * width, 8 * width]
    return _ResNet(in_shape[0], widths, [3, 4, 6, 3], num_classes, "B")


class _Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's v1.5), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample: nn.Module | None = None  # None, not Identity: torchvision's keys
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class _ImageNetResNet(nn.Module):
    """torchvision's ImageNet ResNet of bottleneck blocks, with its module names."""

    def __init__(self, in_channels: int, width: int, depths: list[int], num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_planes = width
        for i, depth in enumerate(depths):
            planes = width * 2 ** i
            blocks = [_Bottleneck(in_planes if j == 0 else planes * _Bottleneck.expansion,
                                  planes, 2 if (i > 0 and j == 0) else 1) for j in range(depth)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_planes = planes * _Bottleneck.expansion
        self.depth = len(depths)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():  # torchvision's initialisation; Linear keeps PyTorch's default
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(self.depth):
            out = getattr(self, f"layer{i + 1}")(out)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def resnet50(in_shape: tuple[int, int, int], num_classes: int, width: int = 64) -> nn.Module:
    """torchvision's ResNet-50: 7x7 stride-2 stem, max-pool, [3, 4, 6, 3] bottlenecks."""
    return _ImageNetResNet(in_shape[0], width, [3, 4, 6, 3], num_classes)


def mlp(in_shape: tuple[int, int, int], num_classes: int, width: int = 64) -> nn.Module:
    """Flatten, then two hidden ReLU layers of ``width`` units and a linear head."""
    in_features = in_shape[0] * in_shape[1] * in_shape[2]
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))


def cnn(in_shape: tuple[int, int, int], num_classes: int, width: int = 16) -> nn.Module:
    """Two conv + BatchNorm + ReLU layers, global average pooling, a linear head."""
    return nn.Sequential(
        nn.Conv2d(in_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


# The builder of each name in train.options.MODELS.
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8, "resnet20": resnet20, "resnet32": resnet32, "resnet34": resnet34,
    "resnet50": resnet50, "mlp": mlp, "cnn": cnn,
}
DEFAULT_WIDTH = {"resnet8": 16, "resnet20": 16, "resnet32": 16, "resnet34": 64, "resnet50": 64,
                 "mlp": 64, "cnn": 16}


class ModelError(ValueError):
    """An unknown model name or an impossible size."""


def build_model(name: str, in_shape: tuple[int, int, int], num_classes: int,
                width: int | None = None, seed: int | None = None,
                init: str = "ours") -> nn.Module:
    """Builds a model; with ``seed``, its initial weights are a function of the seed alone.

    The initialisation runs under ``torch.random.fork_rng`` so that the global generator is left
    as it was (no hidden global state changes). ``init="seed"`` re-initialises it by the SSE-SAM
    code's rule (:func:`train.protocol.init_seed_`) from the same generator.
    """
    check_choice("model", name, ModelError)
    width = DEFAULT_WIDTH[name] if width is None else int(width)
    if width < 1:
        raise ModelError(f"width must be >= 1, got {width}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = BUILDERS[name](tuple(in_shape), num_classes, width)
        if init == "seed":
            from train.protocol import init_seed_

            init_seed_(model)
        return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
