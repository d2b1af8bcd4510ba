"""``python -m landscape hessian`` and ``python -m landscape spectrum``.

``hessian CKPT --group G --top K --bottom K [--trace] [--json OUT]``: the K largest and K
smallest Hessian eigenvalues of group G's mean loss (Lanczos, each with its residual), the
saddle ratio lambda_min / lambda_max and, with --trace, a Hutch++ trace with its standard error.
The JSON (also printed when --json is not given) holds group, classes, n_samples, loss, top,
bottom, residuals (the true ||H x - theta x|| of each eigenvector), converged, reason (why not,
when not), trace, trace_stderr, ratio (null when lambda_max <= 0 or an end is not asked for),
hvps, seconds and the settings used (landscape.hessian.HessianSummary.to_json). Repeated
eigenvalues are reported with their multiplicities (block Lanczos, a block of max(top, bottom)
vectors). Lanczos stops when every residual is within --tol times ||H|| (the largest
|eigenvalue| found), never before --min_steps steps. --journal DIR keeps every product as it
comes, so that the same command run again after an interruption resumes where it stopped
(landscape.journal).

``spectrum CKPT --groups head,tail --probes P --steps S --out DIR``: stochastic Lanczos
quadrature densities of each group, written to DIR as spectrum.npz (nodes_G, weights_G, grid_G,
density_G, lengths_G), spectrum.json, spectrum.png and spectrum.html (all groups on one figure,
symmetric-log eigenvalue axis, log density axis; the HTML opens offline).

Groups: head, tail, all, or class ids (``--group 0,3,7``; in ``--groups``, whose items are
separated by commas, join the ids of one group with ``+``: ``--groups head,0+3+7``).

Parameter blocks: ``--params layer4.*,fc.*`` (fnmatch globs on the parameter names) analyses the
Hessian block of those parameters, the others fixed. ``hessian --per_layer`` sweeps every
top-level block (lambda_max, lambda_min and the Hutch++ trace of each; the JSON to --json or
printed, per_layer.png and per_layer.html into --out DIR; landscape.per_layer).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from landscape.errors import AnalysisError
from landscape.options import (AUTO_FLOAT64_MAX_PARAMS, DTYPES, MIN_STEPS, SPLITS,
                               TRACE_METHODS)
from train.options import LOSSES

__all__ = ["add_parser", "add_min_steps", "add_sweep_lanczos", "run_hessian", "run_spectrum"]


def add_min_steps(p) -> None:
    """``--min_steps``, on every command whose Lanczos finds extremes (``hessian``, ``classes``,
    ``report`` and ``demo``)."""
    p.add_argument("--min_steps", type=int, default=MIN_STEPS,
                   help=f"Lanczos steps at least, so that a value inside the cluster near 0 "
                        f"does not pass for lambda_min (landscape.eigen) [{MIN_STEPS}]")


def add_sweep_lanczos(p, steps: int, tol: float) -> None:
    """``--steps``, ``--min_steps`` and ``--tol`` of ``classes``, ``report`` and ``demo``, whose
    one cap on Lanczos steps serves the extremes and every SLQ probe (defaults: their settings
    dataclasses')."""
    p.add_argument("--steps", type=int, default=steps,
                   help=f"Lanczos steps at most for the extremes, and per SLQ probe [{steps}]")
    add_min_steps(p)
    p.add_argument("--tol", type=float, default=tol,
                   help=f"relative residual tolerance of the extreme eigenpairs [{tol:g}]")


def _common(p) -> None:
    p.add_argument("checkpoint", help="epoch_NNNN.pt, or a run folder (its newest checkpoint)")
    p.add_argument("--split", choices=SPLITS, default="train",
                   help="the group's samples, not augmented [train]")
    p.add_argument("--loss", choices=LOSSES,
                   help="per-sample loss [the run's own]")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype of the Hessian-vector products; auto: float64 up to "
                        f"{AUTO_FLOAT64_MAX_PARAMS:,} "
                        "parameters, float32 above (landscape.hessian.analysis_dtype; the "
                        "Lanczos recurrence is float64 either way) [auto]")
    p.add_argument("--batch_size", type=int,
                   help="samples per forward pass; results do not depend on it "
                        "[GPU: all, halved on out-of-memory; CPU: at most 1024]")
    p.add_argument("--seed", type=int, default=0, help="seed of start vectors and probes [0]")
    p.add_argument("--params", metavar="PATTERN[,PATTERN]",
                   help="the Hessian block of the parameters matching these globs "
                        "(e.g. layer4.*,fc.*), the others fixed [all parameters]")
    p.add_argument("--device", help="cpu, cuda or cuda:N [cuda if available]")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")


def add_parser(subparsers) -> None:
    doc = __doc__.split("\n\n")
    h = subparsers.add_parser("hessian", help="extreme eigenvalues, trace and the saddle ratio "
                                              "of a group's loss", description=doc[1])
    _common(h)
    h.add_argument("--group", default="all", help="head, tail, all or class ids 0,3,7 [all]")
    h.add_argument("--top", type=int, default=1, help="largest eigenvalues [1]")
    h.add_argument("--bottom", type=int, default=1, help="smallest (most negative) [1]")
    h.add_argument("--trace", action="store_true", help="also estimate the trace (Hutch++)")
    h.add_argument("--trace_method", choices=TRACE_METHODS, default="hutch++")
    h.add_argument("--trace_hvps", type=int, default=99, help="HVPs for the trace [99]")
    h.add_argument("--tol", type=float, default=1e-6,
                   help="Lanczos residual tolerance, relative to ||H|| [1e-6]")
    h.add_argument("--max_steps", type=int, default=300, help="Lanczos steps at most [300]")
    add_min_steps(h)
    h.add_argument("--json", metavar="OUT", help="write the result here (else print it)")
    h.add_argument("--journal", metavar="DIR",
                   help="keep every product in DIR as it comes, so that the same command run "
                        "again after an interruption resumes where it stopped; its files are "
                        "removed once the result is written (landscape.journal)")
    h.add_argument("--per_layer", action="store_true",
                   help="every top-level block's lambda_max, lambda_min and trace, the other "
                        "parameters fixed (figures with --out)")
    h.add_argument("--out", metavar="DIR", help="--per_layer: per_layer.png and per_layer.html "
                                                "here (created if missing)")
    h.set_defaults(run=run_hessian)

    s = subparsers.add_parser("spectrum", help="SLQ spectral densities of several groups (npz, "
                                               "PNG, HTML)", description=doc[2])
    _common(s)
    s.add_argument("--groups", default="head,tail",
                   help="comma-separated groups; class ids of one group joined by + [head,tail]")
    s.add_argument("--probes", type=int, default=10, help="random probes per group [10]")
    s.add_argument("--steps", type=int, default=90, help="Lanczos steps per probe [90]")
    s.add_argument("--probe_batch", type=int,
                   help="probes multiplied together in one block product [all on a CPU up "
                        "to 2,000 parameters, else 1: landscape.slq.default_probe_batch]")
    s.add_argument("--out", required=True, help="output folder (created if missing)")
    s.set_defaults(run=run_spectrum)


def _check_positive(args, *names) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise AnalysisError(f"--{name} must be >= 1, got {value}")


def _progress_bar(args, total: int, what: str):
    if args.no_progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="hvp", desc=what, file=sys.stderr, leave=False)


def run_hessian(args) -> int:
    from landscape.hessian import hessian_summary, summary_json_text
    from landscape.load import load
    from train.io import atomic_write_bytes

    _check_positive(args, "batch_size", "max_steps")
    if args.top < 0 or args.bottom < 0:
        raise AnalysisError("--top and --bottom must be >= 0")
    if not args.tol > 0:
        raise AnalysisError(f"--tol must be > 0, got {args.tol}")
    if args.min_steps < 0:
        raise AnalysisError(f"--min_steps must be >= 0, got {args.min_steps}")
    if (args.trace or args.per_layer) and args.trace_hvps < 3:
        raise AnalysisError(f"--trace_hvps must be >= 3, got {args.trace_hvps}")
    if args.json is not None:
        out = Path(args.json)
        if out.is_dir() or not out.parent.is_dir():
            raise AnalysisError(f"--json {out}: not a file in an existing folder")
    _check_per_layer(args)
    _check_journal(args)
    run = load(args.checkpoint, device=args.device)
    # Bad groups and sizes fail here, before a progress bar is drawn: one line on stderr.
    run.group_size(args.group, args.split)
    if args.per_layer:
        return _run_per_layer(args, run)
    n_params = _selected_count(run, args.params)
    for name in ("top", "bottom"):
        if getattr(args, name) > n_params:
            raise AnalysisError(f"--{name} {getattr(args, name)} is larger than the parameter "
                                f"count {n_params}")
    # Lanczos, one product per reported eigenvector (its true residual), the trace.
    total = args.max_steps + args.top + args.bottom + (args.trace_hvps if args.trace else 0)
    bar = _progress_bar(args, total, f"hessian {args.group}")
    try:
        summary = hessian_summary(
            run, args.group, top=args.top, bottom=args.bottom, trace=args.trace, seed=args.seed,
            split=args.split, loss=args.loss, batch_size=args.batch_size,
            dtype=args.dtype, tol=args.tol, max_steps=args.max_steps, min_steps=args.min_steps,
            trace_method=args.trace_method, trace_hvps=args.trace_hvps,
            progress=bar.update if bar else None, params=args.params,
            planned=(lambda hvps: _retotal(bar, hvps)) if bar else None,
            journal=args.journal)
    finally:
        if bar is not None:
            bar.close()
    from landscape._distributed import is_writer

    if not is_writer():  # under torchrun, rank 0 reports and writes
        return 0
    text = summary_json_text(summary) + "\n"
    if args.json is None:
        sys.stdout.write(text)
    else:
        atomic_write_bytes(args.json, text.encode())
        how = summary.provenance
        ratio = "n/a" if math.isnan(summary.ratio) else f"{summary.ratio:.4g}"
        print(f"{how.group}: lambda_max {summary.top[0] if summary.top else math.nan:.6g}"
              f", lambda_min {summary.bottom[0] if summary.bottom else math.nan:.6g}, "
              f"ratio {ratio}, converged {summary.converged}, {how.hvps} HVPs, "
              f"{how.seconds:.1f} s -> {args.json}")
    if args.journal is not None:  # the result is written: the products have done their work
        from landscape.journal import remove

        remove(args.journal)
    if not summary.converged:
        print(f"warning: not converged: {summary.eigen.reason}", file=sys.stderr)
    return 0


def _retotal(bar, hvps: int) -> None:
    """The bar's total becomes the HVPs really planned once Lanczos has stopped."""
    bar.total = hvps
    bar.refresh()


def _selected_count(run, params) -> int:
    """The size of the Hessian block ``--params`` selects (a bad or empty match: one line)."""
    from landscape.layout import ParamLayout

    layout = ParamLayout.of(run.model)
    return (layout if params is None else layout.select(params)).n


def _check_per_layer(args) -> None:
    if args.per_layer and args.params is not None:
        raise AnalysisError("--per_layer sweeps every block; drop --params (or --per_layer)")
    if args.out is not None and not args.per_layer:
        raise AnalysisError("--out is only used with --per_layer")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise AnalysisError(f"--out {args.out}: exists and is not a folder")


def _check_journal(args) -> None:
    if args.journal is None:
        return
    if args.per_layer:
        raise AnalysisError("--journal keeps one Lanczos run; drop it with --per_layer")
    if Path(args.journal).exists() and not Path(args.journal).is_dir():
        raise AnalysisError(f"--journal {args.journal}: exists and is not a folder")


def _run_per_layer(args, run) -> int:
    """``hessian --per_layer``: the sweep of :mod:`landscape.per_layer`, JSON and figures."""
    import json

    from landscape._distributed import is_writer
    from landscape.hessian import analysis_dtype
    from landscape.layout import ParamLayout
    from landscape.per_layer import per_layer_sweep, write_per_layer_figures
    from train.io import atomic_write_bytes

    blocks = len(ParamLayout.of(run.model).blocks())
    bar = _progress_bar(args, blocks * (args.max_steps + 2 + args.trace_hvps), "per layer")
    try:
        sweep = per_layer_sweep(run, args.group, seed=args.seed, split=args.split,
                                loss=args.loss, batch_size=args.batch_size,
                                dtype=analysis_dtype(args.dtype, _selected_count(run, None)),
                                tol=args.tol, max_steps=args.max_steps,
                                min_steps=args.min_steps, trace_hvps=args.trace_hvps,
                                progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    if not is_writer():  # under torchrun, rank 0 reports and writes
        return 0
    lines = [f"{b.block}: {b.n_params} parameters, lambda_max {b.lambda_max:.6g}, "
             f"lambda_min {b.lambda_min:.6g}, trace {b.trace:.6g}" for b in sweep.blocks]
    text = json.dumps(sweep.to_json(), indent=2) + "\n"
    if args.json is not None:  # the file, and a line a block on stdout
        atomic_write_bytes(args.json, text.encode())
        text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out is not None:
        title = f"{run.run_dir.name} epoch {run.epoch}: {sweep.group} loss, Hessian blocks"
        written = write_per_layer_figures(sweep, args.out, title)
        print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    if not all(b.converged for b in sweep.blocks):
        print("warning: not converged: " + ", ".join(b.block for b in sweep.blocks
                                                      if not b.converged), file=sys.stderr)
    return 0


def _groups(text: str) -> list[str]:
    groups = [g.strip().replace("+", ",") for g in text.split(",")]
    if not groups or any(not g for g in groups):
        raise AnalysisError(f"--groups {text!r}: empty group name (use head,tail or 0+3,7)")
    if len(set(groups)) != len(groups):
        raise AnalysisError(f"--groups {text!r}: a group is named twice")
    return groups


def run_spectrum(args) -> int:
    from landscape.hessian import analysis_dtype, save_spectra, spectral_densities
    from landscape.load import load

    _check_positive(args, "batch_size", "probes", "steps", "probe_batch")
    groups = _groups(args.groups)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"--out {out}: exists and is not a folder")
    run = load(args.checkpoint, device=args.device)
    for group in groups:  # fail on a bad group before a progress bar is drawn
        run.group_size(group, args.split)
    _selected_count(run, args.params)
    bar = _progress_bar(args, len(groups) * args.probes * args.steps, "spectrum")
    try:
        densities = spectral_densities(
            run, groups, probes=args.probes, steps=args.steps, seed=args.seed, split=args.split,
            loss=args.loss, batch_size=args.batch_size, dtype=args.dtype,
            probe_batch=args.probe_batch, progress=bar.update if bar else None,
            params=args.params)
    finally:
        if bar is not None:
            bar.close()
    meta = {"checkpoint": str(run.path), "epoch": run.epoch, "split": args.split,
            "loss": args.loss or run.config.loss, "seed": args.seed,
            "dtype": str(analysis_dtype(args.dtype, _selected_count(run, args.params)))[6:],
            "probes": args.probes, "steps": args.steps, "params": args.params,
            "classes": {label: run.classes(label) for label in densities}}
    title = f"{run.run_dir.name} epoch {run.epoch}: Hessian spectral density ({args.split})"
    from landscape._distributed import is_writer

    if not is_writer():  # under torchrun, rank 0 writes
        return 0
    written = save_spectra(densities, out, meta=meta, title=title)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0
