"""Training on long-tailed data with the SGD / SAM / ImbSAM / SSE-SAM family.

``python -m train --help`` for the command line; :func:`train.loop.train` from Python.
"""

from train.config import Config
from train.data import load_dataset
from train.models import build_model
from train.losses import build_loss
from train.optim import GroupSAM, SSESAM, preset

__all__ = ["Config", "load_dataset", "build_model", "build_loss", "GroupSAM", "SSESAM", "preset"]
