"""Importing torchvision when its compiled operators cannot load.

The project needs torchvision only to download CIFAR; models and augmentation are our own, so
nothing on the training or analysis path imports it. Some wheels (the CUDA build of
torchvision 0.28 next to a CPU build of torch 2.13, as on our CI machine) fail at import with
``operator torchvision::nms does not exist``: the C++ library did not load, so the two operators
that torchvision's meta registrations refer to were never defined. Defining their schemas
(without kernels) lets the pure-Python parts, such as ``torchvision.datasets``, import; calling
``nms`` itself would still fail, which this project never does.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MISSING_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_fallback_library = None  # kept alive: dropping a torch.library.Library removes its definitions


def import_torchvision() -> ModuleType:
    """Returns the ``torchvision`` module, defining missing operator schemas if needed."""
    global _fallback_library
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
    import sys

    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # drop the half-initialised package before importing it again
    if _fallback_library is None:
        _fallback_library = torch.library.Library("torchvision", "FRAGMENT")
        for name, schema in _MISSING_SCHEMAS.items():
            if not hasattr(torch.ops.torchvision, name):
                _fallback_library.define(schema)
    return importlib.import_module("torchvision")
