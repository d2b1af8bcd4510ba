"""``python -m landscape surface``: loss and accuracy surfaces of class groups.

Writes into ``--out``: ``surface.npz`` (the data, rewritten as rows finish, so a rerun of the
same command resumes an interrupted one), and the figures: for a 2-D surface
``GROUP_loss_contour.png`` and ``GROUP_loss_3d.png`` per group, for a 1-D one
``loss_line.png`` and ``accuracy_line.png``, and ``surface_loss.html`` /
``surface_accuracy.html`` (interactive plotly, opens offline). The contours' bands:
``--levels``, ``--vmin``/``--vmax`` (in loss units) and ``--scale log|linear``.

Directions can be reused: ``--save_directions PATH`` writes them to a directions file, and
``--directions file:PATH`` reads one back, or the directions of a ``surface.npz`` (the format is
in landscape/surface_files.py). ``--trajectory`` places the run's checkpoints on the plane of any
directions (least squares; PCA directions always have it) and draws the path on the contours;
the coordinates are stored in ``surface.npz``'s metadata (``request.trajectory``). ``--vtk PATH``
also writes the surface as a legacy VTK structured grid for ParaView (z = the loss of ``all``,
every group's loss and accuracy as point data).

Examples::

    python -m landscape surface checkpoints/demo/ssesam --directions random --grid 51 --out surf/
    python -m landscape surface RUN/epoch_0060.pt --directions eigen --eigen_group tail
    python -m landscape surface RUN --directions pca            # with the trajectory drawn
    python -m landscape surface RUN/epoch_0000.pt --directions interp --to RUN/epoch_0060.pt
    python -m landscape surface RUN --save_directions dirs.npz --trajectory --vtk surf.vtk
    python -m landscape surface RUN/epoch_0030.pt --directions file:dirs.npz --levels 20 \\
        --vmin 0.01 --vmax 10 --loss LDAM
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from landscape.errors import AnalysisError
from landscape.options import DTYPES, IGNORE, NORMALIZATIONS, ONE_D, SCALES, SPLITS, SURFACE_METHODS
from train.options import LOSSES

DIRECTIONS = ("random", "eigen", "pca", "interp")


def _directions_arg(text: str) -> str:
    """``--directions``: one of :data:`DIRECTIONS`, or ``file:PATH``."""
    if text in DIRECTIONS or (text.startswith("file:") and len(text) > len("file:")):
        return text
    raise argparse.ArgumentTypeError(f"choose from {', '.join(DIRECTIONS)} or file:PATH, "
                                     f"got {text!r}")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "surface", help="1-D / 2-D loss and accuracy surfaces along chosen directions",
        description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="epoch_NNNN.pt, or a run folder (its newest checkpoint)")
    p.add_argument("--directions", type=_directions_arg, default="random",
                   metavar="{random,eigen,pca,interp,file:PATH}",
                   help="random (filter-normalised), eigen (top and bottom Hessian "
                        "eigenvectors), pca (of the run's checkpoints), interp (line to --to), "
                        "file:PATH (saved by --save_directions, or a surface.npz's) [random]")
    p.add_argument("--save_directions", metavar="PATH",
                   help="also write the directions to PATH (.npz) for --directions file:PATH")
    p.add_argument("--trajectory", action="store_true",
                   help="project the run's checkpoints onto the directions and draw the path "
                        "[pca: always]")
    p.add_argument("--dim", type=int, choices=(1, 2),
                   help="1-D line or 2-D plane [2; 1 for interp]")
    p.add_argument("--groups", default="head,tail",
                   help="comma-separated groups (head, tail, all); 'all' is always added "
                        "[head,tail]")
    p.add_argument("--grid", type=int, default=51, help="points per axis [51]")
    p.add_argument("--range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="coordinates of both axes [-1 1; pca: covers the trajectory; "
                        "interp: about -0.5 1.5, with 0 and 1 on the grid]")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random directions / of Lanczos's start vector [0]")
    p.add_argument("--normalization", choices=NORMALIZATIONS, default="filter",
                   help="of random directions [filter]")
    p.add_argument("--one_d", choices=ONE_D, default="zero",
                   help="1-D parameters (biases, BatchNorm) of random directions [zero]")
    p.add_argument("--eigen_group", help="group whose Hessian gives eigen directions "
                                         "[first of --groups]")
    p.add_argument("--max_steps", type=int, help="Lanczos steps at most (eigen)")
    p.add_argument("--tol", type=float, help="Lanczos relative residual tolerance (eigen)")
    p.add_argument("--to", metavar="CKPT", help="end checkpoint of --directions interp")
    p.add_argument("--params", metavar="PATTERN[,PATTERN]",
                   help="random / eigen: move only the parameters matching these globs (e.g. "
                        "layer4.*,fc.*; eigen: that Hessian block's eigenvectors) [all]")
    p.add_argument("--no_states", action="store_true",
                   help="interp: keep the start's BatchNorm running statistics all along the "
                        "line [moved with the weights, so both ends are the checkpoints]")
    p.add_argument("--ignore", choices=IGNORE,
                   help="pca: leave out 1-D parameters (biases, BatchNorm scales and shifts)")
    p.add_argument("--split", choices=SPLITS, default="train",
                   help="evaluation samples [train]")
    p.add_argument("--loss", choices=LOSSES, help="per-sample loss [the run's own]")
    p.add_argument("--levels", type=int, default=30, help="filled contour bands [30]")
    p.add_argument("--vmin", type=float, help="lowest contour value, in loss units "
                                              "[the surface's]")
    p.add_argument("--vmax", type=float, help="highest contour value [the surface's]")
    p.add_argument("--scale", choices=SCALES, default="log",
                   help="of the loss contours [log]")
    p.add_argument("--vtk", metavar="PATH", help="also write the 2-D surface as a legacy VTK "
                                                 "structured grid (ParaView)")
    p.add_argument("--dtype", choices=DTYPES[1:], default="float32")
    p.add_argument("--method", choices=SURFACE_METHODS, default="loop",
                   help="evaluation of grid points (see landscape/surface.py) [loop]")
    p.add_argument("--batch_size", type=int, help="samples per forward pass [all, max 4096]")
    p.add_argument("--save_every", type=int, help="grid points between saves [one row]")
    p.add_argument("--device", help="cpu, cuda or cuda:N [cuda if available]")
    p.add_argument("--out", help="output folder [RUN/surface/epoch_NNNN_DIRECTIONS_sSEED]")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a surface.npz made with other settings")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _check_args(args) -> None:
    """Everything that can be checked before loading anything."""
    if args.grid < 2:
        raise AnalysisError(f"--grid must be at least 2, got {args.grid}")
    if args.range is not None and not (np.all(np.isfinite(args.range))
                                       and args.range[0] < args.range[1]):
        raise AnalysisError(f"--range needs finite LOW < HIGH, got {args.range[0]} {args.range[1]}")
    if args.directions == "interp":
        if args.to is None:
            raise AnalysisError("--directions interp needs --to CKPT (the end checkpoint)")
        if args.dim == 2:
            raise AnalysisError("--directions interp gives a 1-D line; drop --dim 2")
    elif args.to is not None or args.no_states:
        raise AnalysisError("--to and --no_states are only used with --directions interp")
    if args.ignore is not None and args.directions != "pca":
        raise AnalysisError("--ignore is only used with --directions pca")
    if args.params is not None and args.directions not in ("random", "eigen"):
        raise AnalysisError("--params is only used with --directions random or eigen")
    if args.directions == "pca" and args.dim == 1:
        raise AnalysisError("--directions pca gives a 2-D plane; drop --dim 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise AnalysisError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.save_every is not None and args.save_every < 1:
        raise AnalysisError(f"--save_every must be >= 1, got {args.save_every}")
    if args.max_steps is not None and args.max_steps < 1:
        raise AnalysisError(f"--max_steps must be >= 1, got {args.max_steps}")
    _check_figure_args(args)
    _check_files(args)


def _check_figure_args(args) -> None:
    if args.levels < 2:
        raise AnalysisError(f"--levels must be at least 2, got {args.levels}")
    for name in ("vmin", "vmax"):
        value = getattr(args, name)
        if value is not None and not np.isfinite(value):
            raise AnalysisError(f"--{name} must be finite, got {value}")
        if value is not None and value <= 0 and args.scale == "log":
            raise AnalysisError(f"--{name} {value:g} is not positive: a log scale needs "
                                "--scale linear")
    if args.vmin is not None and args.vmax is not None and not args.vmin < args.vmax:
        raise AnalysisError(f"--vmin must be below --vmax, got {args.vmin:g} and {args.vmax:g}")


def _check_files(args) -> None:
    """The files named by the options: a direction file to read, outputs in existing folders."""
    if args.directions.startswith("file:") and not Path(args.directions[5:]).is_file():
        raise AnalysisError(f"--directions {args.directions}: no such file")
    for name in ("save_directions", "vtk"):
        value = getattr(args, name)
        if value is not None and (Path(value).is_dir() or not Path(value).parent.is_dir()):
            raise AnalysisError(f"--{name} {value}: not a file in an existing folder")
    if args.vtk is not None and (args.dim == 1 or args.directions == "interp"):
        raise AnalysisError("--vtk writes a 2-D surface; drop --dim 1")
    if args.trajectory and (args.dim == 1 or args.directions == "interp"):
        raise AnalysisError("--trajectory is drawn on a 2-D surface; drop --dim 1")


def _request(args) -> dict:
    """The command's settings that define the directions (resuming reuses stored ones)."""
    keys = ("directions", "dim", "seed", "normalization", "one_d", "eigen_group", "max_steps",
            "tol", "to", "split", "loss", "params", "no_states", "ignore")
    return {k: getattr(args, k) for k in keys}


def _directions(args, run, groups, stored):
    """The directions, the grid axes and (for PCA) the projected trajectory."""
    from landscape import directions as dirs

    dim = args.dim or (1 if args.directions == "interp" else 2)
    trajectory = None
    if stored is not None:  # resuming: the stored vectors, not a recomputation
        found = stored.direction_objects()
        trajectory = stored.meta.get("request", {}).get("trajectory")
    elif args.directions.startswith("file:"):
        found = _file_directions(args.directions[5:], run, args.dim)
        dim = len(found)
    elif args.directions == "random":
        found = dirs.random_directions(run.model, dim, args.seed, args.normalization, args.one_d)
        if args.params is not None:  # the same draws, zero outside the selected parameters
            found = _restricted(found, run.model, args.params)
    elif args.directions == "eigen":
        found = dirs.eigen_directions(run, args.eigen_group or groups[0], top=1,
                                      bottom=1 if dim == 2 else 0, seed=args.seed,
                                      max_steps=args.max_steps, tol=args.tol, split=args.split,
                                      params=args.params)
    elif args.directions == "pca":
        pca = dirs.trajectory_pca(run, count=2, ignore=args.ignore)
        found = pca.directions
        trajectory = {"epochs": list(pca.epochs), "coordinates": pca.coordinates.tolist()}
    else:
        from landscape.load import load

        found = (dirs.interpolation_direction(run, load(args.to, device=run.device),
                                              states=not args.no_states),)
    if args.trajectory and trajectory is None:
        from landscape.surface_files import project_trajectory

        trajectory = project_trajectory(run, found).to_json()
    if args.range is not None:
        low, high = args.range
    elif args.directions == "interp":
        low, high = -0.5, 1.5
    elif trajectory is not None:  # cover the projected trajectory with a margin
        reach = 1.2 * float(np.abs(np.asarray(trajectory["coordinates"])).max())
        if args.directions != "pca":  # the usual [-1, 1], widened when the path leaves it
            reach = max(1.0, reach)
        low, high = -reach, reach
    else:
        low, high = -1.0, 1.0
    from landscape.surface import grid_axis

    alphas = grid_axis(args.grid, low, high)
    if args.range is None and args.directions == "interp":
        from landscape.directions import interpolation_axis

        alphas = interpolation_axis(args.grid)
    betas = grid_axis(args.grid, low, high) if dim == 2 else None
    return found, alphas, betas, trajectory


def _restricted(found, model, params):
    """``found`` with every entry outside the parameters ``params`` selects set to 0."""
    import dataclasses

    from landscape.layout import ParamLayout, parse_patterns

    layout = ParamLayout.of(model)
    sub = layout.select(params)
    keep = layout.positions(sub)
    return tuple(dataclasses.replace(d, vector=layout.embed(sub, d.vector[keep]),
                                     recipe={**d.recipe, "params": list(parse_patterns(params))})
                 for d in found)


def _file_directions(path: str, run, dim):
    """The directions of a file; ``--dim 1`` takes the first of two."""
    from landscape.surface_files import load_directions

    found = load_directions(path, run)
    if len(found) not in (1, 2) or (dim or len(found)) > len(found):
        raise AnalysisError(f"{path}: holds {len(found)} direction(s), a {dim or len(found)}-D "
                            "surface needs 1 or 2 of them")
    return found[:dim or len(found)]


def _default_out(run, args) -> Path:
    kind = "file" if args.directions.startswith("file:") else args.directions
    return run.run_dir / "surface" / f"epoch_{run.epoch:04d}_{kind}_s{args.seed}"


def run(args) -> int:
    """A surface written into the run folder (the default ``--out``) holds the folder's lock
    while it works (landscape.load.writing_into); one written elsewhere does not."""
    if args.out is not None:
        return _run(args)
    from landscape.load import writing_into

    with writing_into(args.checkpoint, "landscape surface"):
        return _run(args)


def _run(args) -> int:
    from landscape.load import load
    from landscape.surface import Surface, compute_surface

    _check_args(args)
    run_ = load(args.checkpoint, device=args.device)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if not groups:
        raise AnalysisError("--groups is empty")
    for group in groups + ([args.eigen_group] if args.eigen_group else []):
        if group not in ("all", *run_.groups):
            raise AnalysisError(f"unknown group {group!r} (choose from all, "
                                f"{', '.join(run_.groups)})")
        run_.classes(group)  # raises GroupError for an empty group
    out = Path(args.out) if args.out else _default_out(run_, args)
    path = out / "surface.npz"
    request = _request(args)
    stored = None
    if path.exists() and not args.overwrite:
        stored = Surface.load(path)
        if {k: stored.meta.get("request", {}).get(k) for k in request} != request:
            raise AnalysisError(f"{path} holds a surface made with other settings; pass "
                                "--overwrite to replace it or choose another --out")
    found, alphas, betas, trajectory = _directions(args, run_, groups, stored)
    if trajectory is not None:
        request["trajectory"] = trajectory
    from landscape import _distributed

    if _distributed.is_writer():  # under torchrun, rank 0 writes
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite and path.exists():
            path.unlink()
        if args.save_directions:  # before the grid: a long computation's directions are kept
            from landscape.surface_files import save_directions

            save_directions(args.save_directions, found, run_)
    _distributed.barrier()  # no rank reads the old file after rank 0 removed it
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(alphas) * (1 if betas is None else len(betas)), unit="point",
                   desc="surface", leave=False, file=sys.stderr)
        if stored is not None:
            bar.update(int(stored.done.sum()))
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    surface = compute_surface(run_, found, alphas, betas, groups=groups, split=args.split,
                              loss=args.loss, dtype=dtype, method=args.method,
                              batch_size=args.batch_size,
                              path=path, save_every=args.save_every,
                              progress=bar.update if bar else None, request=request)
    if bar is not None:
        bar.close()
    if not _distributed.is_writer():
        return 0
    style = {"levels": args.levels, "vmin": args.vmin, "vmax": args.vmax, "scale": args.scale}
    written = write_figures(surface, out, style)
    if args.vtk:
        from landscape.surface_files import write_vtk

        written.append(write_vtk(surface, args.vtk))
    loss, acc = surface.centre("all")
    print(f"{path}: {surface.ndim}-D surface, {surface.done.size} points; at the centre loss "
          f"{loss:.4g}, accuracy {acc:.1f}%; {len(written)} figures in {out}")
    return 0


def write_figures(surface, out: Path, style=None) -> list[Path]:
    """The PNG and HTML figures of a finished surface into ``out``; ``style``: the contours'
    ``levels``, ``vmin``, ``vmax`` and ``scale`` (landscape.plots.plot_surface_contour_png)."""
    from landscape import plots

    written = []
    if surface.ndim == 1:
        for quantity in ("loss", "accuracy"):
            written.append(plots.plot_surface_line_png(surface, out / f"{quantity}_line.png",
                                                       quantity))
    else:
        trajectory = surface.meta.get("request", {}).get("trajectory")
        coords = np.asarray(trajectory["coordinates"]) if trajectory else None
        labels = trajectory["epochs"] if trajectory else None
        for group in surface.groups:
            written.append(plots.plot_surface_contour_png(
                surface, out / f"{group}_loss_contour.png", group, "loss", coords, labels,
                **(style or {})))
            written.append(plots.plot_surface_3d_png(surface, out / f"{group}_loss_3d.png",
                                                     group, "loss"))
    for quantity in ("loss", "accuracy"):
        written.append(plots.plot_surface_html(surface, out / f"surface_{quantity}.html",
                                               quantity))
    return written
