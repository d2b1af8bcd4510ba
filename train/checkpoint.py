"""Run folders: checkpoints with recorded digests, safe loading, config and metrics files.

The files of a run folder are named in :mod:`train.run_folder` (``config.json``,
``metrics.jsonl``, ``epoch_NNNN.pt``, the manifest ``checkpoints.json``).
Every file is written through :mod:`train.io` (a temporary file ``.NAME.XXXXXXXX.tmp`` in the
same folder, flushed, fsynced and renamed), so it is complete on disk or absent; a kill can leave
such a temporary file behind, which every reader ignores and :func:`clean_stale_temps` removes
when a run resumes.
Metrics lines are appended whole (a short write is undone). A checkpoint's digest goes into the
manifest *before* the checkpoint is renamed into place: any ``epoch_NNNN.pt`` present has its
digest recorded (the manifest may name a file whose rename a crash prevented; such entries are
ignored).

Checkpoints hold only tensors and plain data and are read with ``torch.load(...,
weights_only=True)``: a file whose pickle would build any other object is refused, so loading
never runs code. Every checkpoint is loaded back that way before it is written, so a checkpoint
this toolkit writes is always one it can read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import sys
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch

from train.config import Config, ConfigError
from train.data import DataError, split_groups
from train.io import atomic_write_bytes, atomic_write_json, summarize
from train.run_folder import BEST, CHECKPOINT_RE, CONFIG, MANIFEST, METRICS, checkpoint_name, \
    is_own_temp

__all__ = [
    "CheckpointError", "save_checkpoint", "load_checkpoint", "list_checkpoints", "checkpoint_path",
    "read_config", "check_derived", "read_metrics", "metrics_through", "recorded_epochs",
    "clean_stale_temps", "recorded_sha256", "contents_sha256",
    "FORMAT", "MANIFEST",
]

FORMAT = "sse-sam-checkpoint/1"
_JSON_ERRORS = (OSError, ValueError, UnicodeDecodeError, RecursionError)


class CheckpointError(ValueError):
    """A run folder or checkpoint that cannot be read or trusted; the message names the file."""


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The complete lines of ``metrics.jsonl`` (a torn last line is skipped)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_bytes().split(b"\n"):
        try:
            row = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def metrics_through(run_dir: str | os.PathLike, epoch: int) -> list[dict]:
    """The rows of epochs ``1..epoch``: what a run resumed after ``epoch`` keeps.

    Every row must carry a whole epoch number and no epoch may have two rows, or this refuses
    (rather than drop in silence a row it cannot place, or keep the rows of two runs).

    Raises:
        CheckpointError: one line naming ``metrics.jsonl`` and the bad row's epoch.
    """
    path, kept, seen = Path(run_dir) / METRICS, [], set()
    for row in read_metrics(run_dir):
        number = row.get("epoch")
        if type(number) is not int or number < 1:
            raise CheckpointError(f"{path}: a row with epoch {summarize(json.dumps(number), 40)}, "
                                  "not a whole number >= 1; fix or remove that row to resume")
        if number in seen:
            raise CheckpointError(f"{path}: two rows for epoch {number} (rows of two runs?); "
                                  "remove the wrong one to resume")
        seen.add(number)
        if number <= epoch:
            kept.append(row)
    return kept


def read_config(run_dir: str | os.PathLike) -> dict:
    """``config.json`` as a dict, its ``derived`` entry checked (:func:`check_derived`)."""
    path = Path(run_dir) / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a run folder?)") from None
    except RecursionError:
        raise CheckpointError(f"{path}: unreadable (nested too deeply)") from None
    except _JSON_ERRORS as error:
        raise CheckpointError(f"{path}: unreadable ({summarize(error, 200)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    check_derived(config, path)
    return config


def check_derived(config: dict, path: str | os.PathLike) -> None:
    """Refuses a ``config.json`` whose ``derived`` entry (class counts, groups, splits, ...) is
    not what its settings give: the report shows the stored groups while every number is
    computed with the real ones, so an edit there would give a wrong answer.

    Settings that do not make a valid :class:`Config` are left to the caller's
    ``Config.from_json``, which says what is wrong with them. For an image folder the entries
    that come from its files (counts, classes, statistics) are the data loader's to check; the
    groups must still follow from the stored counts.

    Raises:
        CheckpointError: one line naming ``path`` and the entries that differ.
    """
    try:
        settings = Config.from_json(config)
    except (ConfigError, DataError):
        return
    stored = config.get("derived")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: \"derived\" is {summarize(json.dumps(stored), 40)}, not "
                              "the object of what its settings give (edited?)")
    wrong = _differences(settings, stored)
    if wrong:
        raise CheckpointError(f"{path}: derived {summarize(', '.join(wrong), 120)} differ from "
                              "what its settings "
                              "give (edited by hand?); restore them or the run's original file")


def _differences(settings: Config, stored: dict) -> list[str]:
    """The ``derived`` entries that differ from what the settings alone give (no image read)."""
    if settings.dataset != "folder":
        expected = settings.to_json()["derived"]
        return sorted(k for k in set(expected) | set(stored)
                      if _canonical_json(stored.get(k)) != _canonical_json(expected.get(k)))
    p = settings.preset()
    expected = {"optimizer_groups": list(p.groups), "switch_epoch": p.switch}
    counts = stored.get("class_counts")
    if not (isinstance(counts, list) and all(type(n) is int and n >= 0 for n in counts)):
        return ["class_counts"]
    expected["groups"] = split_groups(counts, settings.eta)
    return sorted(k for k in expected
                  if _canonical_json(stored.get(k)) != _canonical_json(expected[k]))


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def checkpoint_path(run_dir: str | os.PathLike, epoch: int) -> Path:
    return Path(run_dir) / checkpoint_name(epoch)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_manifest(run_dir: Path) -> dict:
    path = run_dir / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path}: unreadable manifest (nested too deeply)") from None
    except _JSON_ERRORS as error:
        raise CheckpointError(f"{path}: unreadable manifest ({summarize(error, 200)})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: manifest is not a JSON object")
    return manifest


def _load_bytes(data: bytes) -> Any:
    """``torch.load(weights_only=True)`` of ``data``; raises ``CheckpointError`` text on refusal."""
    try:
        with warnings.catch_warnings():  # e.g. "protocol 4": the outcome is told in one line
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refusals, zip errors, truncated streams
        text = str(error)
        refused = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", text)
        if refused:
            raise _Refused(f"refused to unpickle it ({summarize(refused.group(1), 160)}); "
                           "only tensors and plain data are ever loaded, nothing was run") from None
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        first = first.split(". This is an internal miniz error")[0]  # the rest is advice
        raise _Refused(f"not a loadable checkpoint ({summarize(first, 200)})") from None


class _Refused(Exception):
    pass


def _canonical(obj: Any) -> Any:
    """``obj`` with every string interned, so that equal states pickle to equal bytes.

    Pickle writes a string object seen before as a back-reference: without this, a key that is
    one object in a fresh run (``"lr"`` in the config and in the optimizer) but two objects after
    a resume (one of them unpickled) would give the same state different bytes and digests.
    """
    if type(obj) is str:
        return sys.intern(obj)
    if isinstance(obj, dict):
        copy = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for key, value in obj.items():
            copy[_canonical(key)] = _canonical(value)
        metadata = getattr(obj, "_metadata", None)  # module versions of a state_dict
        if metadata is not None:
            copy._metadata = _canonical(metadata)
        return copy
    if type(obj) in (list, tuple):
        return type(obj)(_canonical(value) for value in obj)
    return obj


def save_checkpoint(run_dir: str | os.PathLike, epoch: int, state: dict) -> Path:
    """Atomically writes ``epoch_NNNN.pt`` and records its digest in the manifest first.

    ``state`` must hold only tensors and plain data: it is loaded back with
    ``weights_only=True`` before anything is written, so that a checkpoint this toolkit writes
    is always one it can read.
    """
    return _save(Path(run_dir), checkpoint_path(run_dir, epoch), epoch, state)


def save_best(run_dir: str | os.PathLike, epoch: int, state: dict) -> Path:
    """Writes ``best.pt`` (the best-on-test checkpoint of ``protocol="seed"``) like a
    checkpoint: digest recorded first, then the file; :func:`load_checkpoint` reads it."""
    return _save(Path(run_dir), Path(run_dir) / BEST, epoch, state)


def load_best(run_dir: str | os.PathLike) -> Optional[dict]:
    """The verified state in ``best.pt``, or ``None`` when the run has none."""
    path = Path(run_dir) / BEST
    return load_checkpoint(path) if path.exists() else None


def _save(run_dir: Path, path: Path, epoch: int, state: dict) -> Path:
    buffer = io.BytesIO()
    torch.save(_canonical({"format": FORMAT, "epoch": int(epoch), **state}), buffer)
    data = buffer.getvalue()
    try:
        _load_bytes(data)
    except _Refused as error:
        raise TypeError(f"{path}: the state would not load back: {error}") from None
    manifest = _read_manifest(run_dir)
    manifest[path.name] = {"sha256": _sha256(data), "bytes": len(data), "epoch": int(epoch)}
    atomic_write_json(run_dir / MANIFEST, manifest)  # digest first, then the file
    atomic_write_bytes(path, data)
    return path


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the run's checkpoint files, oldest first (temporary files ignored)."""
    run_dir = Path(run_dir)
    found = []
    for entry in run_dir.iterdir() if run_dir.is_dir() else []:
        match = CHECKPOINT_RE.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def recorded_sha256(path: str | os.PathLike) -> Optional[str]:
    """The sha256 that the run's manifest records for the checkpoint ``path`` (what
    :func:`load_checkpoint` checks its bytes against), or None where none is recorded."""
    path = Path(path)
    try:
        return json.loads((path.parent / MANIFEST).read_text())[path.name]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def contents_sha256(path: str | os.PathLike) -> str:
    """The sha256 of the checkpoint's bytes: the manifest's record (which :func:`load_checkpoint`
    checked them against), else computed from the file (a checkpoint outside a run folder)."""
    return recorded_sha256(path) or _sha256(Path(path).read_bytes())


def recorded_epochs(run_dir: str | os.PathLike) -> list[int]:
    """The epochs of the ``epoch_NNNN.pt`` the manifest records, sorted, whether or not the
    files are still there."""
    entries = _read_manifest(Path(run_dir)).items()
    return sorted(entry["epoch"] for name, entry in entries if CHECKPOINT_RE.match(name)
                  and isinstance(entry, dict) and type(entry.get("epoch")) is int)


def clean_stale_temps(run_dir: str | os.PathLike) -> list[Path]:
    """Removes the temporary files a killed trainer left in ``run_dir``; returns them.

    Only ``.NAME.XXXXXXXX.tmp`` files (what :func:`atomic_writer` creates) of the run's own
    files are touched (``NAME`` a checkpoint, the manifest, ``config.json`` or
    ``metrics.jsonl``): an analysis writing its own files into the folder is left alone.
    """
    run_dir = Path(run_dir)
    removed = []
    for entry in run_dir.iterdir() if run_dir.is_dir() else []:
        if is_own_temp(entry.name) and entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> dict:
    """Reads a checkpoint safely, checking its digest against the run's manifest.

    Raises:
        CheckpointError: the file is missing, truncated, altered, not recorded, not a
            checkpoint of this project, stored under another epoch's name, of an epoch past its
            run's last, or would need more than tensors and plain data. The message is one
            line and names the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as error:
        strerror = getattr(error, "strerror", None)
        raise CheckpointError(f"{path}: cannot read ({summarize(strerror or error)})") from None
    match = CHECKPOINT_RE.match(path.name)
    if verify:
        entry = _read_manifest(path.parent).get(path.name)
        if entry is None:
            raise CheckpointError(f"{path}: no digest recorded in {MANIFEST} (not written by "
                                  "this toolkit, or copied without its manifest)")
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: its entry in {MANIFEST} is not a JSON object")
        if len(data) != entry.get("bytes"):
            raise CheckpointError(f"{path}: {len(data)} bytes, {summarize(entry.get('bytes'), 40)}"
                                  " recorded (truncated or altered)")
        if _sha256(data) != entry.get("sha256"):
            raise CheckpointError(f"{path}: SHA-256 differs from the recorded digest (altered)")
    try:
        state = _load_bytes(data)
    except _Refused as error:
        raise CheckpointError(f"{path}: {error}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this toolkit (format {FORMAT} "
                              "expected)")
    epoch = state.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise CheckpointError(f"{path}: no valid epoch number inside")
    if match and int(match.group(1)) != epoch:
        raise CheckpointError(f"{path}: holds the checkpoint of epoch {epoch}, not of epoch "
                              f"{int(match.group(1))} (renamed or copied over?)")
    for key, kind in (("model", dict), ("config", dict)):
        if not isinstance(state.get(key), kind):
            raise CheckpointError(f"{path}: no {key} state inside")
    _check_epoch(path, epoch, state["config"].get("epochs"), entry if verify else None)
    return state


def _check_epoch(path: Path, epoch: int, epochs: Any, entry: dict | None) -> None:
    """A checkpoint's epoch must be one its run can have (``0..epochs``) and the one its
    manifest entry records."""
    if type(epochs) is int and epoch > epochs:
        raise CheckpointError(f"{path}: holds epoch {epoch}, but its run has {epochs} epochs "
                              "(not a checkpoint this run can have)")
    recorded = entry.get("epoch", epoch) if entry is not None else epoch
    if recorded != epoch:
        raise CheckpointError(f"{path}: holds epoch {epoch}, {summarize(recorded, 40)} "
                              f"recorded in {MANIFEST} (renamed or copied over?)")
