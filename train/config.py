"""The configuration of a training run: defaults, validation, and what ``config.json`` holds.

The defaults are the values of the SSE-SAM README command (CIFAR-100-LT, IF=100, CE): SGD with
lr 0.01, momentum 0.9, weight decay 1e-3, batch 64, 200 epochs of cosine annealing, seed 9826,
rho 0.05 (SAM, ImbSAM), head_rho 0.05, tail_rho 0.1, gamma 0.7, imbalance factor 100 and, for
CIFAR, eta 100. (The seed code's argparse defaults differ and are not used.) The dataset
defaults to the embedded digits-LT (model ``mlp``, eta 40, and the demo's lr 0.1 and 60 epochs,
so that a bare ``python -m train`` learns); CIFAR and image folders default to the classic
ResNet-32, and ``protocol="seed"`` to the seed's ResNet-34. Per-dataset defaults are the
:class:`train.data.DatasetSpec` fields ``default_*``; ``config.json`` stores the resolved values.

Three fields default by protocol and optimizer (``None`` until resolved):

==================  ===========================  ===========================
field               ``protocol="ours"``          ``protocol="seed"``
==================  ===========================  ===========================
``bn_update``       ``w``                        ``all``
``group_reduction`` ``batch``                    ``group`` for imbsam, else ``batch``
``tail_scale``      2 for imbsam, else 1         1
==================  ===========================  ===========================

So ``--opt imbsam`` is a published ImbSAM either way: under ``ours`` the ImbSAM authors' code
(batch-mean losses, the tail loss doubled), under ``seed`` the SSE-SAM authors' baseline
(group means).

Example:
    >>> Config(opt="imbsam").tail_scale, Config(opt="imbsam", protocol="seed").group_reduction
    (2.0, 'group')
    >>> Config(dataset="cifar100", protocol="seed").model, Config(dataset="cifar100").eta
    ('resnet34', 100.0)
    >>> Config().lr, Config().epochs, Config(dataset="cifar10").lr, Config(dataset="cifar10").epochs
    (0.1, 60, 0.01, 200)
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from train.data import SPECS, LongTailData, accuracy_splits, class_counts, load_dataset, \
    split_groups
from train.models import DEFAULT_WIDTH
from train.optim import preset
from train.options import (BN_UPDATES, CHOICES, DATASETS, GROUP_REDUCTIONS, LOSSES,  # noqa: F401
                           MODELS, OPTIMIZER_LABELS, OPTIMIZERS, PERTURBATIONS, PROTOCOLS,
                           SELECTIONS, check_choice)

if TYPE_CHECKING:
    from train.stream import StreamData

__all__ = ["Config", "ConfigError", "IDENTITY_EXCLUDED", "identity_changes", "CHOICES",
           "DATASETS", "SELECTIONS", "MODELS", "LOSSES", "OPTIMIZERS", "OPTIMIZER_LABELS",
           "GROUP_REDUCTIONS", "BN_UPDATES", "PROTOCOLS", "PERTURBATIONS"]

# Fields that may differ between an interrupted run and its resumption.
IDENTITY_EXCLUDED = ("device", "data_dir", "progress", "compile", "channels_last", "bf16",
                     "workers")


class ConfigError(ValueError):
    """An invalid configuration; the message is one line for the user."""


def _shown(value: Any, limit: int = 60) -> str:
    """A short one-line ``repr`` for messages (huge ints cannot even be printed in full)."""
    try:
        text = repr(value)
    except ValueError:  # int with more than sys.get_int_max_str_digits() digits
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class Config:
    """Everything that defines a training run (see ``python -m train --help``)."""

    dataset: str = "digits"
    data_dir: str = "data"
    train_list: Optional[str] = None
    test_list: Optional[str] = None
    image_size: Optional[int] = None
    decode: str = "auto"
    workers: int = 4
    imb_factor: float = 100.0
    selection: str = "first"
    eta: Optional[float] = None
    model: Optional[str] = None
    width: Optional[int] = None
    loss: str = "CE"
    gamma_vs: float = 0.05
    tau: float = 0.75
    protocol: str = "ours"
    opt: str = "sgd"
    rho: float = 0.05
    head_rho: float = 0.05
    tail_rho: float = 0.1
    gamma: float = 0.7
    group_reduction: Optional[str] = None
    tail_scale: Optional[float] = None
    bn_update: Optional[str] = None
    perturbation: str = "global"
    epochs: Optional[int] = None
    batch_size: int = 64
    lr: Optional[float] = None
    momentum: float = 0.9
    wd: float = 1e-3
    seed: int = 9826
    save_every: int = 2
    tta: bool = False
    device: str = "auto"
    channels_last: bool = False
    bf16: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        self._check_types()
        check_choice("dataset", self.dataset, ConfigError)
        check_choice("protocol", self.protocol, ConfigError)
        if self.dataset != "folder" and (self.train_list or self.test_list or self.image_size):
            raise ConfigError("--train_list, --test_list and --image_size need --dataset folder")
        seed, imbsam = self.protocol == "seed", self.opt == "imbsam"
        spec = self._defaults()
        self._resolve_decode()
        self._default("model", "resnet34" if seed else spec.default_model)
        self._default("eta", float(spec.default_eta))
        self._default("lr", float(spec.default_lr))
        self._default("epochs", int(spec.default_epochs))
        self._default("width", DEFAULT_WIDTH.get(self.model, 1))
        self._default("bn_update", "all" if seed else "w")
        self._default("group_reduction", "group" if seed and imbsam else "batch")
        self._default("tail_scale", 2.0 if imbsam and not seed else 1.0)
        self._validate()

    def _default(self, name: str, value: Any) -> None:
        if getattr(self, name) is None:
            object.__setattr__(self, name, value)

    def _defaults(self):
        """What the per-dataset defaults are read from: the dataset's spec, or for an image
        folder the counts of its files (no image is decoded for a default)."""
        if self.dataset != "folder":
            return SPECS[self.dataset]
        from train.folder import folder_counts, folder_spec

        n_max = max(folder_counts(self.data_dir, self.imb_factor, self.selection,
                                  self.train_list, self.test_list))
        return folder_spec("folder", 0, n_max, (3, 1, 1), (), ())

    def _resolve_decode(self) -> None:
        """``decode`` cache or stream (``auto``: :func:`train.stream.resolve_decode`); a
        streamed folder without ``image_size`` gets ``train.stream.STREAM_IMAGE_SIZE``."""
        check_choice("decode", self.decode, ConfigError)
        if self.dataset != "folder":
            if self.decode == "stream":
                raise ConfigError("--decode stream needs --dataset folder")
            object.__setattr__(self, "decode", "cache")
            return
        from train.stream import STREAM_IMAGE_SIZE, resolve_decode

        object.__setattr__(self, "decode", resolve_decode(
            self.decode, self.data_dir, self.image_size, self.train_list, self.test_list))
        if self.decode == "stream":
            self._default("image_size", STREAM_IMAGE_SIZE)

    def _check_types(self) -> None:
        """Each field's JSON type (a config file may hold anything): one clear line if wrong."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if value is None and kind.startswith("Optional["):
                continue
            base = kind.removeprefix("Optional[").removesuffix("]")
            if base == "str":
                ok, want = isinstance(value, str) and "\x00" not in value, "a string (no NUL)"
            elif base == "bool":
                ok, want = isinstance(value, bool), "true or false"
            elif base == "int":
                ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
            else:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                want = "a number"
            if not ok:
                raise ConfigError(f"{f.name} must be {want}, got {_shown(value)}")

    def _validate(self) -> None:
        def finite(name: str) -> float:
            value = getattr(self, name)
            try:
                number = float(value) if not isinstance(value, (bool, str)) else math.nan
            except (TypeError, ValueError, OverflowError):  # an int beyond float range
                number = math.nan
            if not math.isfinite(number):
                raise ConfigError(f"{name} must be a finite number, got {_shown(value)}")
            return number

        def integer(name: str, low: int, high: Optional[int] = None) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (
                    high is not None and value > high):
                bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise ConfigError(f"{name} must be an integer {bounds}, got {_shown(value)}")

        for name in CHOICES:
            check_choice(name, getattr(self, name), ConfigError)
        if finite("imb_factor") < 1:
            raise ConfigError(f"imb_factor must be >= 1, got {self.imb_factor}")
        if finite("eta") <= 0:
            raise ConfigError(f"eta must be > 0, got {self.eta}")
        for name in ("rho", "head_rho", "tail_rho", "tail_scale", "lr", "momentum", "wd"):
            if finite(name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= finite("gamma") < 1:
            raise ConfigError(f"gamma must be in [0, 1), got {self.gamma}")
        finite("gamma_vs"), finite("tau")
        integer("epochs", 1, 10**6)  # bounds keep the arithmetic in floats and ints sane
        integer("batch_size", 1, 2**31 - 1)
        integer("save_every", 1, 10**6)
        integer("width", 1, 2**16)
        integer("seed", 0, 2**63 - 1)
        integer("workers", 0, 1024)
        if self.image_size is not None:
            integer("image_size", 1, 2**15)
        if not re.fullmatch(r"auto|cpu|cuda(:\d{1,4})?", self.device):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    # Derived facts ---------------------------------------------------------------------------

    @property
    def spec(self):
        """The dataset's :class:`train.data.DatasetSpec` (an image folder's is built from its
        training images: shape, classes and normalisation statistics)."""
        return self.load_data().spec if self.dataset == "folder" else SPECS[self.dataset]

    @property
    def counts(self) -> list[int]:
        if self.dataset == "folder":
            from train.folder import folder_counts

            return folder_counts(self.data_dir, self.imb_factor, self.selection,
                                 self.train_list, self.test_list)
        return class_counts(self.spec.n_max, self.spec.num_classes, self.imb_factor)

    def load_data(self, download: bool = True) -> "LongTailData | StreamData":
        """The run's long-tailed training set and balanced test set (uint8, on the CPU).

        CIFAR is read from ``data_dir`` (downloaded there when ``download`` and the network
        allow); an image folder is decoded once and cached (:mod:`train.folder`), or with
        ``decode="stream"`` only listed (a :class:`train.stream.StreamData`, decoded by its
        loaders; ImageNet's normalisation).
        """
        if self.dataset == "folder" and self.decode == "stream":
            from train.stream import load_stream_cached

            return load_stream_cached(self.data_dir, self.imb_factor, self.selection,
                                      self.image_size, self.train_list, self.test_list)
        if self.dataset == "folder":
            from train.folder import load_folder_cached

            return load_folder_cached(self.data_dir, self.imb_factor, self.selection,
                                      self.image_size, self.train_list, self.test_list)
        return load_dataset(self.dataset, self.imb_factor, self.selection, self.data_dir,
                            download=download)

    @property
    def groups(self) -> dict[str, list[int]]:
        return split_groups(self.counts, self.eta)

    def preset(self):
        return preset(self.opt, rho=self.rho, head_rho=self.head_rho, tail_rho=self.tail_rho,
                      gamma=self.gamma, epochs=self.epochs)

    def to_json(self) -> dict[str, Any]:
        """``config.json``: the fields plus the derived class counts, groups and splits."""
        spec = self.spec
        p = self.preset()
        derived = {
            "num_classes": spec.num_classes,
            "image_shape": list(spec.image_shape),
            "class_counts": self.counts,
            "groups": self.groups,
            "splits": accuracy_splits(self.counts, spec),
            "optimizer_groups": list(p.groups),
            "switch_epoch": p.switch,
        }
        if self.dataset == "folder":  # what rebuilding the data must give again
            data = self.load_data()
            derived.update(classes=list(data.classes), mean=list(spec.mean), std=list(spec.std),
                           files=data.fingerprint)
        return {**dataclasses.asdict(self), "derived": derived}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Config":
        """Rebuilds a config from ``config.json`` (unknown keys are an error)."""
        if not isinstance(data, dict):
            raise ConfigError("config is not a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k != "derived"}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        try:
            return cls(**fields)
        except TypeError as error:
            raise ConfigError(str(error)) from None

    def identity(self) -> dict[str, Any]:
        """The fields that must agree between a run and its resumption (or its analysis)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in IDENTITY_EXCLUDED}

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


def identity_changes(old: Config, new: Config) -> list[str]:
    """The names of the identity fields (:meth:`Config.identity`) in which ``new`` differs from
    ``old``, sorted; empty when both describe the same run.

    Example:
        >>> identity_changes(Config(), Config(lr=0.2, device="cpu"))
        ['lr']
    """
    theirs, ours = old.identity(), new.identity()
    return sorted(k for k, v in ours.items() if theirs.get(k) != v)
