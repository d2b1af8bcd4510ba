"""Tiny digits-LT training runs for the analysis tests (seconds each)."""

from __future__ import annotations

from train.config import Config
from train.loop import train


def train_digits(folder, **changes) -> str:
    """Trains a small digits-LT MLP (SGD, 4 epochs, a checkpoint every epoch) into ``folder``;
    ``changes`` override any :class:`train.config.Config` field."""
    settings = dict(dataset="digits", imb_factor=20.0, lr=0.1, epochs=4, save_every=1,
                    model="mlp", width=12, opt="sgd", device="cpu")
    settings.update(changes)
    return str(train(Config(**settings), folder, progress=False, log=lambda _: None))
