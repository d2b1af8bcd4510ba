"""Writing the saddle report: tables, ``report.md``, ``report.json`` and the figures."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from landscape.report.results import SaddleReport
from train.io import atomic_write_bytes, atomic_write_json

__all__ = ["write_report"]

PathLike = Union[str, Path]


def write_report(report: SaddleReport, out: PathLike) -> list[Path]:
    """Writes ``table.csv``, ``table.md``, ``report.json``, ``report.md`` and the figures
    (``indicators.png/.html``, ``densities.png/.html``, and with a per-class sweep
    ``classes.png/.html``) into ``out``; returns the paths.

    Example:
        >>> import tempfile
        >>> from landscape.report import ReportSettings, build_report
        >>> report = build_report([run_dir], ReportSettings(steps=30, probes=2, every=3),
        ...                       device="cpu")
        >>> sorted(p.name for p in write_report(report, tempfile.mkdtemp()))[:4]
        ['densities.html', 'densities.png', 'indicators.html', 'indicators.png']
    """
    from landscape import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    series = {r.label: {g: r.series(g) for g in report.settings.groups} for r in report.runs}
    switches = {r.label: r.switch_epoch for r in report.runs if r.switch_epoch is not None}
    groups = report.settings.groups
    names = ", ".join(series)
    title = f"Saddle indicators over training, {report.dataset}: {names} (λmin < 0: a saddle)"
    written.append(plots.plot_indicators_png(series, out / "indicators.png", switches, groups,
                                             title))
    written.append(plots.plot_indicators_html(series, out / "indicators.html", switches, groups,
                                              title))
    # One panel per run: its groups' densities at its final checkpoint.
    densities = {f"{r.label} (epoch {r.final_epoch})": dict(r.densities) for r in report.runs
                 if r.densities}
    if densities:
        title = f"Hessian spectral densities (SLQ), {' vs '.join(groups)}: {names}"
        written.append(plots.plot_density_panels_png(densities, out / "densities.png", title))
        written.append(plots.plot_density_panels_html(densities, out / "densities.html", title))
    sweeps = {r.label: r.class_sweep for r in report.runs if r.class_sweep is not None}
    if sweeps:
        written += plots.write_class_figures(
            sweeps, out, f"Per-class Hessian at the final checkpoints, {report.dataset}: "
                         f"{', '.join(sweeps)}")
    table = report.to_markdown()
    for name, text in (("table.csv", report.to_csv()), ("table.md", table),
                       ("report.md", _report_markdown(report, table, densities, sweeps))):
        atomic_write_bytes(out / name, text.encode("utf-8"))
        written.append(out / name)
    atomic_write_json(out / "report.json", report.to_json())
    written.append(out / "report.json")
    return written


def _report_markdown(report: SaddleReport, table: str, densities, sweeps) -> str:
    s = report.settings
    groups = ", ".join(f"{g} = classes {report.groups.get(g)}" for g in s.groups)
    lines = [
        f"# Saddle report ({report.dataset})", "",
        f"Groups: {groups}. Final checkpoint of each run; test accuracy in % (mean per class, "
        "and over the many / medium / few classes); extreme eigenvalues of the Hessian of each "
        f"group's mean {s.split}-set loss (Lanczos, {min(s.min_steps, s.steps)} to {s.steps} "
        f"steps, relative residual tolerance {s.tol:g}, seed {s.seed}). λmin/λmax < 0: the "
        "group's loss is at a saddle.",
        "", table, "![saddle indicators over training](indicators.png)", "",
        "Interactive: [indicators.html](indicators.html)",
    ]
    if densities:
        lines += ["", "![head vs tail spectral densities](densities.png)", "",
                  f"SLQ: {s.probes} probes x {s.steps} Lanczos steps. Interactive: "
                  "[densities.html](densities.html)"]
    if sweeps:
        lines += ["", "## Per class", "", "Each class's own loss Hessian at the final checkpoint "
                  "against its training images (circles: head, triangles: tail, dashed: eta). "
                  "Interactive: [classes.html](classes.html)", "",
                  "![per-class Hessian against the class's training count](classes.png)"]
        for label, sweep in sweeps.items():
            lines += ["", f"### {label} (epoch {sweep.epoch})", "", sweep.to_markdown().rstrip()]
    unconverged = [f"{r.label} epoch {i.epoch} {i.group}" for r in report.runs
                   for i in r.indicators if not i.converged]
    if unconverged:
        lines += ["", f"Not converged to the tolerance within {s.steps} steps (the residuals "
                      f"are in report.json): {', '.join(unconverged)}."]
    return "\n".join(lines) + "\n"
