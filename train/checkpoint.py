"""Run folders: atomic files, checkpoints with recorded digests, and safe loading.

A run folder holds::

    config.json         everything needed to rebuild the data, the model and the groups
    metrics.jsonl       one JSON line per finished epoch
    epoch_NNNN.pt       a checkpoint after NNNN finished epochs (0000: the initial weights)
    checkpoints.json    the manifest: for each checkpoint its SHA-256, size and epoch

Every file is written to a temporary file in the same folder (``.NAME.XXXXXXXX.tmp``), flushed,
fsynced and renamed, so it is complete on disk or absent; a kill can leave such a temporary file
behind, which every reader ignores and :func:`clean_stale_temps` removes when a run resumes.
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
import errno
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = [
    "CheckpointError", "summarize", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
    "atomic_writer", "append_line", "save_checkpoint", "write_lines", "load_checkpoint",
    "list_checkpoints", "checkpoint_path", "read_config", "read_metrics", "clean_stale_temps",
    "FORMAT", "MANIFEST",
]

FORMAT = "sse-sam-checkpoint/1"
CHECKPOINT_RE = re.compile(r"^epoch_(\d{4,})\.pt$")
# tempfile.mkstemp(prefix=".NAME.", suffix=".tmp"): 8 random characters from [a-z0-9_].
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
MANIFEST = "checkpoints.json"
_JSON_ERRORS = (OSError, ValueError, UnicodeDecodeError, RecursionError)


class CheckpointError(ValueError):
    """A run folder or checkpoint that cannot be read or trusted; the message names the file."""


def summarize(text: object, limit: int = 300) -> str:
    """``text`` (an error, say) on one line: no control characters (ANSI colours, newlines),
    whitespace collapsed, at most ``limit`` characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(text))
    text = " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp gives 0600)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _named(error: OSError, path: Path) -> OSError:
    """``error`` with ``path`` as its file name if it had none (for a one-line message)."""
    if error.filename is not None:
        return error
    named = OSError(error.errno, error.strerror or str(error) or type(error).__name__, str(path))
    return named


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """A file to write ``path`` through: it appears under its name complete, or not at all.

    The file object is a temporary file in the same folder; leaving the block flushes, fsyncs
    and renames it over ``path``. An exception (or a kill) leaves ``path`` as it was. Use it
    for outputs written by a library call, e.g. ``np.savez(f, ...)`` or ``fig.savefig(f)``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _named(error, path) from None
    try:
        try:
            os.fchmod(fd, _FILE_MODE)
            with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as error:
            raise _named(error, path) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that ``path`` is either the old file or the new one."""
    with atomic_writer(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def append_line(path: str | os.PathLike, obj: Any) -> None:
    """Appends one JSON line whole, then fsyncs.

    The line goes out in one ``write`` call; if the write fails or is short (a full disk), the
    file is cut back to its old length and ``OSError`` is raised, so the file only ever holds
    whole lines (a kill cannot split one ``write`` of a regular file; a power loss could, and
    :func:`read_metrics` skips a torn line).
    """
    line = (json.dumps(obj, sort_keys=True) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, _FILE_MODE)
    except OSError as error:
        raise _named(error, Path(path)) from None
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)")
            os.fsync(fd)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise _named(error, Path(path)) from None
    finally:
        os.close(fd)


def write_lines(path: str | os.PathLike, rows: list) -> None:
    """Atomically replaces a JSON-lines file with ``rows``."""
    atomic_write_bytes(path, b"".join((json.dumps(r, sort_keys=True) + "\n").encode()
                                      for r in rows))


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The complete lines of ``metrics.jsonl`` (a torn last line is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
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


def read_config(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / "config.json"
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
    return config


def checkpoint_path(run_dir: str | os.PathLike, epoch: int) -> Path:
    return Path(run_dir) / f"epoch_{epoch:04d}.pt"


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
    run_dir = Path(run_dir)
    path = checkpoint_path(run_dir, epoch)
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


def clean_stale_temps(run_dir: str | os.PathLike) -> list[Path]:
    """Removes the temporary files a killed trainer left in ``run_dir``; returns them.

    Only ``.NAME.XXXXXXXX.tmp`` files (what :func:`atomic_writer` creates) of the run's own
    files are touched (``NAME`` a checkpoint, the manifest, ``config.json`` or
    ``metrics.jsonl``): an analysis writing its own files into the folder is left alone.
    """
    run_dir = Path(run_dir)
    removed = []
    for entry in run_dir.iterdir() if run_dir.is_dir() else []:
        match = TEMP_RE.match(entry.name)
        if match and entry.is_file() and (
                match.group("name") in (MANIFEST, "config.json", "metrics.jsonl")
                or CHECKPOINT_RE.match(match.group("name"))):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> dict:
    """Reads a checkpoint safely, checking its digest against the run's manifest.

    Raises:
        CheckpointError: the file is missing, truncated, altered, not recorded, not a
            checkpoint of this project, stored under another epoch's name, or would need more
            than tensors and plain data. The message is one line and names the file.
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
    return state
