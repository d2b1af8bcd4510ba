"""What both command lines (``python -m train`` and ``python -m landscape``) share: bad input
is one line on stderr, never argparse's usage block or a traceback.

Example:
    >>> parser = OneLineParser(prog="demo")
    >>> _ = parser.add_argument("--rate", type=float)
    >>> parser.parse_args(["--rate", "-1e-05"]).rate
    -1e-05
    >>> parser.parse_args(["--rate", "fast"])
    Traceback (most recent call last):
    ...
    train.cli_base.UsageError: demo: argument --rate: invalid float value: 'fast'
"""

from __future__ import annotations

import argparse
import re

from train.io import one_line

__all__ = ["UsageError", "OneLineParser", "one_line", "add_threads", "set_threads", "plain"]


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`UsageError` instead of printing usage."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Python's argparse reads "-1e-05" and "-inf" as options, not as negative values.
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan|infinity)$", re.IGNORECASE)

    def error(self, message: str):  # argparse prints usage + message; we want one line
        raise UsageError(f"{self.prog}: {message}")


def add_threads(parser: argparse.ArgumentParser, default: str = "torch's default") -> None:
    """``--threads N`` (every command has it): torch's intra-op CPU threads. On a loaded or
    small machine one thread can be many times faster than the default (BENCHMARKS.md)."""
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch intra-op CPU threads (torch.set_num_threads) [{default}]")


def set_threads(threads) -> None:
    """Applies ``--threads`` (``None``: leave torch's setting alone).

    Raises:
        UsageError: fewer than 1 thread.
    """
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"--threads must be an integer >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def plain(text):
    """Help text from a docstring without its reStructuredText: ``code`` and :role:`name`
    become code and name, a literal block's ``::`` a colon (``--help`` is read as plain text).

    Example:
        >>> plain("``hessian CKPT``: see :func:`landscape.load`. Examples::")
        'hessian CKPT: see landscape.load. Examples:'
    """
    if text is None:
        return None
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return re.sub(r"::(\s|$)", r":\1", text)
