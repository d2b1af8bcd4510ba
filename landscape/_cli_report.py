"""``python -m landscape report`` and ``python -m landscape demo``.

``report RUN_DIR [RUN_DIR ...] --out DIR`` compares runs of different optimizers: head and tail
``lambda_max``, ``lambda_min`` and ``lambda_min / lambda_max`` at every chosen checkpoint
(cached in each ``RUN_DIR/hessian/``), written as ``table.csv``, ``table.md``, ``report.md``,
``report.json``, ``indicators.png/.html`` (over epochs, SSE-SAM's stage switch marked) and
``densities.png/.html`` (head vs tail spectral densities of each run's final checkpoint).

``demo [--out checkpoints/demo] [--epochs N]`` trains SGD, SAM, ImbSAM and SSE-SAM on the
embedded digits-LT (imbalance 20, lr 0.1, CPU, a few minutes in all) into ``OUT/OPT/``, then
writes the report to ``OUT/report/``. Rerunning it resumes unfinished runs and reuses the
cached Hessian results.
"""

from __future__ import annotations

import sys
from pathlib import Path

from landscape._cli_hessian import add_sweep_lanczos
from landscape.errors import AnalysisError
from landscape.options import AUTO_FLOAT64_MAX_PARAMS, DTYPES, SPLITS
from landscape.report.settings import DEFAULT_SETTINGS
from train.cli_base import add_threads, set_threads

DEMO_OPTIMIZERS = ("sgd", "sam", "imbsam", "ssesam")
# The embedded default: digits-LT at imbalance 20 (counts 120 ... 6; head = 4 classes with
# >= 40 images, tail = 6), lr 0.1; the other settings are the seed code's defaults.
DEMO_TRAINING = {"dataset": "digits", "imb_factor": 20.0, "lr": 0.1}


def _add_report_options(p, threads: str = "torch's default") -> None:
    d = DEFAULT_SETTINGS  # ReportSettings' defaults, declared there
    p.add_argument("--every", type=int, default=d.every,
                   help=f"use checkpoints whose epoch is a multiple of K (and the last) "
                        f"[{d.every}]")
    add_sweep_lanczos(p, d.steps, d.tol)
    p.add_argument("--probes", type=int, default=d.probes,
                   help=f"SLQ probes for the densities [{d.probes}]")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"seed of Lanczos and of the probes [{d.seed}]")
    p.add_argument("--split", choices=SPLITS, default=d.split,
                   help=f"the groups' samples [{d.split}]")
    p.add_argument("--groups", default=",".join(d.groups),
                   help=f"groups compared [{','.join(d.groups)}]")
    p.add_argument("--no_densities", action="store_true", help="skip the SLQ densities")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype,
                   help="dtype of the Hessian-vector products; auto: float64 up to "
                        f"{AUTO_FLOAT64_MAX_PARAMS:,} parameters, float32 above [{d.dtype}]")
    p.add_argument("--classes", default="",
                   help="also the per-class sweep of the final checkpoints: all, or class ids "
                        "0,3,7 [none]")
    p.add_argument("--no_cache", action="store_true",
                   help="neither read nor write RUN_DIR/hessian/ caches")
    p.add_argument("--device", help="cpu, cuda or cuda:N [cuda if available]")
    add_threads(p, threads)
    p.add_argument("--no_progress", action="store_true", help="no progress lines")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="the saddle report across runs and epochs",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders to compare")
    p.add_argument("--out", required=True, help="output folder")
    _add_report_options(p)
    p.set_defaults(run=run_report)

    d = subparsers.add_parser("demo", help="train the four optimizers on digits-LT, then write "
                                           "the report", description=__doc__.split("\n\n")[2])
    d.add_argument("--out", default="checkpoints/demo", help="[checkpoints/demo]")
    d.add_argument("--epochs", type=int, default=60, help="[60]")
    d.add_argument("--save_every", type=int, default=6, help="checkpoint every N epochs [6]")
    d.add_argument("--train_seed", type=int, help="training seed [the seed code's, 9826]")
    _add_report_options(d, threads="1")
    d.set_defaults(run=run_demo)


def _settings(args):
    from landscape.report import ReportSettings

    groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
    return ReportSettings(every=args.every, steps=args.steps, min_steps=args.min_steps,
                          probes=args.probes, seed=args.seed, tol=args.tol, split=args.split,
                          groups=groups, densities=not args.no_densities, classes=args.classes,
                          dtype=args.dtype)


def _set_threads(args, default=None) -> None:
    """The command's CPU threads. The demo's default is 1: its tiny operations lose more to
    thread synchronisation than they gain (BENCHMARKS.md, "Hessian analysis")."""
    set_threads(args.threads if args.threads is not None else default)


def _runs_only(paths) -> list[Path]:
    """``paths`` less the folders that are not runs (no ``config.json``), which are named in one
    line, so that ``report checkpoints/demo/*`` passes over ``report/``. A path that is not a
    folder stays, for the report to refuse (a mistyped run is an error, not a skip)."""
    runs, skipped = [], []
    for path in map(Path, paths):
        not_run = path.is_dir() and not (path / "config.json").exists()
        (skipped if not_run else runs).append(str(path))
    if not runs:
        raise AnalysisError(f"no run folder (one with a config.json) among {', '.join(skipped)}")
    if skipped:
        print(f"skipping {len(skipped)} folder(s) that are not runs (no config.json): "
              f"{', '.join(skipped)}", file=sys.stderr)
    return [Path(p) for p in runs]


def _progress(args):
    if args.no_progress:
        return None
    return lambda message: print(f"  {message}", file=sys.stderr, flush=True)


def _write(report, out: Path) -> None:
    from landscape.report import write_report

    written = write_report(report, out)
    print(report.to_markdown(), end="")
    print(f"{len(written)} files in {out}")


def run_report(args) -> int:
    from landscape.report import build_report

    from landscape.report.build import training_notices

    settings = _settings(args)
    runs = _runs_only(args.run_dirs)
    for notice in training_notices(runs):  # a run being trained is read as it stands
        print(notice, file=sys.stderr)
    report = build_report(runs, settings, device=args.device, progress=_progress(args),
                          cache=not args.no_cache)
    _write(report, Path(args.out))
    return 0


def run_demo(args) -> int:
    from landscape.report import build_report
    from train.config import Config
    from train.loop import train

    settings = _settings(args)  # bad report options fail before any training
    if args.epochs < 1:
        raise AnalysisError(f"--epochs must be >= 1, got {args.epochs}")
    if args.save_every < 1:
        raise AnalysisError(f"--save_every must be >= 1, got {args.save_every}")
    _set_threads(args, default=1)
    extra = {} if args.train_seed is None else {"seed": args.train_seed}
    device = {"device": args.device} if args.device else {}
    configs = {opt: Config(opt=opt, epochs=args.epochs, save_every=args.save_every,
                           **DEMO_TRAINING, **extra, **device) for opt in DEMO_OPTIMIZERS}
    out = Path(args.out)
    progress = _progress(args)
    for opt, config in configs.items():
        if progress is not None:
            progress(f"training {opt} ({config.epochs} epochs) into {out / opt}")
        # resume=True: a finished run is kept as it is, an interrupted one continues.
        train(config, out / opt, resume=True, progress=False,
              log=lambda message: print(message, file=sys.stderr))
    report = build_report([out / opt for opt in DEMO_OPTIMIZERS], settings,
                          device=args.device, progress=progress, cache=not args.no_cache)
    _write(report, out / "report")
    return 0
