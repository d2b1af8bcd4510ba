"""What both command lines (``python -m train`` and ``python -m landscape``) share: bad input
is one line on stderr, never argparse's usage block or a traceback."""

from __future__ import annotations

import argparse
import re

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


def one_line(message: str) -> str:
    """``message`` on one line: a path may hold a newline or a carriage return."""
    return message.replace("\r", "\\r").replace("\n", "\\n")
