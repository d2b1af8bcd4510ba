"""Run folders: atomic files, checkpoints with recorded digests, and safe loading.

A run folder holds::

    config.json         everything needed to rebuild the data, the model and the groups
    metrics.jsonl       one JSON line per finished epoch
    epoch_NNNN.pt       a checkpoint after NNNN finished epochs (0000: the initial weights)
    checkpoints.json    the manifest: for each checkpoint its SHA-256, size and epoch

Every file is written to a temporary file in the same folder, flushed, fsynced and renamed,
so it is complete on disk or absent. A checkpoint's digest goes into the manifest *before* the
checkpoint is renamed into place: any ``epoch_NNNN.pt`` present has its digest recorded (the
manifest may name a file whose rename a crash prevented; such entries are ignored).

Checkpoints hold only tensors and plain data and are read with ``torch.load(...,
weights_only=True)``: a file whose pickle would build any other object is refused, so loading
never runs code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError", "atomic_write_bytes", "atomic_write_json", "append_line",
    "save_checkpoint", "write_lines", "load_checkpoint", "list_checkpoints", "checkpoint_path",
    "read_config", "read_metrics", "FORMAT",
]

FORMAT = "sse-sam-checkpoint/1"
CHECKPOINT_RE = re.compile(r"^epoch_(\d{4,})\.pt$")
MANIFEST = "checkpoints.json"


class CheckpointError(ValueError):
    """A run folder or checkpoint that cannot be read or trusted; the message names the file."""


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that ``path`` is either the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def append_line(path: str | os.PathLike, obj: Any) -> None:
    """Appends one JSON line in a single ``write`` call, then fsyncs.

    A crash can leave at most a partial last line, which :func:`read_metrics` drops.
    """
    line = (json.dumps(obj, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
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
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_config(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a run folder?)") from None
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable ({error})") from None
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
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: manifest is not a JSON object")
    return manifest


def save_checkpoint(run_dir: str | os.PathLike, epoch: int, state: dict) -> Path:
    """Atomically writes ``epoch_NNNN.pt`` and records its digest in the manifest first.

    ``state`` must hold only tensors and plain data (it is checked by loading it back with
    ``weights_only=True`` before anything is written).
    """
    run_dir = Path(run_dir)
    path = checkpoint_path(run_dir, epoch)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "epoch": int(epoch), **state}, buffer)
    data = buffer.getvalue()
    manifest = _read_manifest(run_dir)
    manifest[path.name] = {"sha256": _sha256(data), "bytes": len(data), "epoch": int(epoch)}
    atomic_write_json(run_dir / MANIFEST, manifest)  # digest first, then the file
    atomic_write_bytes(path, data)
    return path


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the run's checkpoint files, oldest first."""
    run_dir = Path(run_dir)
    found = []
    for entry in run_dir.iterdir() if run_dir.is_dir() else []:
        match = CHECKPOINT_RE.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> dict:
    """Reads a checkpoint safely, checking its digest against the run's manifest.

    Raises:
        CheckpointError: the file is missing, truncated, altered, not recorded, not a
            checkpoint of this project, or would need more than tensors and plain data.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({error.strerror or error})") from None
    if verify:
        entry = _read_manifest(path.parent).get(path.name)
        if entry is None:
            raise CheckpointError(f"{path}: no digest recorded in {MANIFEST} (not written by "
                                  "this toolkit, or copied without its manifest)")
        if len(data) != entry.get("bytes"):
            raise CheckpointError(f"{path}: {len(data)} bytes, {entry.get('bytes')} recorded "
                                  "(truncated or altered)")
        if _sha256(data) != entry.get("sha256"):
            raise CheckpointError(f"{path}: SHA-256 differs from the recorded digest (altered)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refusals, zip errors, truncated streams
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this toolkit (format {FORMAT} "
                              "expected)")
    return state
