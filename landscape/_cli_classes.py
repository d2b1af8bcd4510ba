"""``python -m landscape classes``: the per-class saddle sweep of one checkpoint.

``classes CKPT [--classes all|0,3,7] [--json OUT] [--out DIR]`` computes, for each class, the
Hessian of the class's mean loss: lambda_max, lambda_min, their ratio lambda_min / lambda_max,
the Hutch++ trace with its standard error, the sample count and, with --density, the SLQ
spectral density (landscape.classes). Results are cached in RUN_DIR/hessian/ (a rerun with the
same settings computes nothing). --json writes the results (else they are printed); --out writes
classes.png and classes.html (each quantity against the class's training count, log axis, head
and tail marked, the eta threshold drawn), and with --density class_densities.png/.html.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from landscape._cli_hessian import add_sweep_lanczos
from landscape.classes import SweepSettings
from landscape.errors import AnalysisError
from landscape.options import AUTO_FLOAT64_MAX_PARAMS, DTYPES, SPLITS

__all__ = ["add_parser", "run_classes"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("classes", help="per-class Hessian extremes, trace and density "
                                              "against the class's training count",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("checkpoint", help="epoch_NNNN.pt, or a run folder (its newest checkpoint)")
    p.add_argument("--classes", default="all", help="all, or class ids 0,3,7 [all]")
    d = SweepSettings()  # its defaults, declared there
    add_sweep_lanczos(p, d.steps, d.tol)
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"seed of Lanczos, the probes and the subsample [{d.seed}]")
    p.add_argument("--samples", type=int, help="at most N samples per class [all]")
    p.add_argument("--split", choices=SPLITS, default=d.split,
                   help=f"the classes' samples [{d.split}]")
    p.add_argument("--trace_hvps", type=int, default=d.trace_hvps,
                   help=f"HVPs per Hutch++ trace [{d.trace_hvps}]")
    p.add_argument("--density", action="store_true", help="also the SLQ spectral densities")
    p.add_argument("--probes", type=int, default=d.probes,
                   help=f"SLQ probes with --density [{d.probes}]")
    p.add_argument("--params", metavar="PATTERN[,PATTERN]",
                   help="the Hessian block of the parameters matching these globs (e.g. "
                        "layer4.*,fc.*), the others fixed [all parameters]")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype,
                   help=f"dtype of the Hessian-vector products; auto: float64 up to "
                        f"{AUTO_FLOAT64_MAX_PARAMS:,} parameters, float32 above [{d.dtype}]")
    p.add_argument("--batch_size", type=int, help="samples per forward pass [as hessian]")
    p.add_argument("--no_cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--json", metavar="OUT", help="write the results here (else print them)")
    p.add_argument("--out", metavar="DIR", help="write the figures here (created if missing)")
    p.add_argument("--device", help="cpu, cuda or cuda:N [cuda if available]")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_classes)


def _check_outputs(args) -> None:
    if args.json is not None:
        out = Path(args.json)
        if out.is_dir() or not out.parent.is_dir():
            raise AnalysisError(f"--json {out}: not a file in an existing folder")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise AnalysisError(f"--out {args.out}: exists and is not a folder")
    if args.batch_size is not None and args.batch_size < 1:
        raise AnalysisError(f"--batch_size must be >= 1, got {args.batch_size}")


def run_classes(args) -> int:
    from landscape import _distributed, plots
    from landscape.classes import class_sweep, parse_classes
    from landscape.load import load
    from train.io import atomic_write_bytes
    from train.options import OPTIMIZER_LABELS

    _check_outputs(args)
    SweepSettings(steps=args.steps, tol=args.tol, min_steps=args.min_steps, seed=args.seed,
                  samples=args.samples, trace_hvps=args.trace_hvps, probes=args.probes,
                  params=args.params, dtype=args.dtype)  # bad numbers: one line
    run = load(args.checkpoint, device=args.device)
    ids = parse_classes(run, args.classes)
    if args.params is not None:  # matches nothing: one line before a progress bar
        from landscape.layout import ParamLayout

        ParamLayout.of(run.model).select(args.params)
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        per_class = args.steps + args.trace_hvps + (args.probes * args.steps if args.density
                                                    else 0)
        bar = tqdm(total=per_class * len(ids), unit="hvp", desc="classes", file=sys.stderr,
                   leave=False)  # at most: Lanczos may stop early, cached classes cost none
    try:
        sweep = class_sweep(run, ids, steps=args.steps, tol=args.tol,
                            min_steps=args.min_steps, seed=args.seed,
                            samples=args.samples, split=args.split, trace_hvps=args.trace_hvps,
                            density=args.density, probes=args.probes, cache=not args.no_cache,
                            batch_size=args.batch_size, progress=bar.update if bar else None,
                            params=args.params, dtype=args.dtype)
    finally:
        if bar is not None:
            bar.close()
    if not _distributed.is_writer():  # under torchrun, rank 0 writes
        return 0
    text = json.dumps(sweep.to_json(), indent=2) + "\n"
    if args.json is None:
        sys.stdout.write(text)
    else:
        atomic_write_bytes(args.json, text.encode())
        print(sweep.to_markdown(), end="")
    if args.out is not None:
        label = f"{run.run_dir.name} ({OPTIMIZER_LABELS.get(run.config.opt, run.config.opt)})"
        written = plots.write_class_figures({label: sweep}, args.out,
                                            f"{label}, epoch {run.epoch}")
        print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0
