r"""The files a trainer writes into its run folder: named once, for the writer, the checker and
``--overwrite``.

A run folder holds::

    config.json         everything needed to rebuild the data, the model and the groups
    metrics.jsonl       one JSON line per finished epoch
    epoch_NNNN.pt       a checkpoint after NNNN finished epochs (0000: the initial weights)
    checkpoints.json    the manifest: for each checkpoint its SHA-256, size and epoch

and, after a kill, temporary files ``.NAME.XXXXXXXX.tmp`` of those names (:mod:`train.io`).
Anything else in the folder (an analysis's outputs, a user's notes) is not the trainer's:
:func:`clear_run` never removes it.

Example:
    >>> [is_own(name) for name in ("config.json", "epoch_0012.pt", ".metrics.jsonl.ab12cd34.tmp",
    ...                            "hessian", "notes.txt")]
    [True, True, True, False, False]
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from train.io import TEMP_RE

__all__ = ["CONFIG", "METRICS", "MANIFEST", "CHECKPOINT_RE", "checkpoint_name", "is_own",
           "is_own_temp", "holds_run", "clear_run"]

CONFIG = "config.json"
METRICS = "metrics.jsonl"
MANIFEST = "checkpoints.json"
CHECKPOINT_RE = re.compile(r"^epoch_(\d{4,})\.pt$")
_NAMED = (CONFIG, METRICS, MANIFEST)


def checkpoint_name(epoch: int) -> str:
    """``epoch_NNNN.pt``: the checkpoint after ``epoch`` finished epochs."""
    return f"epoch_{epoch:04d}.pt"


def _is_run_file(name: str) -> bool:
    return name in _NAMED or CHECKPOINT_RE.match(name) is not None


def is_own_temp(name: str) -> bool:
    """Whether ``name`` is a temporary file of one of the run's own files."""
    match = TEMP_RE.match(name)
    return match is not None and _is_run_file(match.group("name"))


def is_own(name: str) -> bool:
    """Whether a trainer writes files called ``name`` (its temporary files included)."""
    return _is_run_file(name) or is_own_temp(name)


def holds_run(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds (part of) a run: any entry with a run file's name (temporary
    files do not count)."""
    folder = Path(folder)
    return folder.is_dir() and any(_is_run_file(entry.name) for entry in folder.iterdir())


def clear_run(folder: str | os.PathLike) -> list[str]:
    """Removes the run in ``folder`` and returns the names of the entries it left there.

    Only the trainer's own files go (:func:`is_own`), and only when the folder holds a run;
    newest checkpoints first and the config last, so a kill part-way leaves a resumable run.
    Everything else stays: its names, sorted, are returned so the caller can say so.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    entries = sorted(folder.iterdir(), key=lambda entry: entry.name)
    if not holds_run(folder):
        return [entry.name for entry in entries]
    own = [entry for entry in entries if is_own(entry.name) and entry.is_file()]
    checkpoints = sorted((e for e in own if CHECKPOINT_RE.match(e.name)),
                         key=lambda e: int(CHECKPOINT_RE.match(e.name).group(1)), reverse=True)
    rest = [e for e in own if e not in checkpoints]
    order = {MANIFEST: 1, METRICS: 2, CONFIG: 3}  # temporary files first, the config last
    for entry in checkpoints + sorted(rest, key=lambda e: order.get(e.name, 0)):
        entry.unlink(missing_ok=True)
    return [entry.name for entry in entries if entry not in own]
