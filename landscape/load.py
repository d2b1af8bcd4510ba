"""Loading a checkpoint for analysis: model, config, class groups and each group's data.

``run_dir`` is a run folder (``python -m train ... --out RUN_DIR``):

>>> run = load(run_dir, device="cpu")                # its newest checkpoint
>>> run.epoch, run.groups
(3, {'head': [0, 1, 2, 3], 'tail': [4, 5, 6, 7, 8, 9]})
>>> x, y = run.group_data("tail")                    # un-augmented, normalised
>>> tuple(x.shape), run.model.training               # the model is in eval mode
((94, 1, 8, 8), False)
>>> first = load(f"{run_dir}/epoch_0001.pt", device="cpu", data=run.data)  # the same dataset
>>> first.epoch, first.data is run.data
(1, True)

A run trained with ``--decode stream`` keeps its images on disk: ``run.data`` is a
:class:`train.stream.StreamData` (file lists), :meth:`Run.group_samples` a group's files as a
lazy :class:`train.stream.StreamSamples` that :class:`landscape.hvp.GroupHessian` reads in
batches (decoded again for every pass, never all in memory), and :meth:`Run.group_data`
decodes the group whole (for small groups). :meth:`Run.group_size` checks a group without
decoding anything.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from landscape.options import SPLITS
from train import checkpoint as ckpt
from train.config import Config, ConfigError, identity_changes
from train.data import LongTailData, normalize
from train.device import resolve_device
from train.io import summarize
from train.losses import build_loss
from train.models import build_model

__all__ = ["Run", "load", "GroupError", "Group", "writing_into"]

Group = Union[str, Sequence[int]]


class GroupError(ValueError):
    """An unknown group name or class id, or an empty group."""


def _resolve_path(path: Path) -> Path:
    if path.is_dir():
        found = ckpt.list_checkpoints(path)
        if not found:
            raise ckpt.CheckpointError(f"{path}: no epoch_NNNN.pt checkpoints in this folder")
        return found[-1][1]
    if not path.exists():
        raise ckpt.CheckpointError(f"{path}: no such checkpoint or run folder")
    return path


@dataclass
class Run:
    """One checkpoint of a training run, ready for analysis.

    Attributes:
        path: the checkpoint file.
        run_dir: its run folder.
        epoch: finished epochs when the checkpoint was written.
        config: the run's :class:`train.config.Config`.
        model: the network with the checkpoint's weights, in eval mode, on ``device``.
        device: where the model and data live.
    """

    path: Path
    run_dir: Path
    epoch: int
    config: Config
    model: nn.Module
    device: torch.device
    data_dir: Optional[str] = None
    _data: Optional[LongTailData] = field(default=None, repr=False)

    @property
    def groups(self) -> dict[str, list[int]]:
        """``{"head": [class ids], "tail": [class ids]}`` by the run's ``eta``."""
        return self.config.groups

    @property
    def num_classes(self) -> int:
        return self.config.spec.num_classes

    @property
    def streamed(self) -> bool:
        """Whether the run reads its images from files (``decode="stream"``)."""
        return self.config.decode == "stream"

    @property
    def data(self) -> LongTailData:
        """The run's long-tailed training set and balanced test set, on ``device`` (a streamed
        run's :class:`train.stream.StreamData`: its file lists)."""
        if self._data is None:
            self._data = self.config.load_data().to(self.device)
        return self._data

    def loss_fn(self, name: Optional[str] = None) -> nn.Module:
        """Per-sample loss: the run's own, or ``name`` (``CE``, ``LDAM``, ``VS``, ``LA``)."""
        c = self.config
        return build_loss(name or c.loss, c.counts, c.gamma_vs, c.tau).to(self.device)

    def classes(self, group: Group) -> list[int]:
        """Class ids of ``group``: ``head``, ``tail``, ``all``, or a list of ids."""
        if isinstance(group, str):
            if group == "all":
                return list(range(self.num_classes))
            if group in self.groups:
                classes = self.groups[group]
            else:
                try:
                    classes = sorted({int(c) for c in group.split(",") if c.strip()})
                except ValueError:
                    raise GroupError(f"unknown group {group!r} (head, tail, all, or class ids "
                                     "like 0,3,7)") from None
        else:
            classes = sorted({int(c) for c in group})
        bad = [c for c in classes if not 0 <= c < self.num_classes]
        if bad:
            raise GroupError(f"class id {bad[0]} outside 0..{self.num_classes - 1}")
        if not classes:
            raise GroupError(f"group {group!r} has no classes (eta={self.config.eta:g})")
        return classes

    def group_data(self, group: Group, split: str = "train", samples: Optional[int] = None,
                   *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` of the ``split`` samples of the group: normalised, not augmented.

        With ``samples``, a fixed subsample of that many (all when the group has no more): the
        first ``samples`` of a permutation drawn from ``seed``, kept in data order, so every
        checkpoint of a run (and every optimizer on the same data) sees the same images.
        """
        if self.streamed:
            parts = list(self.group_samples(group, split, samples, seed=seed).batches(1000))
            return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
        keep = self._positions(group, split, samples, seed)
        data = self.data
        x, y = (data.train_x, data.train_y) if split == "train" else (data.test_x, data.test_y)
        return normalize(x[keep], data.spec), y[keep]

    def group_samples(self, group: Group, split: str = "train", samples: Optional[int] = None,
                      *, seed: int = 0):
        """A streamed run's :meth:`group_data` as a lazy :class:`train.stream.StreamSamples`
        (the same samples in the same order, decoded batch by batch on every pass, with the
        run's ``workers``)."""
        from train.folder import FolderIndex
        from train.stream import StreamSamples

        index = self.data.train if split == "train" else self.data.test
        keep = self._positions(group, split, samples, seed).tolist()
        part = FolderIndex(index.root, tuple(index.paths[i] for i in keep),
                           tuple(index.labels[i] for i in keep), index.classes)
        return StreamSamples(part, self.data.spec, self.data.spec.image_shape[-1],
                             workers=self.config.workers, device=self.device)

    def group_size(self, group: Group, split: str = "train") -> int:
        """The number of ``split`` samples of ``group``; raises :class:`GroupError` as
        :meth:`group_data` does, without decoding or moving any image."""
        return len(self._positions(group, split, None, 0))

    def _labels(self, split: str) -> torch.Tensor:
        data = self.data
        if self.streamed:
            index = data.train if split == "train" else data.test
            return torch.tensor(index.labels, dtype=torch.int64)
        return data.train_y if split == "train" else data.test_y

    def _positions(self, group: Group, split: str, samples: Optional[int], seed: int
                   ) -> torch.Tensor:
        """Positions in the split of :meth:`group_data`'s samples (checked, subsampled)."""
        if split not in SPLITS:
            raise GroupError(f"split must be train or test, got {split!r}")
        if samples is not None and (isinstance(samples, bool) or int(samples) < 1):
            raise GroupError(f"samples must be an integer >= 1, got {samples!r}")
        classes = self.classes(group)
        y = self._labels(split)
        keep = torch.isin(y, torch.tensor(classes, device=y.device)).nonzero().flatten()
        if len(keep) == 0:
            raise GroupError(f"group {group!r} has no samples in the {split} split")
        if samples is not None and samples < len(keep):
            order = torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))
            keep = keep[order[:samples].sort().values.to(keep.device)]
        return keep


@contextlib.contextmanager
def writing_into(path: Union[str, Path], what: str):
    """Holds the lock of the run folder of ``path`` (a checkpoint or a run folder) while an
    analysis writes its outputs into that folder (a surface's default ``RUN/surface/...``):
    one writer per run folder (:class:`train.run_folder.RunLock`). Under torchrun only rank 0,
    the one that writes, takes it.

    Raises:
        train.checkpoint.CheckpointError: another live process (a trainer) holds the lock; the
            message names it.
    """
    from landscape._distributed import is_writer
    from train.run_folder import RunBusy, RunLock

    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    if not is_writer():
        yield
        return
    try:
        lock = RunLock(run_dir, what).acquire()
    except RunBusy as error:
        raise ckpt.CheckpointError(f"{error}; or write elsewhere with --out") from None
    try:
        yield
    finally:
        lock.release()


def _check_finite(model: nn.Module, path: Path) -> None:
    """NaN or infinite weights (or BatchNorm statistics) make every analysis meaningless, and
    the eigensolvers fail deep inside: refuse them here, naming the checkpoint."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ckpt.CheckpointError(f"{path}: {name} holds NaN or infinite values "
                                       "(a diverged run?); nothing to analyse")


def load(path: Union[str, Path], device: Union[str, torch.device, None] = None,
         data_dir: Optional[str] = None, *, data: Optional[LongTailData] = None) -> Run:
    """Loads a checkpoint (or the newest checkpoint of a run folder) for analysis.

    Args:
        path: ``epoch_NNNN.pt`` or a run folder.
        device: where to put the model and data (default: CUDA if available, else CPU).
        data_dir: where the CIFAR files or image folders are, if not where the run found them.
        data: the dataset of another checkpoint of the same run (its ``run.data``, on the same
            device), reused instead of being built again: the data do not depend on the epoch.

    Raises:
        train.checkpoint.CheckpointError: unreadable, altered or mismatched files, or weights
            that are not finite.
    """
    path = _resolve_path(Path(path))
    state = ckpt.load_checkpoint(path)
    run_dir = path.parent
    try:
        config = Config.from_json(ckpt.read_config(run_dir))
        saved = Config.from_json(state.get("config", {}))
    except ConfigError as error:
        raise ckpt.CheckpointError(f"{path}: invalid config ({error})") from None
    diff = identity_changes(saved, config)
    if diff:
        raise ckpt.CheckpointError(f"{path}: its config differs from {run_dir / 'config.json'} "
                                   f"in {', '.join(diff)} (checkpoint of another run?)")
    if data_dir is not None:  # the data moved: the run is the same (data_dir is no identity)
        config = config.replace(data_dir=str(data_dir))
    device = resolve_device(device)
    spec = config.spec
    model = build_model(config.model, spec.image_shape, spec.num_classes, config.width)
    try:
        model.load_state_dict(state["model"])
    except Exception as error:  # wrong keys or shapes, or values that are not tensors
        text = summarize(error, 200) or type(error).__name__
        raise ckpt.CheckpointError(f"{path}: weights do not fit the config's model "
                                   f"{config.model} ({text})") from None
    _check_finite(model, path)
    model.to(device).eval()
    return Run(path, run_dir, int(state["epoch"]), config, model, device, data_dir, data)
