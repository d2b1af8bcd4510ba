"""Moved to :mod:`train.cli_base`; these names stay importable from here for now."""

from train.cli_base import OneLineParser, UsageError, one_line  # noqa: F401
