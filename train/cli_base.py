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

__all__ = ["UsageError", "OneLineParser", "one_line"]


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
