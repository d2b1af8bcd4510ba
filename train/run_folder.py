r"""The files a trainer writes into its run folder: named once, for the writer, the checker and
``--overwrite``.

A run folder holds::

    config.json         everything needed to rebuild the data, the model and the groups
    metrics.jsonl       one JSON line per finished epoch
    epoch_NNNN.pt       a checkpoint after NNNN finished epochs (0000: the initial weights)
    checkpoints.json    the manifest: for each checkpoint its SHA-256, size and epoch
    best.pt             protocol "seed": the best-on-test checkpoint (every 10th epoch)
    results.json        protocol "seed": final and test-selected (flip TTA) accuracy

and, after a kill, temporary files ``.NAME.XXXXXXXX.tmp`` of those names (:mod:`train.io`).
While a trainer (or an analysis writing into the folder) works, ``.lock`` holds its process id
and host, and an ``flock`` on it keeps every other writer out (:class:`RunLock`).
Anything else in the folder (an analysis's outputs, a user's notes) is not the trainer's:
:func:`clear_run` never removes it.

Example:
    >>> [is_own(name) for name in ("config.json", "epoch_0012.pt", ".metrics.jsonl.ab12cd34.tmp",
    ...                            "hessian", "notes.txt")]
    [True, True, True, False, False]

    One writer at a time; a reader can ask who is writing (:func:`owner`):

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     with RunLock(folder, "training"):
    ...         print(owner(folder).split(",")[0])
    ...         try:
    ...             RunLock(folder, "another training").acquire()
    ...         except RunBusy as error:
    ...             print("refused:", str(error).split(": ")[1].split(",")[0])
    ...     print(owner(folder))
    training
    refused: in use by training
    None
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Optional

from train.io import TEMP_RE, summarize

__all__ = ["CONFIG", "METRICS", "MANIFEST", "BEST", "RESULTS", "LOCK", "CHECKPOINT_RE",
           "checkpoint_name", "is_own", "is_own_temp", "holds_run", "clear_run", "RunLock",
           "RunBusy", "owner"]

CONFIG = "config.json"
METRICS = "metrics.jsonl"
MANIFEST = "checkpoints.json"
BEST = "best.pt"
RESULTS = "results.json"
CHECKPOINT_RE = re.compile(r"^epoch_(\d{4,})\.pt$")
_NAMED = (CONFIG, METRICS, MANIFEST, BEST, RESULTS)
LOCK = ".lock"


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
    """Whether a trainer writes files called ``name`` (its temporary files and lock included)."""
    return name == LOCK or _is_run_file(name) or is_own_temp(name)


def holds_run(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds (part of) a run: any entry with a run file's name (temporary
    files and the lock do not count)."""
    folder = Path(folder)
    return folder.is_dir() and any(_is_run_file(entry.name) for entry in folder.iterdir())


def clear_run(folder: str | os.PathLike) -> list[str]:
    """Removes the run in ``folder`` and returns the names of the entries it left there.

    Only the trainer's own files go (:func:`is_own`), and only when the folder holds a run;
    newest checkpoints first and the config last, so a kill part-way leaves a resumable run.
    Everything else stays: its names, sorted, are returned so the caller can say so. The lock
    is the caller's (it holds it) and stays, unnamed: only its holder removes it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    entries = sorted(folder.iterdir(), key=lambda entry: entry.name)
    entries = [entry for entry in entries if entry.name != LOCK]
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


class RunBusy(RuntimeError):
    """Another live process holds the run folder's lock; the message names it."""


_BUSY_TRIES = 5  # a reader's probe (owner()) holds a shared lock for microseconds: try again


class RunLock:
    """The one-writer lock of a run folder: an exclusive ``flock`` on ``RUN_DIR/.lock``.

    Taken before anything is written (the folder is created if need be, and removed again on
    release if it is still empty) and held until the work ends. ``.lock`` holds the owner's
    ``{"pid", "host", "what"}`` for the refusal message and for :func:`owner`. The kernel
    drops the ``flock`` of a process that dies however it dies, so a dead owner's lock is simply
    taken over (its stale text overwritten); the holder removes ``.lock`` when it releases,
    and a process that locked a ``.lock`` just removed that way sees the file is gone and
    locks the new one, so two holders never coexist.

    Args:
        run_dir: the run folder.
        what: who holds it, for the messages (``"training"``, ``"landscape hessian"``).

    Raises:
        RunBusy: (from :meth:`acquire` / ``with``) a live process holds the lock.
    """

    def __init__(self, run_dir: str | os.PathLike, what: str):
        self.run_dir, self.what = Path(run_dir), what
        self._fd: Optional[int] = None
        self._created: list[Path] = []

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            raise RuntimeError(f"{self.run_dir / LOCK}: already held by this RunLock")
        self._created = _make_folders(self.run_dir)
        try:
            self._fd = self._lock()
            text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "what": self.what}) + "\n"
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, text.encode(), 0)
        except BaseException:
            self.release()
            raise
        return self

    def _lock(self) -> int:
        path = self.run_dir / LOCK
        tries = 0
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                tries += 1
                if tries >= _BUSY_TRIES:
                    raise RunBusy(f"{self.run_dir}: in use by {_holder(path)}; wait for it to "
                                  "end, or stop it first") from None
                time.sleep(0.02)
                continue
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, path):
                return fd
            os.close(fd)  # its holder removed it as we locked it: lock the new one

    def release(self) -> None:
        """Removes ``.lock`` and drops the lock (nothing if not held); removes the folders
        :meth:`acquire` created if they are empty."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.run_dir / LOCK)  # while still locked: see _lock
            os.close(fd)
        for folder in self._created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def owner(run_dir: str | os.PathLike) -> Optional[str]:
    """Who holds the lock of ``run_dir`` now (``"training, pid 4242 on host"``), or ``None``.

    Reading a run that is being written is fine (every file is written whole); this says so.
    """
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(path)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    """The owner named in a lock file, on one line."""
    try:
        info = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        what, pid, host = info["what"], info["pid"], info["host"]
        if not (isinstance(pid, int) and isinstance(what, str) and isinstance(host, str)):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return f"a process that has not named itself in {path}"
    return f"{summarize(what, 60)}, pid {pid} on {summarize(host, 80)}"


def _same_file(fd: int, path: Path) -> bool:
    try:
        named, held = os.stat(path), os.fstat(fd)
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
    except FileNotFoundError:
        return False


def _make_folders(folder: Path) -> list[Path]:
    """Creates ``folder`` and its missing parents; returns those it created, deepest first."""
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    folder.mkdir(parents=True, exist_ok=True)
    return missing
