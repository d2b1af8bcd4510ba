"""The names of every choice a training run offers: one place for the CLI, ``Config``, the
validation and the report.

Each tuple lists the values of one :class:`train.config.Config` field (its default is
``Config``'s); :data:`CHOICES` maps the field to its tuple. Adding a value is one line here plus
its implementation (a dataset in ``train/data.py``, a model builder in ``train/models.py``, a
loss in ``train/losses.py``, a preset in ``train/optim.py``); the parser, its help text and the
checks read the tuple.

Example:
    >>> CHOICES["opt"]
    ('sgd', 'sam', 'imbsam', 'ssesam')
    >>> OPTIMIZER_LABELS["ssesam"]
    'SSE-SAM'
    >>> check_choice("loss", "focal")
    Traceback (most recent call last):
    ...
    ValueError: unknown loss 'focal' (choose from CE, LDAM, VS, LA)
"""

from __future__ import annotations

from typing import Any

__all__ = ["DATASETS", "SELECTIONS", "MODELS", "LOSSES", "OPTIMIZERS", "OPTIMIZER_LABELS",
           "GROUP_REDUCTIONS", "BN_UPDATES", "PROTOCOLS", "PERTURBATIONS", "DECODES",
           "CACHE_LIMIT_BYTES", "CHOICES",
           "check_choice"]

DATASETS = ("digits", "cifar10", "cifar100", "folder")
SELECTIONS = ("first", "shuffled")  # which images of a class are kept (train/data.py)
MODELS = ("resnet8", "resnet20", "resnet32", "resnet34", "resnet50", "mlp", "cnn")
LOSSES = ("CE", "LDAM", "VS", "LA")
OPTIMIZERS = ("sgd", "sam", "imbsam", "ssesam")
# How figures and tables name the optimizers.
OPTIMIZER_LABELS = {"sgd": "SGD", "sam": "SAM", "imbsam": "ImbSAM", "ssesam": "SSE-SAM"}
GROUP_REDUCTIONS = ("batch", "group")  # a group's loss divided by the batch or the group size
BN_UPDATES = ("w", "all")  # BatchNorm running statistics from the forward at w, or every one
PROTOCOLS = ("ours", "seed")  # the paper as written, or the SSE-SAM authors' code (protocol.py)
# Under torchrun: e_G from the all-reduced gradient, or each rank's own (train/optim.py)
PERTURBATIONS = ("global", "local")
# An image folder decoded once into a uint8 cache, or in DataLoader workers every epoch
# (train/stream); auto: stream when the cache would pass CACHE_LIMIT_BYTES. Stored resolved.
DECODES = ("cache", "stream", "auto")
CACHE_LIMIT_BYTES = 4 * 2**30  # uint8 pixels of both splits held in memory

CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": DATASETS, "selection": SELECTIONS, "model": MODELS, "loss": LOSSES,
    "opt": OPTIMIZERS, "group_reduction": GROUP_REDUCTIONS, "bn_update": BN_UPDATES,
    "protocol": PROTOCOLS, "perturbation": PERTURBATIONS, "decode": DECODES,
}
_NOUN = {"opt": "optimizer"}  # what the messages call a field, where it is not its name


def check_choice(field: str, value: Any, error: type[Exception] = ValueError) -> None:
    """Raises ``error`` with one line if ``value`` is not one of ``CHOICES[field]``."""
    allowed = CHOICES[field]
    if not isinstance(value, str) or value not in allowed:
        shown = repr(value[:60]) if isinstance(value, str) else f"<{type(value).__name__}>"
        raise error(f"unknown {_NOUN.get(field, field)} {shown} "
                    f"(choose from {', '.join(allowed)})")
