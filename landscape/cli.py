"""``python -m landscape``: analyse training checkpoints per class group.

Subcommands (each lives in its own module, which provides ``add_parser(subparsers)`` and
``run(args) -> int``)::

    hessian   extreme eigenvalues, trace and the saddle ratio of a group's loss
    spectrum  Lanczos spectral densities (SLQ) of several groups, as npz, PNG and HTML
    surface   1-D / 2-D loss and accuracy surfaces along chosen directions
    report    the saddle report across runs and epochs
    demo      train the four optimizers on digits-LT, then write the report

Bad input gets one line on stderr and exit status 2, and no partial output file.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import Optional, Sequence

__all__ = ["main", "UsageError", "SUBCOMMANDS"]

# name -> module implementing it; a module that is not there yet is skipped.
SUBCOMMANDS = {
    "hessian": "landscape._cli_hessian",
    "spectrum": "landscape._cli_hessian",
    "surface": "landscape._cli_surface",
    "report": "landscape._cli_report",
    "demo": "landscape._cli_report",
}
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Python's argparse reads "-1e-05" and "-inf" as options, not as negative values.
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan|infinity)$", re.IGNORECASE)

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m landscape", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    seen = set()
    for module_name in dict.fromkeys(SUBCOMMANDS.values()):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue
            raise
        if module_name not in seen:
            module.add_parser(subparsers)
            seen.add(module_name)
    return parser


def _distributed_setup(args) -> None:
    """Under torchrun, ``hessian``, ``spectrum`` and ``surface`` share their work between the
    ranks (``landscape/_distributed.py``): process group, this rank's device, progress bars and
    files from rank 0 only."""
    if args.command not in ("hessian", "spectrum", "surface"):
        return
    import atexit

    from landscape import _distributed
    from landscape.errors import AnalysisError
    from train.distributed import DistributedError, cleanup

    try:
        device = _distributed.setup(getattr(args, "device", None))
    except DistributedError as error:
        raise AnalysisError(str(error)) from None
    if device is not None:
        atexit.register(cleanup)
        args.device = device
        args.no_progress = args.no_progress or not _distributed.is_writer()


def main(argv: Optional[Sequence[str]] = None) -> int:
    from landscape.errors import USER_ERRORS

    try:
        args = build_parser().parse_args(argv)
        _distributed_setup(args)
        return int(args.run(args) or 0)
    except (UsageError, *USER_ERRORS) as error:
        message = str(error).replace("\r", "\\r").replace("\n", "\\n")  # one line, always
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
