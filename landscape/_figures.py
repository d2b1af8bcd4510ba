"""What every figure of :mod:`landscape.plots` shares: one palette for PNG and HTML, plain tick
labels, the off-scale first checkpoint, and the atomic writers."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")  # files only: never ask for a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

from train.io import atomic_write_bytes  # noqa: E402

PathLike = Union[str, Path]

# The same colours in the PNGs and the HTML files: matplotlib's tab10, in order, for runs;
# fixed ones for the groups.
RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
              "#7f7f7f", "#bcbd22", "#17becf")
GROUP_COLORS = {"head": "#1f77b4", "tail": "#d62728", "all": "#2ca02c"}
GROUP_MARKERS = {"head": ("o", "circle"), "tail": ("^", "triangle-up")}  # (matplotlib, plotly)
PLOTLY_TEMPLATE = "plotly_white"


def color(label: str, k: int) -> str:
    """A group's own colour, else the ``k``-th run colour."""
    return GROUP_COLORS.get(label, RUN_COLORS[k % len(RUN_COLORS)])


def png_bytes(fig, dpi: int = 120) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def save_png(fig, path: PathLike, dpi: int = 120) -> Path:
    atomic_write_bytes(path, png_bytes(fig, dpi))
    return Path(path)


def save_html(fig, path: PathLike) -> Path:
    """Self-contained (plotly.js inline): the file opens offline."""
    atomic_write_bytes(path, fig.to_html(include_plotlyjs=True, full_html=True).encode("utf-8"))
    return Path(path)


_LOG_TICKS = (1.0, 2.0, 3.0, 5.0)


def plain_log_axis(axis) -> None:
    """Log-axis ticks at 1, 2, 3, 5 x 10^k written as plain numbers (``20``, not
    ``2 x 10^1``), so that they stay narrow and never run into the axis label, and an axis
    spanning less than a decade still gets two or more labels."""
    axis.set_major_locator(ticker.LogLocator(base=10, subs=_LOG_TICKS))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def plotly_log_axis(values: Sequence[float]) -> dict:
    """Plotly log-axis settings with the ticks of :func:`plain_log_axis` (1, 2, 3, 5 x 10^k as
    plain numbers) over the positive ``values``: the same ticks as the PNG."""
    positive = [v for v in values if np.isfinite(v) and v > 0]
    if not positive:
        return {"type": "log"}
    low, high = np.floor(np.log10(min(positive))), np.ceil(np.log10(max(positive)))
    ticks = [m * 10.0 ** k for k in range(int(low), int(high) + 1) for m in _LOG_TICKS]
    ticks = [t for t in ticks if min(positive) / 1.5 <= t <= max(positive) * 1.5]
    return {"type": "log", "tickvals": ticks, "ticktext": [f"{t:g}" for t in ticks]}


def range_after_first(first: Sequence[float], rest: Sequence[float],
                      pad: float = 0.08) -> Optional[tuple[float, float]]:
    """y limits that fit ``rest`` (the checkpoints after the first) and 0, or ``None`` when the
    first checkpoint's values fit inside them anyway (or nothing follows it). At initialisation
    the ratio is near -1 and later near -0.03: scaled to it, the optimizers' final differences
    would be invisible."""
    rest = [v for v in rest if np.isfinite(v)]
    first = [v for v in first if np.isfinite(v)]
    if not rest:
        return None
    lo, hi = min(min(rest), 0.0), max(max(rest), 0.0)
    span = (hi - lo) or 1.0
    lo, hi = lo - pad * span, hi + pad * span
    if all(lo <= v <= hi for v in first):
        return None
    return lo, hi


def off_scale_text(epoch: int, values: Sequence[float]) -> str:
    values = sorted(v for v in values if np.isfinite(v))
    low, high = f"{values[0]:.3g}", f"{values[-1]:.3g}"
    shown = low if low == high else f"{low} to {high}"
    return f"epoch {epoch} off scale: {shown}"
