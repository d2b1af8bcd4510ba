"""The training loop: epochs, cosine schedule, evaluation, metrics, checkpoints and resume.

Learning rate of 0-based epoch ``e`` of ``E``: ``lr * (1 + cos(pi * e / E)) / 2`` (cosine
annealing to 0, no warm-up); ``protocol="seed"`` uses ``e + 1``, as the seed code's scheduler
stepped before each epoch does (:func:`train.protocol.learning_rate`).

Evaluation: every epoch (``ours``), or as the seed code does every 10th epoch and the last
(``seed``), where the best mean per-class test accuracy so far is kept as ``best.pt`` and, at
the end, re-evaluated with flip test-time augmentation into ``results.json`` beside the final
checkpoint's accuracy, labelled test-selected (:func:`write_results`).

Checkpoint ``epoch_NNNN.pt`` is the state after ``NNNN`` finished epochs (``epoch_0000.pt``: the
initial weights); it holds the model, the base optimizer's state (momentum) and the config, and
is all ``--resume`` needs: an epoch's data order and augmentation are a function of
``(seed, epoch)`` and the schedule a function of the epoch, so a resumed run repeats exactly
what the uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from train import checkpoint as ckpt
from train import distributed
from train import run_folder as files
from train.config import Config, ConfigError, identity_changes
from train.data import LongTailData, epoch_generator, train_batches
from train.device import resolve_device
from train.evaluation import evaluate
from train.io import append_line, atomic_write_bytes, atomic_write_json, summarize, write_lines
from train.losses import build_loss
from train.models import build_model
from train.optim import GroupSAM, group_sample_weights
from train.protocol import learning_rate, selects_best
from train.stream import StreamData, StreamLoader, run_loaders, stream_batches

__all__ = ["train", "evaluate", "TrainingDiverged", "RunExists", "Trainer"]


class TrainingDiverged(RuntimeError):
    """A non-finite training loss; the last good checkpoint is kept."""


class RunExists(ConfigError):
    """The output folder already holds a run and neither resume nor overwrite was asked."""


@dataclass
class Trainer:
    """The live objects of a run: data on the device (or streamed by its two loaders), model,
    loss, optimizer step."""

    config: Config
    data: LongTailData
    model: nn.Module
    loss_fn: nn.Module
    base_optimizer: torch.optim.Optimizer
    step: GroupSAM
    group_of_class: torch.Tensor
    group_scale: Optional[torch.Tensor]
    device: torch.device
    train_loader: Optional[StreamLoader] = None  # decode stream: this rank's part of a batch
    test_loader: Optional[StreamLoader] = None  # every rank evaluates every test image

    @classmethod
    def build(cls, config: Config, data: Optional[LongTailData] = None,
              reduce_gradients=None) -> "Trainer":
        device = resolve_device(config.device)
        if data is None:
            data = config.load_data()
        data = data.to(device)
        model = build_model(config.model, data.spec.image_shape, data.spec.num_classes,
                            config.width, seed=config.seed,
                            init="seed" if config.protocol == "seed" else "ours").to(device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        loss_fn = build_loss(config.loss, data.counts, config.gamma_vs, config.tau).to(device)
        base = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.wd)
        if distributed.world() > 1:  # torchrun: start from rank 0's weights; sum gradients
            distributed.broadcast_module(model)
            if reduce_gradients is None:
                reduce_gradients = distributed.all_reduce_sum
        # The step runs the compiled module; ``model`` (same parameters) is kept for state_dict.
        forward = torch.compile(model) if config.compile else model
        step = GroupSAM(forward, base, bn_update=config.bn_update,
                        forward_per_group=config.opt == "ssesam",
                        reduce_gradients=reduce_gradients, perturbation=config.perturbation)
        p = config.preset()
        group_of_class = torch.zeros(data.spec.num_classes, dtype=torch.long)
        group_scale = None
        if p.groups == ("head", "tail"):
            group_of_class[config.groups["tail"]] = 1
            group_scale = torch.tensor([1.0, config.tail_scale], device=device)
        trainer = cls(config, data, model, loss_fn, base, step, group_of_class.to(device),
                      group_scale, device)
        if isinstance(data, StreamData):
            trainer.train_loader, trainer.test_loader = run_loaders(
                data, config.batch_size, workers=config.workers, seed=config.seed,
                device=device, rank=distributed.rank(), world=distributed.world())
        return trainer

    def train_epoch(self, epoch: int) -> float:
        """Runs 0-based ``epoch``; returns the mean training loss (raises on a non-finite one)."""
        config, p = self.config, self.config.preset()
        for group in self.base_optimizer.param_groups:
            group["lr"] = learning_rate(config.protocol, config.lr, epoch, config.epochs)
        rhos = p.rhos(epoch)
        self.model.train()
        losses, sizes = [], []
        world = distributed.world()
        if self.train_loader is not None:  # one item per global batch, empty parts included
            n = len(self.data.train.paths)
            batches = stream_batches(self.train_loader, self.data.spec, epoch)
        else:
            n = self.data.train_y.shape[0]
            shard = (distributed.rank(), world) if world > 1 else None  # this rank's part
            generator = epoch_generator(config.seed, epoch)
            batches = train_batches(self.data, config.batch_size, generator, shard=shard)
        for start, (inputs, targets) in zip(range(0, n, config.batch_size), batches):
            size = min(config.batch_size, n - start)  # of the global batch
            losses.append(self.train_step(inputs, targets, rhos, size))
            sizes.append(size)
        batch_losses = torch.stack(losses).float()
        if world > 1:  # a rank's loss is its part of the global batch's; BN stats per rank
            distributed.all_reduce_sum([batch_losses])
            distributed.average_buffers(self.model)
        batch_losses = batch_losses.cpu()  # the epoch's one synchronisation
        bad = (~torch.isfinite(batch_losses)).nonzero()
        if len(bad):
            raise TrainingDiverged(f"non-finite training loss at epoch {epoch + 1}, step "
                                   f"{int(bad[0]) + 1} of {len(losses)}")
        weights = torch.tensor(sizes, dtype=torch.float32)
        return float((batch_losses * weights).sum() / weights.sum())

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, rhos, global_size: int
                   ) -> torch.Tensor:
        """One optimizer step on a batch (this rank's part of it under torchrun).

        ``global_size`` is the size of the whole batch across ranks. Returns the (part of the)
        batch loss as a device tensor; nothing here waits for the device.
        """
        config, p = self.config, self.config.preset()
        if config.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        weights = group_sample_weights(targets, self.group_of_class, len(p.groups),
                                       config.group_reduction, self.group_scale,
                                       batch_size=global_size,
                                       sum_over_ranks=distributed.all_reduce_sum,
                                       dtype=next(self.model.parameters()).dtype)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            return self.step.step(inputs, targets, self.loss_fn, rhos, weights)

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.base_optimizer.state_dict(),
                "config": self.config.to_json()}

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.base_optimizer.load_state_dict(state["optimizer"])


def _prepare_folder(config: Config, out: Path, resume: bool, overwrite: bool) -> int:
    """Checks / clears the run folder; returns the number of epochs already done."""
    existing = out / files.CONFIG
    has_run = files.holds_run(out)
    if resume:
        if not has_run:
            return -1  # nothing to resume: start fresh
        try:
            stored = Config.from_json(ckpt.read_config(out))
        except ConfigError as error:
            raise ckpt.CheckpointError(f"{existing}: invalid config ({error})") from None
        diff = identity_changes(stored, config)
        if diff:
            raise ConfigError(f"{existing}: run was made with different settings "
                              f"({', '.join(diff)})")
        return 0
    if has_run and not overwrite:
        raise RunExists(f"{out} already holds a run; pass --resume to continue it or "
                        "--overwrite to replace it")
    return -1


def _latest_good_checkpoint(out: Path) -> tuple[int, dict, Path] | None:
    """The newest checkpoint, verified; a damaged one is an error, never skipped in silence."""
    found = ckpt.list_checkpoints(out)
    if not found:
        return None
    epoch, path = found[-1]
    try:
        return epoch, ckpt.load_checkpoint(path), path
    except ckpt.CheckpointError as error:
        about_the_file = str(error).startswith(f"{path}:")  # not the manifest or config
        hint = (f"; move it away to resume from {found[-2][1].name}"
                if len(found) > 1 and about_the_file else "")
        raise ckpt.CheckpointError(f"{error}{hint}") from None


def _restore(trainer: "Trainer", saved: dict, path: Path) -> None:
    """Loads a checkpoint into the trainer, or says in one line why it does not fit this run."""
    try:
        theirs = Config.from_json(saved["config"])
    except ConfigError as error:
        raise ckpt.CheckpointError(f"{path}: invalid config inside ({error})") from None
    diff = identity_changes(theirs, trainer.config)
    if diff:
        raise ckpt.CheckpointError(f"{path}: made by another run (its {', '.join(diff)} differ "
                                   "from config.json)")
    try:
        trainer.load_state(saved)
        for param in trainer.model.parameters():
            momentum = trainer.base_optimizer.state.get(param, {}).get("momentum_buffer")
            if momentum is not None and momentum.shape != param.shape:
                raise ValueError(f"momentum of shape {tuple(momentum.shape)} for a parameter of "
                                 f"shape {tuple(param.shape)}")
    except Exception as error:  # missing keys, wrong shapes, foreign objects: one clear line
        text = summarize(error, 200) or type(error).__name__
        raise ckpt.CheckpointError(f"{path}: does not fit this run's {trainer.config.model} model "
                                   f"or optimizer ({text})") from None


def train(config: Config, out: str | Path, resume: bool = False, overwrite: bool = False,
          progress: bool = True, log: Callable[[str], None] = print,
          data: Optional[LongTailData] = None, reduce_gradients=None,
          is_writer: bool = True, notices: Sequence[str] = ()) -> Path:
    """Trains ``config`` into the run folder ``out`` and returns it.

    Args:
        config: the run.
        out: run folder (created).
        resume: continue the run in ``out`` from its newest good checkpoint.
        overwrite: replace a run already in ``out``.
        progress: show a progress bar over epochs.
        log: where one-line messages go.
        data: a dataset already built (tests); by default it is built from the config.
        reduce_gradients: gradient all-reduce for data parallelism (see :class:`GroupSAM`).
        is_writer: whether this process writes files (rank 0 under torchrun).
        notices: lines for ``log`` once the folder, the data and the model are known to be
            good (a warning about the settings; bad input then stays one line).

    Raises:
        train.run_folder.RunBusy: another live process writes into ``out`` (the writer holds
            the folder's lock from before its first check to its last write).
    """
    out = Path(out)
    with files.RunLock(out, "training") if is_writer else contextlib.nullcontext():
        return _train_locked(config, out, resume, overwrite, progress, log, data,
                             reduce_gradients, is_writer, notices)


def _train_locked(config: Config, out: Path, resume: bool, overwrite: bool, progress: bool,
                  log: Callable[[str], None], data: Optional[LongTailData], reduce_gradients,
                  is_writer: bool, notices: Sequence[str] = ()) -> Path:
    # The folder and its newest checkpoint are checked before the (slow) data and model.
    state = _prepare_folder(config, out, resume, overwrite)
    found = _latest_good_checkpoint(out) if state == 0 else None
    if state == 0 and found is None and not overwrite:
        _refuse_to_start_over(out)
    kept_rows = ckpt.metrics_through(out, found[0]) if found is not None else []
    trainer = Trainer.build(config, data=data, reduce_gradients=reduce_gradients)
    for line in notices:
        log(line)
    start = 0
    if found is not None:
        start, saved, path = found
        _restore(trainer, saved, path)
        log(f"resuming {out} after epoch {start}")
    distributed.barrier()  # under torchrun: every rank has read the folder before rank 0 writes
    if is_writer:
        stale = ckpt.clean_stale_temps(out)  # left by a killed writer
        if stale:
            log(f"removed {len(stale)} stale temporary file(s) from {out}")
        if start == 0:
            if overwrite:
                _clear_run(out, log)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / files.CONFIG, config.to_json())
            atomic_write_bytes(out / files.METRICS, b"")
            ckpt.save_checkpoint(out, 0, trainer.state())
        else:  # drop metrics of epochs after the checkpoint: they are about to be redone
            write_lines(out / files.METRICS, kept_rows)
    _run_epochs(trainer, out, start, progress, log, is_writer)
    return out


def _refuse_to_start_over(out: Path) -> None:
    """``--resume`` with no checkpoint left starts the run over only if it had trained no epoch
    (killed before its first checkpoint); else its checkpoints were moved away, and starting
    over would empty its metrics."""
    rows, recorded = len(ckpt.read_metrics(out)), [e for e in ckpt.recorded_epochs(out) if e]
    if rows or recorded:
        had = (f"{files.METRICS} holds {rows} epoch(s)" if rows else
               f"{files.MANIFEST} records {files.checkpoint_name(recorded[-1])}")
        raise ckpt.CheckpointError(f"{out}: no checkpoint left to resume from, though {had} "
                                   "(moved away?); put them back, or start the run over with "
                                   "--out and --overwrite")


def _clear_run(out: Path, log: Callable[[str], None]) -> None:
    """``--overwrite``: removes the trainer's own files of the run in ``out``, and says in one
    line what it leaves there (nothing at all is removed from a folder without a run)."""
    had_run = files.holds_run(out)
    kept = files.clear_run(out)
    if kept:
        shown = ", ".join(kept[:8]) + (f" and {len(kept) - 8} more" if len(kept) > 8 else "")
        what = "the run's files removed" if had_run else "no run there, nothing removed"
        log(f"--overwrite: {what}; kept in {out} what the trainer did not write: {shown}")


def _run_epochs(trainer: Trainer, out: Path, start: int, progress: bool, log, is_writer: bool):
    from tqdm.auto import tqdm

    config, p = trainer.config, trainer.config.preset()
    best = _best_so_far(out, start) if config.protocol == "seed" else None
    bar = tqdm(range(start, config.epochs), initial=start, total=config.epochs, unit="epoch",
               disable=not progress, desc=f"{config.opt}/{config.loss}", leave=False)
    for epoch in bar:
        began = time.perf_counter()
        train_loss = trainer.train_epoch(epoch)
        row = {"epoch": epoch + 1, "lr": trainer.base_optimizer.param_groups[0]["lr"],
               "train_loss": train_loss, "stage": p.stage(epoch),
               "rho": dict(zip(p.groups, p.rhos(epoch)))}
        if _evaluates(config, epoch):
            accuracy = evaluate(trainer.model, trainer.data, config.groups, config.tta,
                                loader=trainer.test_loader)
            row.update(accuracy, tta=config.tta)
            bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{accuracy['acc']:.1f}")
        row["seconds"] = time.perf_counter() - began
        if not is_writer:
            continue
        append_line(out / files.METRICS, row)
        if selects_best(config.protocol, epoch) and (best is None or row["acc"] > best):
            best = row["acc"]  # strictly better: the earliest of equal epochs is kept, as theirs
            ckpt.save_best(out, epoch + 1, trainer.state())
        if (epoch + 1) % config.save_every == 0 or epoch + 1 == config.epochs:
            ckpt.save_checkpoint(out, epoch + 1, trainer.state())
    bar.close()
    if is_writer and config.protocol == "seed":
        write_results(trainer, out)


def _evaluates(config: Config, epoch: int) -> bool:
    """Every epoch under ``ours``; the seed's every 10th and the last under ``seed``."""
    return (config.protocol != "seed" or selects_best(config.protocol, epoch)
            or epoch + 1 == config.epochs)


def _best_so_far(out: Path, start: int) -> Optional[float]:
    """The best test accuracy of the selecting epochs up to ``start`` (from metrics.jsonl)."""
    rows = [r for r in ckpt.read_metrics(out) if isinstance(r.get("epoch"), int)
            and r["epoch"] <= start and selects_best("seed", r["epoch"] - 1) and "acc" in r]
    return max((float(r["acc"]) for r in rows), default=None)


def write_results(trainer: Trainer, out: Path) -> dict:
    """``results.json``: the final checkpoint's accuracy (as trained, no selection) beside the
    best-on-test checkpoint's with flip TTA, labelled ``test_selected`` (it was chosen on the
    test set, so it overstates what the method generalises to)."""
    config = trainer.config
    final = next(r for r in reversed(ckpt.read_metrics(out)) if r.get("epoch") == config.epochs)
    results = {"final": {k: v for k, v in final.items() if k == "epoch" or k.startswith("acc")
                         or k == "tta"}}
    saved = ckpt.load_best(out)
    if saved is not None:
        model = copy.deepcopy(trainer.model)
        model.load_state_dict(saved["model"])
        accuracy = evaluate(model, trainer.data, config.groups, tta=True,
                            loader=trainer.test_loader)
        results["test_selected"] = {"epoch": saved["epoch"], "tta": True, **accuracy,
                                    "selected_on": "test set, every 10th epoch, no TTA"}
    atomic_write_json(out / files.RESULTS, results)
    return results
