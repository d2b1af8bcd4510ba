"""Figures: matplotlib PNGs (Agg backend, no display needed) and self-contained plotly HTML files
(``include_plotlyjs=True``: they open offline, with no network).

Every function writes one file atomically (``train.io.atomic_write_bytes``) and returns
its path.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from landscape._figures import (PLOTLY_TEMPLATE, PathLike, color, png_bytes, plt, save_html,
                                save_png)
from landscape._plots_report import (class_density_panels, plot_classes_html, plot_classes_png,
                                     plot_indicators_html, plot_indicators_png)
from train.io import atomic_write_bytes

__all__ = ["plot_surface_line_png", "plot_surface_contour_png", "plot_surface_3d_png",
           "plot_surface_html", "plot_indicators_png", "plot_indicators_html",
           "plot_classes_png", "plot_classes_html", "class_density_panels",
           "render_density_panels_png", "render_density_panels_html", "render_densities_png",
           "render_densities_html", "plot_density_panels_png", "plot_density_panels_html",
           "symlog_threshold", "run_title", "write_class_figures", "DENSITY_FLOOR"]


# --------------------------------------------------------------------------------------------
# Loss surfaces (landscape.surface)

_QUANTITY_LABEL = {"loss": "loss", "accuracy": "accuracy (%)"}


def run_title(meta: Mapping) -> str:
    """``RUN (OPTIMIZER) epoch E`` for a surface's ``meta``: the run folder's name, and its
    optimizer from the folder's ``config.json`` when that is still readable."""
    from train.checkpoint import CheckpointError, read_config
    from train.options import OPTIMIZER_LABELS

    run_dir = meta.get("run_dir")
    name = Path(run_dir).name if run_dir else str(meta.get("model"))
    try:
        opt = read_config(run_dir).get("opt") if run_dir else None
    except (CheckpointError, OSError, ValueError, AttributeError):
        opt = None
    label = f"{name} ({OPTIMIZER_LABELS.get(opt, opt)})" if opt else name
    return f"{label} epoch {meta.get('epoch')}"


def _surface_values(surface, group: str, quantity: str) -> np.ndarray:
    if quantity not in _QUANTITY_LABEL:
        raise ValueError(f"quantity must be loss or accuracy, got {quantity!r}")
    table = surface.loss if quantity == "loss" else surface.accuracy
    return np.asarray(table[group], dtype=np.float64)


def _axis_labels(surface) -> tuple[str, str]:
    kinds = [d["kind"] for d in surface.meta.get("directions", [])]
    labels = []
    for k, kind in enumerate(kinds):
        recipe = surface.meta["directions"][k].get("recipe", {})
        if kind == "eigen":
            labels.append(f"{recipe.get('group')} {recipe.get('end')} eigenvector "
                          f"(lambda={recipe.get('eigenvalue', float('nan')):.3g})")
        elif kind == "pca":
            ratio = recipe.get("explained_variance_ratio", float("nan"))
            labels.append(f"PC{k + 1} ({100 * ratio:.1f}% of variance)")
        elif kind == "interpolation":
            labels.append("interpolation (0: start, 1: end)")
        else:
            labels.append(f"random direction {k + 1} (seed {recipe.get('seed')})")
    labels += ["alpha", "beta"][len(labels):]
    return labels[0], labels[1]


def plot_surface_line_png(surface, path: PathLike, quantity: str = "loss") -> Path:
    """A 1-D surface: one curve per group."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, group in enumerate(surface.groups):
        ax.plot(surface.alphas, _surface_values(surface, group, quantity), label=group,
                color=color(group, k))
    ax.set_xlabel(_axis_labels(surface)[0])
    ax.set_ylabel(_QUANTITY_LABEL[quantity])
    if quantity == "loss":
        ax.set_yscale("log")
    ax.set_title(f"{run_title(surface.meta)}: {quantity}")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def plot_surface_contour_png(surface, path: PathLike, group: str, quantity: str = "loss",
                             trajectory: Optional[np.ndarray] = None,
                             trajectory_labels: Optional[Sequence] = None, *, levels: int = 30,
                             vmin: Optional[float] = None, vmax: Optional[float] = None,
                             scale: str = "log") -> Path:
    """Filled contours of a 2-D surface of one group (``scale="log"``: log10 of the loss, so
    that the basin and the walls are both visible), the centre marked, and optionally a
    projected trajectory. ``levels`` filled bands between ``vmin`` and ``vmax`` (in the
    quantity's units; default the surface's range; values beyond fall in the end bands)."""
    values = _surface_values(surface, group, quantity)
    log = quantity == "loss" and scale == "log"
    shown = np.log10(np.clip(values, 1e-12, None)) if log else values
    bounds = _contour_levels(shown, levels, vmin, vmax, log)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    filled = ax.contourf(surface.alphas, surface.betas, shown, levels=bounds, cmap="viridis",
                         extend="both")
    ax.contour(surface.alphas, surface.betas, shown, levels=bounds[::2], colors="white",
               linewidths=0.4, alpha=0.6)
    fig.colorbar(filled, ax=ax, label="log10 loss" if log else _QUANTITY_LABEL[quantity])
    ax.plot([0], [0], marker="*", color="red", markersize=10, linestyle="none",
            label="checkpoint")
    if trajectory is not None and len(trajectory):
        ax.plot(trajectory[:, 0], trajectory[:, 1], "o-", color="orange", markersize=3,
                linewidth=1, label="trajectory")
        for (x, y), text in zip(trajectory, trajectory_labels or []):
            ax.annotate(str(text), (x, y), fontsize=6, color="orange")
    xlabel, ylabel = _axis_labels(surface)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{run_title(surface.meta)}: {group} {quantity}", fontsize=10)
    ax.legend(loc="upper right", fontsize=7)
    return save_png(fig, path)


def _contour_levels(shown: np.ndarray, levels: int, vmin: Optional[float],
                    vmax: Optional[float], log: bool) -> np.ndarray:
    """``levels + 1`` band edges from ``vmin`` to ``vmax`` (log10 of them when ``log``)."""
    lo = np.nanmin(shown) if vmin is None else (np.log10(vmin) if log else vmin)
    hi = np.nanmax(shown) if vmax is None else (np.log10(vmax) if log else vmax)
    if not hi > lo:  # a flat surface: one band around its value
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, int(levels) + 1)


def plot_surface_3d_png(surface, path: PathLike, group: str, quantity: str = "loss") -> Path:
    """A 3-D view of a 2-D surface of one group."""
    values = _surface_values(surface, group, quantity)
    a, b = np.meshgrid(surface.alphas, surface.betas)
    fig = plt.figure(figsize=(6, 5))
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(a, b, values, cmap="viridis", linewidth=0, antialiased=True)
    xlabel, ylabel = _axis_labels(surface)
    ax.set_xlabel(xlabel, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.set_zlabel(_QUANTITY_LABEL[quantity])
    ax.tick_params(labelsize=6)
    ax.set_title(f"{run_title(surface.meta)}: {group} {quantity}", fontsize=10)
    return save_png(fig, path)


def plot_surface_html(surface, path: PathLike, quantity: str = "loss") -> Path:
    """Interactive plotly figure of every group's surface (3-D for 2-D surfaces, curves for
    1-D), one group shown at a time through a drop-down menu; opens offline."""
    import plotly.graph_objects as go

    xlabel, ylabel = _axis_labels(surface)
    groups = surface.groups
    fig = go.Figure()
    for k, group in enumerate(groups):
        values = _surface_values(surface, group, quantity)
        if surface.ndim == 1:
            fig.add_trace(go.Scatter(x=surface.alphas, y=values, mode="lines+markers", name=group,
                                     line={"color": color(group, k)}))
        else:
            fig.add_trace(go.Surface(x=surface.alphas, y=surface.betas, z=values, name=group,
                                     colorscale="Viridis", visible=(k == 0),
                                     colorbar={"title": quantity}))
    title = f"{run_title(surface.meta)}: {quantity}"
    if surface.ndim == 2:
        buttons = [{"label": group, "method": "update",
                    "args": [{"visible": [j == k for j in range(len(groups))]},
                             {"title": f"{title} ({group})"}]}
                   for k, group in enumerate(groups)]
        fig.update_layout(updatemenus=[{"buttons": buttons, "x": 1.0, "y": 1.0,
                                        "xanchor": "right", "yanchor": "top"}],
                          annotations=[{"text": "group:", "x": 1.0, "y": 1.0, "xref": "paper",
                                        "yref": "paper", "xanchor": "right", "yanchor": "top",
                                        "xshift": -90, "yshift": -4, "showarrow": False}],
                          template=PLOTLY_TEMPLATE, margin={"t": 80},
                          scene={"xaxis_title": xlabel, "yaxis_title": ylabel,
                                 "zaxis_title": quantity},
                          title=f"{title} ({groups[0]})")
    else:
        fig.update_layout(xaxis_title=xlabel, yaxis_title=quantity, title=title,
                          template=PLOTLY_TEMPLATE)
        if quantity == "loss":
            fig.update_yaxes(type="log")
    return save_html(fig, path)


# --------------------------------------------------------------------------------------------
# Spectral densities (landscape.slq): head and tail on one figure, as in the Saddle-SAM
# figures: symmetric-log eigenvalue axis, log density axis.

DENSITY_FLOOR = 1e-7  # the log axis shows density + 0 down to here (PyHessian's plots add 1e-7)


def _grid_and_density(value) -> tuple[np.ndarray, np.ndarray]:
    """A SpectralDensity or a ``(grid, density)`` pair -> two float64 arrays."""
    if hasattr(value, "grid") and hasattr(value, "density"):
        return np.asarray(value.grid, np.float64), np.asarray(value.density, np.float64)
    grid, density = value
    return np.asarray(grid, np.float64), np.asarray(density, np.float64)


def symlog_threshold(densities: Mapping[str, object]) -> float:
    """The linear range ``[-c, c]`` of the symmetric-log axis: the power of ten nearest below
    ``1e-3 * max |eigenvalue|`` (so the bulk near 0 is resolved and the outliers fit)."""
    extent = max((np.abs(_grid_and_density(v)[0]).max() for v in densities.values()), default=1.0)
    return float(10.0 ** math.floor(math.log10(max(extent, 1e-300) * 1e-3)))


def _symlog(x: np.ndarray, c: float) -> np.ndarray:
    """Symmetric log, base 10: ``[-c, c]`` maps linearly onto ``[-1, 1]`` and every decade
    beyond onto a further unit (matplotlib's symlog up to the width of the linear part)."""
    x = np.asarray(x, np.float64)
    a = np.abs(x) / c
    return np.where(a <= 1, x / c, np.sign(x) * (1 + np.log10(np.maximum(a, 1))))


def _panel_grid(count: int) -> tuple[int, int]:
    cols = min(max(1, count), 2)
    return math.ceil(max(1, count) / cols), cols


def _draw_densities(ax, densities: Mapping[str, object], c: float, floor: float,
                    title: str) -> None:
    for k, (label, value) in enumerate(densities.items()):
        grid, density = _grid_and_density(value)
        ax.plot(grid, np.maximum(density, floor), label=label, color=color(label, k),
                linewidth=1.0)
    ax.set_xscale("symlog", linthresh=c)
    ax.set_yscale("log")
    ax.set_xlabel(f"eigenvalue (symmetric log, linear in [-{c:g}, {c:g}])")
    ax.set_ylabel("density")
    ax.axvline(0, color="black", linewidth=0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title)


def _linthresh(panels: Mapping[str, Mapping[str, object]], linthresh: Optional[float]) -> float:
    """One symmetric-log threshold for every panel, so that they can be compared."""
    every = {f"{p} {g}": v for p, groups in panels.items() for g, v in groups.items()}
    return linthresh or symlog_threshold(every)


def render_density_panels_png(panels: Mapping[str, Mapping[str, object]], title: str = "",
                              linthresh: Optional[float] = None,
                              floor: float = DENSITY_FLOOR) -> bytes:
    """PNG bytes of spectral densities, one panel per entry of ``panels`` (panel title ->
    group label -> ``SpectralDensity`` or ``(grid, density)``), every group of a panel on one
    symmetric-log eigenvalue axis with a log density axis; the same axis scale in every panel.
    The one density figure of the project: the ``spectrum`` command draws one panel, the report
    one per run."""
    c = _linthresh(panels, linthresh)
    rows, cols = _panel_grid(len(panels))
    # Shared axes: every panel on the same eigenvalue and density ranges, to be compared.
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), squeeze=False,
                             sharex=True, sharey=True)
    for k, (name, densities) in enumerate(panels.items()):
        _draw_densities(axes[k // cols][k % cols], densities, c, floor, name)
    for k in range(len(panels)):  # the eigenvalue axis is labelled once, under each column
        if k + cols < len(panels):
            axes[k // cols][k % cols].set_xlabel("")
        else:
            axes[k // cols][k % cols].xaxis.set_tick_params(labelbottom=True)
    for k in range(len(panels), rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    if len(panels) > 1 and title:
        fig.suptitle(title)
    fig.tight_layout()
    return png_bytes(fig)


def render_density_panels_html(panels: Mapping[str, Mapping[str, object]], title: str = "",
                               linthresh: Optional[float] = None,
                               floor: float = DENSITY_FLOOR) -> str:
    """Self-contained plotly HTML (works offline) of :func:`render_density_panels_png`'s figure.

    Plotly has no symmetric-log axis, so the eigenvalues are mapped by matplotlib's symlog formula
    and the ticks are labelled with the eigenvalues themselves; hovering shows the eigenvalue."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    c = _linthresh(panels, linthresh)
    rows, cols = _panel_grid(len(panels))
    fig = make_subplots(rows=rows, cols=cols, shared_xaxes="all", shared_yaxes="all",
                        subplot_titles=list(panels) if len(panels) > 1 else None)
    top, shown = 0.0, set()
    for k, densities in enumerate(panels.values()):
        for j, (label, value) in enumerate(densities.items()):
            grid, density = _grid_and_density(value)
            top = max(top, float(np.abs(grid).max()))
            fig.add_trace(go.Scatter(
                x=_symlog(grid, c), y=np.maximum(density, floor), mode="lines", name=label,
                legendgroup=label, showlegend=label not in shown, customdata=grid,
                line={"color": color(label, j)},
                hovertemplate="eigenvalue %{customdata:.4g}<br>density %{y:.3g}"),
                row=k // cols + 1, col=k % cols + 1)
            shown.add(label)
    decades = int(math.ceil(math.log10(max(top / c, 1.0)))) if top > 0 else 0
    ticks = [0.0] + [s * c * 10.0 ** k for k in range(decades + 1) for s in (1, -1)]
    fig.update_xaxes(tickvals=_symlog(np.array(ticks), c).tolist(),
                     ticktext=[f"{t:g}" for t in ticks],
                     title=f"eigenvalue (symmetric log, linear in [-{c:g}, {c:g}])")
    fig.update_yaxes(type="log", title="density", exponentformat="power", dtick=2)
    fig.update_layout(title=title or next(iter(panels), ""), template=PLOTLY_TEMPLATE,
                      height=max(450, 350 * rows))
    return fig.to_html(include_plotlyjs=True, full_html=True)


_DENSITY_TITLE = "Hessian spectral density (SLQ)"


def render_densities_png(densities: Mapping[str, object], title: str = "",
                         linthresh: Optional[float] = None, floor: float = DENSITY_FLOOR) -> bytes:
    """PNG bytes of the densities of several groups on one axis (see :func:`plot_densities_png`)."""
    return render_density_panels_png({title or _DENSITY_TITLE: densities}, title, linthresh,
                                     floor)


def render_densities_html(densities: Mapping[str, object], title: str = "",
                          linthresh: Optional[float] = None, floor: float = DENSITY_FLOOR) -> str:
    """Interactive version of :func:`render_densities_png`."""
    return render_density_panels_html({title or _DENSITY_TITLE: densities}, title, linthresh,
                                      floor)


def plot_density_panels_png(panels: Mapping[str, Mapping[str, object]], path: PathLike,
                            title: str = "", linthresh: Optional[float] = None) -> Path:
    """Writes :func:`render_density_panels_png`'s figure (panel title -> group -> density)."""
    atomic_write_bytes(path, render_density_panels_png(panels, title, linthresh))
    return Path(path)


def plot_density_panels_html(panels: Mapping[str, Mapping[str, object]], path: PathLike,
                             title: str = "", linthresh: Optional[float] = None) -> Path:
    """Writes :func:`render_density_panels_html`'s figure: interactive, opens offline."""
    atomic_write_bytes(path, render_density_panels_html(panels, title, linthresh).encode())
    return Path(path)


def write_class_figures(sweeps: Mapping[str, object], out: PathLike, title: str) -> list[Path]:
    """``classes.png/.html`` of ``sweeps`` (run label -> :class:`landscape.classes.ClassSweep`)
    into ``out``, and ``class_densities.png/.html`` when the sweeps hold densities."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_classes_png(sweeps, out / "classes.png", title),
               plot_classes_html(sweeps, out / "classes.html", title)]
    panels = class_density_panels(sweeps)
    if panels:
        name = f"{title}: per-class Hessian spectral densities (SLQ)"
        written.append(plot_density_panels_png(panels, out / "class_densities.png", name))
        written.append(plot_density_panels_html(panels, out / "class_densities.html", name))
    return written
