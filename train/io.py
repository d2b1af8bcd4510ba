r"""Files that are complete on disk or absent, and error text that fits on one line.

What every writer of this project uses (the trainer's run folder, every analysis output):

* :func:`atomic_writer` and the ``atomic_write_*`` helpers write a temporary file in the same
  folder (``.NAME.XXXXXXXX.tmp``, see :data:`TEMP_RE`), flush, fsync and rename it, so a file
  is either the old one or the new one, never half-written. A kill can leave such a temporary
  file behind; readers ignore it.
* :func:`append_line` appends one JSON line whole (a short write is undone).
* :func:`summarize` and :func:`one_line` turn foreign text (an exception, a path) into one line.

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> atomic_write_json(folder / "result.json", {"x": 1})
    >>> json.loads((folder / "result.json").read_text())
    {'x': 1}
    >>> summarize("line one\nline two\x1b[31m red")
    'line one line two red'
    >>> one_line("a\nb")
    'a\\nb'
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["summarize", "one_line", "atomic_writer", "atomic_write_bytes", "atomic_write_text",
           "atomic_write_json", "append_line", "write_lines", "TEMP_RE"]

# tempfile.mkstemp(prefix=".NAME.", suffix=".tmp"): 8 random characters from [a-z0-9_].
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


def summarize(text: object, limit: int = 300) -> str:
    """``text`` (an error, say) on one line: no control characters (ANSI colours, newlines),
    whitespace collapsed, at most ``limit`` characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(text))
    text = " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(message: str) -> str:
    """``message`` on one line, nothing dropped: a path may hold a newline or a carriage return,
    which are shown escaped."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


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
