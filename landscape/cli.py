"""``python -m landscape``: analyse training checkpoints per class group.

Subcommands (each lives in its own module, which provides ``add_parser(subparsers)`` and
``run(args) -> int``)::

    hessian   extreme eigenvalues, trace and the saddle ratio of a group's loss
    spectrum  Lanczos spectral densities (SLQ) of several groups, as npz, PNG and HTML
    surface   1-D / 2-D loss and accuracy surfaces along chosen directions
    classes   per-class extremes, trace and density against the class's training count
    report    the saddle report across runs and epochs
    demo      train the four optimizers on digits-LT, then write the report

Bad input, and a file-system error (a read-only or full folder, an ``--out`` that is a file),
get one line on stderr naming the path and exit status 2, and no partial output file; Ctrl-C
gets one line and exit status 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from train.cli_base import OneLineParser, UsageError, add_threads, one_line, plain, set_threads

__all__ = ["main", "UsageError", "SUBCOMMANDS"]

# name -> module implementing it; a module that is not there yet is skipped.
SUBCOMMANDS = {
    "hessian": "landscape._cli_hessian",
    "spectrum": "landscape._cli_hessian",
    "surface": "landscape._cli_surface",
    "classes": "landscape._cli_classes",
    "report": "landscape._cli_report",
    "demo": "landscape._cli_report",
}
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m landscape",
                           description=plain(__doc__.split("\n\n")[0]))
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for module_name in dict.fromkeys(SUBCOMMANDS.values()):  # each module once, in order
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue
            raise
        module.add_parser(subparsers)
    for sub in subparsers.choices.values():  # --threads on every subcommand
        if not any("--threads" in action.option_strings for action in sub._actions):
            add_threads(sub)
        sub.description = plain(sub.description)  # the modules' docstrings, without RST
        for action in sub._actions:
            action.help = plain(action.help)
    return parser


def _distributed_setup(args) -> None:
    """Under torchrun, ``hessian``, ``spectrum`` and ``surface`` share their work between the
    ranks (``landscape/_distributed.py``): process group, this rank's device, progress bars and
    files from rank 0 only."""
    if args.command not in ("hessian", "spectrum", "surface", "classes"):
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


SEED_LIMIT = 2 ** 63  # torch generators take 64 bits; the restarts and probes use seed + 1


def _check_seeds(args) -> None:
    """``--seed`` (and the demo's ``--train_seed``) of every command: 0 <= seed < 2**63."""
    for name in ("seed", "train_seed"):
        value = getattr(args, name, None)
        if value is not None and not 0 <= value < SEED_LIMIT:
            raise UsageError(f"--{name} must be in 0 .. 2**63 - 1, got {value}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from landscape.errors import USER_ERRORS

    try:
        args = build_parser().parse_args(argv)
        _check_seeds(args)
        set_threads(args.threads)  # demo: its own default of 1 (landscape/_cli_report.py)
        _distributed_setup(args)
        return int(args.run(args) or 0)
    except (UsageError, *USER_ERRORS) as error:
        print(f"error: {one_line(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # Every output is written whole (train.io), so an interrupt leaves none half-written.
        print("interrupted; no output was left half-written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as error:  # a read-only or full folder, an --out that is a file, ...
        where = f"{error.filename}: " if error.filename is not None else ""
        print(f"error: {where}{one_line(error.strerror or str(error))}", file=sys.stderr)
        return EXIT_USAGE
