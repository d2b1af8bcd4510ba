"""Which device a run or an analysis uses: one check for training, loading and the CLIs.

Example:
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("tpu")
    Traceback (most recent call last):
    ...
    train.config.ConfigError: device must be auto, cpu or cuda[:N], got 'tpu'
"""

from __future__ import annotations

from typing import Union

import torch

from train.config import ConfigError

__all__ = ["resolve_device"]


def resolve_device(name: Union[str, torch.device, None]) -> torch.device:
    """``auto`` (or None): CUDA if available, else the CPU; otherwise ``cpu``, ``cuda`` or
    ``cuda:N``, checked to exist here. Anything else is a one-line :class:`ConfigError`."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {str(name)[:60]!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for, but CUDA is not available here")
    return device
