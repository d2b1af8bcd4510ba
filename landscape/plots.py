"""Figures: matplotlib PNGs (Agg backend, no display needed) and self-contained plotly HTML files
(``include_plotlyjs=True``: they open offline, with no network).

Every function writes one file atomically (``train.io.atomic_write_bytes``) and returns
its path.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")  # files only: never ask for a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from train.io import atomic_write_bytes  # noqa: E402

PathLike = Union[str, Path]


def _png_bytes(fig, dpi: int = 120) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _save_png(fig, path: PathLike, dpi: int = 120) -> Path:
    atomic_write_bytes(path, _png_bytes(fig, dpi))
    return Path(path)


def _save_html(fig, path: PathLike) -> Path:
    html = fig.to_html(include_plotlyjs=True, full_html=True)
    atomic_write_bytes(path, html.encode("utf-8"))
    return Path(path)


# --------------------------------------------------------------------------------------------
# Loss surfaces (landscape.surface)

_QUANTITY_LABEL = {"loss": "loss", "accuracy": "accuracy (%)"}


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
    for group in surface.groups:
        ax.plot(surface.alphas, _surface_values(surface, group, quantity), label=group)
    ax.set_xlabel(_axis_labels(surface)[0])
    ax.set_ylabel(_QUANTITY_LABEL[quantity])
    if quantity == "loss":
        ax.set_yscale("log")
    ax.set_title(f"{surface.meta.get('model')} epoch {surface.meta.get('epoch')}: {quantity}")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save_png(fig, path)


def plot_surface_contour_png(surface, path: PathLike, group: str, quantity: str = "loss",
                             trajectory: Optional[np.ndarray] = None,
                             trajectory_labels: Optional[Sequence] = None) -> Path:
    """Filled contours of a 2-D surface of one group (log10 of the loss, so that the basin
    and the walls are both visible), the centre marked, and optionally a projected trajectory."""
    values = _surface_values(surface, group, quantity)
    shown = np.log10(np.clip(values, 1e-12, None)) if quantity == "loss" else values
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    filled = ax.contourf(surface.alphas, surface.betas, shown, levels=30, cmap="viridis")
    ax.contour(surface.alphas, surface.betas, shown, levels=15, colors="white",
               linewidths=0.4, alpha=0.6)
    fig.colorbar(filled, ax=ax, label="log10 loss" if quantity == "loss" else "accuracy (%)")
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
    ax.set_title(f"{group} {quantity}, epoch {surface.meta.get('epoch')}")
    ax.legend(loc="upper right", fontsize=7)
    return _save_png(fig, path)


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
    ax.set_title(f"{group} {quantity}, epoch {surface.meta.get('epoch')}")
    return _save_png(fig, path)


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
            fig.add_trace(go.Scatter(x=surface.alphas, y=values, mode="lines+markers", name=group))
        else:
            fig.add_trace(go.Surface(x=surface.alphas, y=surface.betas, z=values, name=group,
                                     colorscale="Viridis", visible=(k == 0),
                                     colorbar={"title": quantity}))
    title = f"{surface.meta.get('model')} epoch {surface.meta.get('epoch')}: {quantity}"
    if surface.ndim == 2:
        buttons = [{"label": group, "method": "update",
                    "args": [{"visible": [j == k for j in range(len(groups))]},
                             {"title": f"{title} ({group})"}]}
                   for k, group in enumerate(groups)]
        fig.update_layout(updatemenus=[{"buttons": buttons, "x": 0.0, "y": 1.1,
                                        "xanchor": "left"}],
                          scene={"xaxis_title": xlabel, "yaxis_title": ylabel,
                                 "zaxis_title": quantity},
                          title=f"{title} ({groups[0]})")
    else:
        fig.update_layout(xaxis_title=xlabel, yaxis_title=quantity, title=title)
        if quantity == "loss":
            fig.update_yaxes(type="log")
    return _save_html(fig, path)


# --------------------------------------------------------------------------------------------
# The saddle report (landscape.report)

_INDICATORS = (("lambda_max", "lambda_max"), ("lambda_min", "lambda_min"),
               ("ratio", "lambda_min / lambda_max"))


def plot_indicators_png(series: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]],
                        path: PathLike, switches: Optional[Mapping[str, int]] = None,
                        groups: Sequence[str] = ("head", "tail")) -> Path:
    """Saddle indicators over training: rows lambda_max, lambda_min, lambda_min/lambda_max;
    one column per group; one line per run.

    Args:
        series: run label -> group -> ``{"epoch": [...], "lambda_max": [...],
            "lambda_min": [...], "ratio": [...]}``.
        switches: run label -> epoch where its SSE-SAM stage II begins (a dashed line).
    """
    fig, axes = plt.subplots(len(_INDICATORS), len(groups), figsize=(5 * len(groups), 9),
                             sharex=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, group in enumerate(groups):
        for row, (key, label) in enumerate(_INDICATORS):
            ax = axes[row][col]
            for k, (run_label, per_group) in enumerate(series.items()):
                data = per_group.get(group)
                if not data:
                    continue
                ax.plot(data["epoch"], data[key], "o-", markersize=3,
                        color=colors[k % len(colors)], label=run_label)
            for k, (run_label, epoch) in enumerate((switches or {}).items()):
                index = list(series).index(run_label) if run_label in series else k
                ax.axvline(epoch, color=colors[index % len(colors)], linestyle="--",
                           linewidth=1, label=f"{run_label} stage II" if row == 0 else None)
            if key == "ratio":
                ax.axhline(0, color="black", linewidth=0.6)
            values = [v for data in (g.get(group) for g in series.values()) if data
                      for v in data[key]]
            if key == "lambda_max" and values and min(values) > 0:
                ax.set_yscale("log")
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title(f"{group} loss")
            if row == len(_INDICATORS) - 1:
                ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Saddle indicators over training (negative lambda_min: a saddle)")
    return _save_png(fig, path)


def plot_indicators_html(series, path: PathLike, switches: Optional[Mapping[str, int]] = None,
                         groups: Sequence[str] = ("head", "tail")) -> Path:
    """Interactive version of :func:`plot_indicators_png` (hover for values)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    titles = [f"{group}: {label}" for _, label in _INDICATORS for group in groups]
    fig = make_subplots(rows=len(_INDICATORS), cols=len(groups), shared_xaxes=True,
                        subplot_titles=titles)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    for k, (run_label, per_group) in enumerate(series.items()):
        color = palette[k % len(palette)]
        for col, group in enumerate(groups, start=1):
            data = per_group.get(group)
            if not data:
                continue
            for row, (key, _) in enumerate(_INDICATORS, start=1):
                fig.add_trace(go.Scatter(x=data["epoch"], y=data[key], mode="lines+markers",
                                         name=run_label, legendgroup=run_label,
                                         showlegend=(row == 1 and col == 1),
                                         line={"color": color}), row=row, col=col)
    for k, (run_label, epoch) in enumerate((switches or {}).items()):
        index = list(series).index(run_label) if run_label in series else k
        fig.add_vline(x=epoch, line_dash="dash", line_color=palette[index % len(palette)],
                      annotation_text=f"{run_label} stage II")
    fig.update_layout(height=900, title="Saddle indicators over training")
    return _save_html(fig, path)


# --------------------------------------------------------------------------------------------
# Spectral densities (landscape.slq): head and tail on one figure, as in the Saddle-SAM
# figures: symmetric-log eigenvalue axis, log density axis.

DENSITY_FLOOR = 1e-7  # the log axis shows density + 0 down to here (PyHessian's plots add 1e-7)
_GROUP_COLORS = {"head": "#1f77b4", "tail": "#d62728", "all": "#2ca02c"}


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
    for label, value in densities.items():
        grid, density = _grid_and_density(value)
        ax.plot(grid, np.maximum(density, floor), label=label, color=_GROUP_COLORS.get(label),
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
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), squeeze=False)
    for k, (name, densities) in enumerate(panels.items()):
        _draw_densities(axes[k // cols][k % cols], densities, c, floor, name)
    for k in range(len(panels), rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    if len(panels) > 1 and title:
        fig.suptitle(title)
    fig.tight_layout()
    return _png_bytes(fig)


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
    fig = make_subplots(rows=rows, cols=cols,
                        subplot_titles=list(panels) if len(panels) > 1 else None)
    top, shown = 0.0, set()
    for k, densities in enumerate(panels.values()):
        for label, value in densities.items():
            grid, density = _grid_and_density(value)
            top = max(top, float(np.abs(grid).max()))
            fig.add_trace(go.Scatter(
                x=_symlog(grid, c), y=np.maximum(density, floor), mode="lines", name=label,
                legendgroup=label, showlegend=label not in shown, customdata=grid,
                line={"color": _GROUP_COLORS.get(label)},
                hovertemplate="eigenvalue %{customdata:.4g}<br>density %{y:.3g}"),
                row=k // cols + 1, col=k % cols + 1)
            shown.add(label)
    decades = int(math.ceil(math.log10(max(top / c, 1.0)))) if top > 0 else 0
    ticks = [0.0] + [s * c * 10.0 ** k for k in range(decades + 1) for s in (1, -1)]
    fig.update_xaxes(tickvals=_symlog(np.array(ticks), c).tolist(),
                     ticktext=[f"{t:g}" for t in ticks],
                     title=f"eigenvalue (symmetric log, linear in [-{c:g}, {c:g}])")
    fig.update_yaxes(type="log", title="density")
    fig.update_layout(title=title or next(iter(panels), ""), template="plotly_white",
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
