r"""Per-block curvature: the Hessian block of each top-level module, the rest of the net fixed.

For a group ``G`` and a block ``S`` of parameters (a top-level child module of the network
holding parameters, e.g. ResNet's ``conv1``, ``bn1``, ``layer1`` ... ``layer4``, ``fc``; a
parameter of the root module is its own block), the operator is the diagonal block

.. math::  H_{SS} = \nabla^2_{w_S} L_G(w), \qquad \text{every other parameter fixed at } w,

of the group's loss Hessian (:class:`landscape.hvp.GroupHessian` with ``params``). Its
:math:`\lambda_{\max}`, :math:`\lambda_{\min}` (Lanczos) and Hutch++ trace are those of
:func:`landscape.hessian.hessian_summary` restricted to the block. The blocks' traces add up to
the trace of the whole Hessian (the trace of a matrix is the sum of its diagonal blocks'); their
extreme eigenvalues interlace with the whole's (Cauchy): every block's :math:`\lambda_{\max}` is
at most the whole's, every :math:`\lambda_{\min}` at least the whole's. PyHessian's users ask for
this view (its issues 9 and 10); curvlinops offers such sub-matrix operators.

>>> import landscape, tempfile
>>> run = landscape.load(run_dir, device="cpu")
>>> sweep = per_layer_sweep(run, "tail", max_steps=40, trace_hvps=9)
>>> [b.block for b in sweep.blocks], sweep.blocks[0].params    # an nn.Sequential MLP
(['1', '3', '5'], ('1.*',))
>>> [p.name for p in write_per_layer_figures(sweep, tempfile.mkdtemp(), "tail")]
['per_layer.png', 'per_layer.html']
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from landscape.hessian import hessian_summary
from landscape.layout import ParamLayout
from landscape.load import Group, Run
from landscape.options import MIN_STEPS

__all__ = ["BlockResult", "PerLayerSweep", "per_layer_sweep", "write_per_layer_figures"]


@dataclass(frozen=True)
class BlockResult:
    """One block's Hessian: its patterns, size, extremes and trace.

    Attributes:
        block: the top-level module's name (or a root parameter's).
        params: the patterns that select it (``("layer4.*",)``).
        n_params: the block's parameter count.
        lambda_max, lambda_min: its extreme eigenvalues.
        ratio: ``lambda_min / lambda_max`` (:func:`landscape.eigen.saddle_ratio`; NaN where
            undefined).
        trace, trace_stderr: the Hutch++ trace and its standard error.
        converged: whether both Ritz residuals met the tolerance.
        hvps: Hessian-vector products spent on the block.
    """

    block: str
    params: tuple[str, ...]
    n_params: int
    lambda_max: float
    lambda_min: float
    ratio: float
    trace: float
    trace_stderr: float
    converged: bool
    hvps: int

    def to_json(self) -> dict:
        def finite(x: float) -> Optional[float]:
            return x if math.isfinite(x) else None

        return {"block": self.block, "params": list(self.params), "n_params": self.n_params,
                "lambda_max": self.lambda_max, "lambda_min": self.lambda_min,
                "ratio": finite(self.ratio), "trace": self.trace,
                "trace_stderr": finite(self.trace_stderr), "converged": self.converged,
                "hvps": self.hvps}


@dataclass(frozen=True)
class PerLayerSweep:
    """The blocks of one group's Hessian at one checkpoint (:func:`per_layer_sweep`)."""

    checkpoint: str
    epoch: int
    group: str
    split: str
    seed: int
    blocks: tuple[BlockResult, ...]

    def to_json(self) -> dict:
        return {"checkpoint": self.checkpoint, "epoch": self.epoch, "group": self.group,
                "split": self.split, "seed": self.seed,
                "blocks": [b.to_json() for b in self.blocks]}


def per_layer_sweep(run: Run, group: Group = "all", *, seed: int = 0, split: str = "train",
                    loss: Optional[str] = None, batch_size: Optional[int] = None,
                    dtype: torch.dtype = torch.float64, tol: float = 1e-6, max_steps: int = 300,
                    min_steps: int = MIN_STEPS, trace_hvps: int = 99,
                    progress: Optional[Callable[[int], object]] = None) -> PerLayerSweep:
    """``lambda_max``, ``lambda_min`` and the Hutch++ trace of each top-level block's Hessian
    (:meth:`landscape.layout.ParamLayout.blocks`), in the network's order; the arguments are
    :func:`landscape.hessian.hessian_summary`'s (under torchrun each block's products are shared
    between the ranks as there)."""
    results = []
    for block, patterns in ParamLayout.of(run.model).blocks().items():
        s = hessian_summary(run, group, top=1, bottom=1, trace=True, seed=seed, split=split,
                            loss=loss, batch_size=batch_size, dtype=dtype, tol=tol,
                            max_steps=max_steps, min_steps=min_steps, trace_hvps=trace_hvps,
                            progress=progress,
                            params=patterns)
        results.append(BlockResult(block, patterns, s.provenance.n_params, s.top[0],
                                   s.bottom[0], s.ratio, float(s.trace.value),
                                   float(s.trace.stderr), s.converged, s.provenance.hvps))
    return PerLayerSweep(str(run.path), int(run.epoch), s.provenance.group, split, int(seed),
                         tuple(results))


_PANELS = (("lambda_max", "λ_max"), ("lambda_min", "λ_min"), ("trace", "trace"))


def _render_png(sweep: PerLayerSweep, title: str) -> bytes:
    from landscape._figures import color, png_bytes, plt

    names = [b.block for b in sweep.blocks]
    x = list(range(len(names)))
    fig, axes = plt.subplots(len(_PANELS), 1, figsize=(max(5.0, 0.6 * len(names) + 2), 7.5),
                             sharex=True)
    for ax, (key, label) in zip(axes, _PANELS):
        values = [getattr(b, key) for b in sweep.blocks]
        errors = ([b.trace_stderr if math.isfinite(b.trace_stderr) else 0.0
                   for b in sweep.blocks] if key == "trace" else None)
        ax.errorbar(x, values, yerr=errors, fmt="o-", color=color(sweep.group, 0), capsize=3)
        ax.axhline(0.0, color="0.6", linewidth=0.8, zorder=0)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xticks(x, names, rotation=45, ha="right")
    axes[-1].set_xlabel("top-level block (the other parameters fixed)")
    axes[0].set_title(title)
    return png_bytes(fig)


def _render_html(sweep: PerLayerSweep, title: str) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from landscape._figures import PLOTLY_TEMPLATE, color

    names = [b.block for b in sweep.blocks]
    fig = make_subplots(rows=len(_PANELS), cols=1, shared_xaxes=True, vertical_spacing=0.05)
    for row, (key, label) in enumerate(_PANELS, start=1):
        errors = None
        if key == "trace":
            errors = dict(type="data", array=[b.trace_stderr if math.isfinite(b.trace_stderr)
                                              else 0.0 for b in sweep.blocks])
        fig.add_trace(go.Scatter(
            x=names, y=[getattr(b, key) for b in sweep.blocks], error_y=errors,
            mode="lines+markers", name=label, line=dict(color=color(sweep.group, 0)),
            customdata=[[b.n_params, b.hvps] for b in sweep.blocks],
            hovertemplate=f"%{{x}}: {label} %{{y:.4g}}<br>%{{customdata[0]}} parameters, "
                          "%{customdata[1]} HVPs<extra></extra>"), row=row, col=1)
        fig.update_yaxes(title_text=label, zeroline=True, row=row, col=1)
    fig.update_xaxes(title_text="top-level block (the other parameters fixed)",
                     row=len(_PANELS), col=1)
    fig.update_layout(template=PLOTLY_TEMPLATE, title=title, showlegend=False, height=750)
    return fig.to_html(include_plotlyjs=True, full_html=True)


def write_per_layer_figures(sweep: PerLayerSweep, out: Union[str, Path],
                            title: str = "") -> list[Path]:
    """``per_layer.png`` and ``per_layer.html`` (opens offline) into ``out`` (created if
    missing): lambda_max, lambda_min and the trace (with its standard error) against the block.
    Both are rendered before either is written; each is written atomically."""
    from train.io import atomic_write_bytes

    title = title or f"{sweep.group}: Hessian blocks, epoch {sweep.epoch}"
    png, html = _render_png(sweep, title), _render_html(sweep, title)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "per_layer.png", out / "per_layer.html"]
    atomic_write_bytes(written[0], png)
    atomic_write_bytes(written[1], html.encode("utf-8"))
    return written
