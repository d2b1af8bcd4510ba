"""The report's figures: saddle indicators over training, and the per-class sweep against the
classes' training counts (PNG and HTML of each; :mod:`landscape.plots` exports them)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from landscape._figures import (GROUP_MARKERS, PLOTLY_TEMPLATE, RUN_COLORS, PathLike, color,
                                off_scale_text, plain_log_axis, plotly_log_axis, plt,
                                range_after_first, save_html, save_png)

__all__ = ["plot_indicators_png", "plot_indicators_html", "plot_classes_png",
           "plot_classes_html", "class_density_panels"]

# (key, matplotlib label, plotly label)
_INDICATORS = (("lambda_max", r"$\lambda_{\max}$", "λ<sub>max</sub>"),
               ("lambda_min", r"$\lambda_{\min}$", "λ<sub>min</sub>"),
               ("ratio", r"$\lambda_{\min} / \lambda_{\max}$",
                "λ<sub>min</sub> / λ<sub>max</sub>"))
_TITLE = "Saddle indicators over training (λmin < 0: a saddle)"


def _values(series, group: str, key: str) -> tuple[int, list, list]:
    """The first checkpoint's epoch, its values and the later values of every run."""
    runs = [g[group] for g in series.values() if g.get(group)]
    if not runs:
        return 0, [], []
    first = min(d["epoch"][0] for d in runs)
    at_first = [v for d in runs for e, v in zip(d["epoch"], d[key]) if e == first]
    later = [v for d in runs for e, v in zip(d["epoch"], d[key]) if e != first]
    return first, at_first, later


def _is_log(series, group: str) -> bool:
    _, first, later = _values(series, group, "lambda_max")
    values = [v for v in first + later if np.isfinite(v)]
    return bool(values) and min(values) > 0


def _switch_colors(series, switches) -> dict:
    labels = list(series)
    return {run: RUN_COLORS[(labels.index(run) if run in labels else k) % len(RUN_COLORS)]
            for k, run in enumerate(switches or {})}


def plot_indicators_png(series: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]],
                        path: PathLike, switches: Optional[Mapping[str, int]] = None,
                        groups: Sequence[str] = ("head", "tail"), title: str = "") -> Path:
    """Saddle indicators over training: rows lambda_max (log), lambda_min and lambda_min /
    lambda_max (zero lines; scaled to the checkpoints after the first, whose values are marked
    at the edge when they fall outside); one column per group; one line per run.

    Args:
        series: run label -> group -> ``{"epoch": [...], "lambda_max": [...],
            "lambda_min": [...], "ratio": [...]}``.
        switches: run label -> epoch where its SSE-SAM stage II begins (a dashed line).
        title: the figure's title (say which runs); a default otherwise.
    """
    fig, axes = plt.subplots(len(_INDICATORS), len(groups), figsize=(5.2 * len(groups), 9.5),
                             sharex=True, squeeze=False)
    switch_colors = _switch_colors(series, switches)
    for col, group in enumerate(groups):
        for row, (key, label, _) in enumerate(_INDICATORS):
            ax = axes[row][col]
            for k, (run_label, per_group) in enumerate(series.items()):
                data = per_group.get(group)
                if data:
                    ax.plot(data["epoch"], data[key], "o-", markersize=3,
                            color=RUN_COLORS[k % len(RUN_COLORS)], label=run_label)
            for run_label, epoch in (switches or {}).items():
                ax.axvline(epoch, color=switch_colors[run_label], linestyle="--", linewidth=1,
                           label=f"{run_label} stage II")
            if key == "lambda_max" and _is_log(series, group):
                ax.set_yscale("log")
                plain_log_axis(ax.yaxis)
            elif key != "lambda_max":
                ax.axhline(0, color="black", linewidth=0.8)
                _mark_first_apart(ax, *_values(series, group, key))
            ax.set_ylabel(label)
            ax.set_title(f"{group} loss: {label}", fontsize=10)
            ax.grid(alpha=0.3)
        axes[-1][col].set_xlabel("epoch")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8,
               bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(title or _TITLE)
    fig.align_ylabels(axes[:, 0])
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save_png(fig, path)


def _mark_first_apart(ax, first_epoch: int, first: list, later: list) -> None:
    limits = range_after_first(first, later)
    if limits is None:
        return
    lo, hi = limits
    ax.set_ylim(lo, hi)
    below = [v for v in first if v < lo]
    above = [v for v in first if v > hi]
    for values, edge, marker in ((below, lo, "v"), (above, hi, "^")):
        if values:
            ax.plot([first_epoch], [edge], marker=marker, color="black", markersize=7,
                    clip_on=False, linestyle="none")
            ax.annotate(off_scale_text(first_epoch, values), (first_epoch, edge),
                        xytext=(10, 6 if edge == lo else -14), textcoords="offset points",
                        fontsize=7, zorder=5,
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85})


def plot_indicators_html(series, path: PathLike, switches: Optional[Mapping[str, int]] = None,
                         groups: Sequence[str] = ("head", "tail"), title: str = "") -> Path:
    """Interactive version of :func:`plot_indicators_png`: the same rows, colours, axis scales
    and ranges (hover for values, those off scale included)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    titles = [f"{group} loss: {label}" for _, _, label in _INDICATORS for group in groups]
    fig = make_subplots(rows=len(_INDICATORS), cols=len(groups), shared_xaxes=True,
                        subplot_titles=titles, vertical_spacing=0.08)
    for k, (run_label, per_group) in enumerate(series.items()):
        for col, group in enumerate(groups, start=1):
            data = per_group.get(group)
            for row, (key, _, _) in enumerate(_INDICATORS if data else (), start=1):
                fig.add_trace(go.Scatter(
                    x=data["epoch"], y=data[key], mode="lines+markers", name=run_label,
                    legendgroup=run_label, showlegend=(row == 1 and col == 1),
                    line={"color": RUN_COLORS[k % len(RUN_COLORS)]}), row=row, col=col)
    switch_colors = _switch_colors(series, switches)
    for col, group in enumerate(groups, start=1):
        for row, (key, _, label) in enumerate(_INDICATORS, start=1):
            for run_label, epoch in (switches or {}).items():
                fig.add_vline(x=epoch, line_dash="dash", line_color=switch_colors[run_label],
                              row=row, col=col)
            fig.update_yaxes(title_text=label, row=row, col=col)
            if key == "lambda_max":
                if _is_log(series, group):
                    _, first, later = _values(series, group, key)
                    fig.update_yaxes(**plotly_log_axis(first + later), row=row, col=col)
                continue
            fig.add_hline(y=0, line_color="black", line_width=1, row=row, col=col)
            first_epoch, first, later = _values(series, group, key)
            limits = range_after_first(first, later)
            if limits is not None:
                fig.update_yaxes(range=list(limits), row=row, col=col)
                off = [v for v in first if not limits[0] <= v <= limits[1]]
                fig.add_annotation(x=first_epoch, y=limits[0], text=off_scale_text(
                    first_epoch, off), showarrow=False, xanchor="left", yanchor="bottom",
                    font={"size": 10}, bgcolor="rgba(255,255,255,0.85)", row=row, col=col)
        fig.update_xaxes(title_text="epoch", row=len(_INDICATORS), col=col)
    if switches:
        names = ", ".join(f"{r} stage II from epoch {e}" for r, e in switches.items())
        fig.add_annotation(text=f"dashed: {names}", xref="paper", yref="paper", x=0, y=-0.1,
                           showarrow=False, xanchor="left", yanchor="top")
    # the bottom margin keeps the note below the x-axis titles, not on them
    fig.update_layout(height=950, title=title or _TITLE, template=PLOTLY_TEMPLATE,
                      margin={"b": 110})
    return save_html(fig, path)


# --------------------------------------------------------------------------------------------
# The per-class sweep (landscape.classes)

_CLASS_PANELS = (("lambda_max", r"$\lambda_{\max}$", "λ<sub>max</sub>"),
                 ("lambda_min", r"$\lambda_{\min}$", "λ<sub>min</sub>"),
                 ("ratio", r"$\lambda_{\min} / \lambda_{\max}$",
                  "λ<sub>min</sub> / λ<sub>max</sub>"),
                 ("trace", "trace (Hutch++, ± 1 s.e.)", "trace (Hutch++, ± 1 s.e.)"))
_COUNT_LABEL = "training images of the class (log scale)"


def _class_points(sweep, group: str, key: str):
    rows = sorted((r for r in sweep.classes if r.group == group), key=lambda r: r.train_count)
    return ([r.train_count for r in rows], [getattr(r, key) for r in rows],
            [r.trace_stderr for r in rows], [r.class_id for r in rows])


def _class_color(sweeps, k: int, group: str) -> str:
    """One sweep: coloured by group; several: by run (the marker tells the group)."""
    return color(group, 0) if len(sweeps) == 1 else RUN_COLORS[k % len(RUN_COLORS)]


def _class_lines(sweeps, key: str):
    """``(name, group, colour, counts, values, stderrs, class ids)`` of each run's head and
    tail classes, sorted by count: one line of a class figure each."""
    for k, (run_label, sweep) in enumerate(sweeps.items()):
        for group in GROUP_MARKERS:
            x, y, err, ids = _class_points(sweep, group, key)
            if x:
                name = f"{run_label}: {group}" if len(sweeps) > 1 else f"{group} classes"
                yield name, group, _class_color(sweeps, k, group), x, y, err, ids


def _eta(sweeps) -> float:
    return next(iter(sweeps.values())).eta


def plot_classes_png(sweeps: Mapping[str, object], path: PathLike, title: str = "") -> Path:
    """Per-class lambda_max, lambda_min, their ratio and the trace against each class's
    training count (log axis): head classes as circles, tail classes as triangles, the eta
    threshold (tail: fewer images) as a dashed line; one colour per run (per group for one run).

    Args:
        sweeps: run label -> :class:`landscape.classes.ClassSweep`.
    """
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for ax, (key, label, _) in zip(axes.flat, _CLASS_PANELS):
        for name, group, line_color, x, y, err, ids in _class_lines(sweeps, key):
            ax.errorbar(x, y, yerr=err if key == "trace" else None,
                        marker=GROUP_MARKERS[group][0], markersize=5, linewidth=0.8, capsize=2,
                        label=name, color=line_color)
            if len(sweeps) == 1 and key == "lambda_max" and len(x) <= 20:
                for xi, yi, c in zip(x, y, ids):
                    ax.annotate(str(c), (xi, yi), xytext=(3, 3), textcoords="offset points",
                                fontsize=7)
        ax.axvline(_eta(sweeps), color="gray", linestyle="--", linewidth=1,
                   label=f"eta = {_eta(sweeps):g} (tail: fewer)")
        ax.set_xscale("log")
        plain_log_axis(ax.xaxis)
        values = [getattr(r, key) for s in sweeps.values() for r in s.classes]
        if key in ("lambda_max", "trace") and values and min(values) > 0:
            ax.set_yscale("log")
            plain_log_axis(ax.yaxis)
        else:
            ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel(label)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel(_COUNT_LABEL)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8,
               bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(title or "Per-class Hessian against the class's training count")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_png(fig, path)


def plot_classes_html(sweeps: Mapping[str, object], path: PathLike, title: str = "") -> Path:
    """Interactive version of :func:`plot_classes_png` (hover: class, count, value)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=2, shared_xaxes=True,
                        subplot_titles=[p[2] for p in _CLASS_PANELS])
    for n, (key, _, label) in enumerate(_CLASS_PANELS):
        row, col = n // 2 + 1, n % 2 + 1
        for name, group, line_color, x, y, err, ids in _class_lines(sweeps, key):
            fig.add_trace(go.Scatter(
                x=x, y=y, mode="lines+markers", name=name, legendgroup=name,
                showlegend=n == 0, customdata=ids,
                marker={"symbol": GROUP_MARKERS[group][1], "size": 8, "color": line_color},
                line={"width": 1, "color": line_color},
                error_y={"array": err, "visible": True} if key == "trace" else None,
                hovertemplate="class %{customdata}, %{x} images<br>%{y:.4g}"),
                row=row, col=col)
        fig.add_vline(x=_eta(sweeps), line_dash="dash", line_color="gray", row=row, col=col)
        values = [getattr(r, key) for s in sweeps.values() for r in s.classes]
        if key in ("lambda_max", "trace") and values and min(values) > 0:
            fig.update_yaxes(**plotly_log_axis(values), row=row, col=col)
        else:
            fig.add_hline(y=0, line_color="black", line_width=1, row=row, col=col)
        fig.update_yaxes(title_text=label, row=row, col=col)
        counts = [r.train_count for s in sweeps.values() for r in s.classes]
        fig.update_xaxes(**plotly_log_axis(counts), row=row, col=col)
        if row == 2:
            fig.update_xaxes(title_text=_COUNT_LABEL, row=row, col=col)
    fig.add_annotation(text=f"dashed: eta = {_eta(sweeps):g} (tail: fewer images)",
                       xref="paper", yref="paper", x=0, y=-0.12, showarrow=False,
                       xanchor="left")
    fig.update_layout(height=800, template=PLOTLY_TEMPLATE,
                      title=title or "Per-class Hessian against the class's training count")
    return save_html(fig, path)


def class_density_panels(sweeps: Mapping[str, object]) -> dict:
    """Panel title -> class label -> SLQ density, for the density figures: a head and a tail
    panel of each sweep that holds densities (empty when none does)."""
    panels = {}
    for run_label, sweep in sweeps.items():
        for group in GROUP_MARKERS:
            found = {f"class {r.class_id} ({r.train_count} images)": r.density
                     for r in sweep.classes if r.group == group and r.density is not None}
            if found:
                panels[f"{run_label}: {group} classes"] = found
    return panels
