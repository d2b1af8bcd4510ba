r"""Directions in parameter space for loss surfaces: random (filter-normalised), Hessian
eigenvectors, the line between two checkpoints, and the PCA of a checkpoint trajectory.

Every direction is a flat vector over the model's trainable parameters
(:class:`landscape.layout.ParamLayout`, the layout of :class:`landscape.hvp.GroupHessian` too),
so a Hessian eigenvector is a direction as it stands.
Buffers (BatchNorm running statistics) are not parameters. A random, eigen or PCA direction
leaves them alone: the surface is the loss at :math:`w + \alpha d_1 + \beta d_2` with the
centre checkpoint's running statistics, the model in eval mode. The line between two
checkpoints also moves them (Li et al.'s "states" directions, :func:`interpolation_direction`,
on by default): a direction may carry ``states``, a flat vector over the floating-point buffers
(:func:`state_names`), and the surface's statistics are then :math:`s + \alpha s_1`, so that
``alpha = 1`` is the end checkpoint with its own statistics, not its weights with the start's.

Filter normalisation (Li et al. 2018, "Visualizing the loss landscape of neural nets"): a
Gaussian direction :math:`d` is rescaled slice by slice along dimension 0 of each weight (one
conv filter, one row of a linear layer),

.. math::  d_{k} \leftarrow d_{k} \, \frac{\lVert w_{k} \rVert}{\lVert d_{k} \rVert + 10^{-10}},

so that a step of 1 along ``d`` changes every filter by its own norm and surfaces of networks
with different weight scales are comparable. One-dimensional parameters (biases, BatchNorm
scales and shifts) are set to zero (``one_d="zero"``, Li et al.'s ``biasbn`` ignore) or to the
weights themselves (``one_d="weights"``).

>>> import landscape
>>> run = landscape.load(run_dir, device="cpu")
>>> d1, d2 = random_directions(run.model, count=2, seed=0)
>>> d1.kind, d1.vector.shape == flat_parameters(run.model).shape
('random', True)
>>> top, bottom = eigen_directions(run, "tail", seed=0)
>>> round(top.norm, 6), top.recipe["end"], bottom.recipe["end"]      # unit, float32
(1.0, 'top', 'bottom')
>>> start = landscape.load(f"{run_dir}/epoch_0000.pt", device="cpu")
>>> interpolation_direction(start, run).kind          # alpha = 0: start, alpha = 1: run
'interpolation'
>>> pca = trajectory_pca(run)
>>> pca.epochs, pca.coordinates.shape                 # checkpoints projected on 2 directions
((0, 1, 2, 3), (4, 2))
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from landscape.errors import AnalysisError
from landscape.layout import ParamLayout
from landscape.options import IGNORE, NORMALIZATIONS, ONE_D
from train import checkpoint as ckpt

__all__ = [
    "Direction", "TrajectoryPCA", "NORMALIZATIONS", "ONE_D", "IGNORE", "parameter_names",
    "flat_parameters", "state_names", "flat_states", "random_directions", "eigen_directions",
    "interpolation_direction", "interpolation_axis", "trajectory_pca",
]



@dataclass(frozen=True, eq=False)
class Direction:
    """A direction in parameter space and the recipe that made it.

    Attributes:
        vector: flat float32 CPU tensor over the trainable parameters (see module docstring).
        kind: ``"random"``, ``"eigen"``, ``"interpolation"`` or ``"pca"``.
        recipe: JSON-able settings that recompute ``vector`` (seed, normalisation, group,
            Lanczos steps, checkpoints, ...) plus facts found on the way (an eigenvalue, an
            explained variance).
        states: ``None``, or a flat float32 CPU tensor over the floating-point buffers
            (:func:`state_names`): how a step moves the BatchNorm running statistics.
    """

    vector: torch.Tensor
    kind: str
    recipe: Mapping[str, Any] = field(default_factory=dict)
    states: Optional[torch.Tensor] = None

    @property
    def norm(self) -> float:
        return float(self.vector.double().norm())

    def digest(self) -> str:
        """SHA-256 of the vector's float32 bytes: identifies it in a saved surface."""
        return hashlib.sha256(self.vector.float().contiguous().numpy().tobytes()).hexdigest()


def parameter_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in the order of a flat vector."""
    return list(ParamLayout.of(model).names)


def state_names(model: nn.Module) -> list[str]:
    """Names of the floating-point buffers (BatchNorm running means and variances), in the
    order of a direction's ``states``; integer buffers (batch counters) are not moved."""
    return [name for name, b in model.named_buffers() if b.is_floating_point()]


def flat_states(model: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The floating-point buffers as one flat CPU vector (the layout of ``states``)."""
    buffers = dict(model.named_buffers())
    parts = [buffers[name].detach().reshape(-1).to("cpu", dtype) for name in state_names(model)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


def flat_parameters(model: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights ``w`` as one flat CPU vector (same layout as every direction)."""
    layout = ParamLayout.of(model)
    return layout.flatten(layout.parameters(model), dtype=dtype, device="cpu")


def _normalize(d: torch.Tensor, w: torch.Tensor, normalization: str, one_d: str) -> torch.Tensor:
    """Rescales one parameter's Gaussian draw ``d`` by the weights ``w`` (module docstring)."""
    if d.dim() <= 1:
        return torch.zeros_like(d) if one_d == "zero" else w.clone()
    if normalization == "none":
        return d
    if normalization == "layer":
        return d * (w.norm() / (d.norm() + 1e-10))
    rows_d, rows_w = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)
    scale = rows_w.norm(dim=1) / (rows_d.norm(dim=1) + 1e-10)
    return (rows_d * scale[:, None]).reshape(d.shape)


def random_directions(model: nn.Module, count: int = 2, seed: int = 0,
                      normalization: str = "filter", one_d: str = "zero") -> tuple[Direction, ...]:
    """``count`` Gaussian directions, normalised as Li et al. (2018).

    The draws come from one CPU ``torch.Generator`` seeded with ``seed``, parameter after
    parameter, direction after direction, in float32: the result depends on ``seed`` alone (not
    on the device or the global generator), and the first of ``count=2`` directions is the
    direction of ``count=1``.

    Args:
        model: the network at the surface's centre ``w``.
        count: number of directions (1 for a line, 2 for a plane).
        seed: seed of the generator.
        normalization: ``"filter"`` (per slice along dim 0), ``"layer"`` (per parameter tensor)
            or ``"none"`` (raw Gaussian).
        one_d: 1-D parameters set to ``"zero"`` or to the ``"weights"``.

    Raises:
        AnalysisError: an unknown option or ``count < 1``.
    """
    if normalization not in NORMALIZATIONS:
        raise AnalysisError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, "
                            f"got {normalization!r}")
    if one_d not in ONE_D:
        raise AnalysisError(f"one_d must be one of {', '.join(ONE_D)}, got {one_d!r}")
    if int(count) < 1:
        raise AnalysisError(f"count must be >= 1, got {count}")
    generator = torch.Generator().manual_seed(int(seed))
    layout = ParamLayout.of(model)
    weights = layout.unflatten(flat_parameters(model))
    directions = []
    for index in range(int(count)):
        parts = [_normalize(torch.randn(w.shape, generator=generator, dtype=torch.float32), w,
                            normalization, one_d) for w in weights]
        recipe = {"seed": int(seed), "index": index, "normalization": normalization,
                  "one_d": one_d}
        directions.append(Direction(layout.flatten(parts), "random", recipe))
    return tuple(directions)


def _fix_sign(vector: torch.Tensor) -> torch.Tensor:
    """An eigenvector's sign is arbitrary; make its largest-magnitude entry positive so that
    the same checkpoint always gives the same picture."""
    return vector if vector[vector.abs().argmax()] >= 0 else -vector


def eigen_directions(run, group: str, top: int = 1, bottom: int = 1, seed: int = 0,
                     max_steps: Optional[int] = None, tol: Optional[float] = None,
                     split: str = "train", params=None) -> tuple[Direction, ...]:
    """Unit eigenvectors of the Hessian of ``group``'s mean loss: the ``top`` largest, then the
    ``bottom`` smallest (algebraically: negative eigenvalues at a saddle); with ``params``
    (globs, :class:`landscape.hvp.GroupHessian`) those of that Hessian block, zero elsewhere.

    The vectors are not rescaled: a step of 1 moves the weights by 1 in Euclidean norm, and
    along a direction the surface's curvature at the centre is the eigenvalue
    (:math:`L(t v) \\approx L(0) + t \\langle g, v \\rangle + \\tfrac12 \\lambda t^2`).

    Args:
        run: a :class:`landscape.Run`.
        group: ``head``, ``tail``, ``all`` or class ids.
        top, bottom: how many eigenvectors of each end.
        seed: seed of Lanczos's start vector.
        max_steps, tol: Lanczos limits (``None``: :func:`landscape.eigen.extreme_eigenpairs`'s
            defaults).
        split: the group's samples, ``train`` or ``test``.
    """
    from landscape.hvp import GroupHessian
    from landscape.eigen import extreme_eigenpairs

    op = GroupHessian.from_run(run, group, split=split, params=params)
    options: dict[str, Any] = {}
    if max_steps is not None:
        options["max_steps"] = int(max_steps)
    if tol is not None:
        options["tol"] = float(tol)
    try:
        result = extreme_eigenpairs(op, top=top, bottom=bottom, seed=seed, **options)
    except ValueError as error:  # e.g. more eigenpairs asked for than there are parameters
        raise AnalysisError(str(error)) from None
    base = {"group": group if isinstance(group, str) else ",".join(map(str, group)),
            "split": split, "seed": int(seed), "max_steps": max_steps, "tol": tol,
            "loss": op.loss_name, "lanczos_steps": int(result.steps),
            **({} if params is None else {"params": list(op.param_patterns)})}
    directions = []
    for end, values, vectors, residuals in (
            ("top", result.top, result.top_vectors, result.top_residuals),
            ("bottom", result.bottom, result.bottom_vectors, result.bottom_residuals)):
        for rank in range(len(values)):
            v = torch.as_tensor(vectors[rank]).to("cpu", torch.float64)
            v = _fix_sign(op.full_layout.embed(op.layout, v / v.norm()))
            recipe = {**base, "end": end, "rank": rank, "eigenvalue": float(values[rank]),
                      "residual": float(residuals[rank])}
            directions.append(Direction(v.float(), "eigen", recipe))
    return tuple(directions)


def _label(model_or_run) -> tuple[nn.Module, dict]:
    if isinstance(model_or_run, nn.Module):
        return model_or_run, {}
    return model_or_run.model, {"checkpoint": str(model_or_run.path), "epoch": model_or_run.epoch}


def interpolation_direction(start, end, states: bool = True) -> Direction:
    r"""The line from ``start`` to ``end``: :math:`d = w_{end} - w_{start}`, so that
    :math:`\alpha = 0` is ``start`` and :math:`\alpha = 1` is ``end`` (surface centred at
    ``start``). Each may be a :class:`landscape.Run` or a module of the same architecture.

    With ``states`` (the default) the direction also moves the BatchNorm running statistics,
    :math:`s_{end} - s_{start}` (module docstring): both ends are then the checkpoints
    themselves. Without, every point uses the start's statistics.
    """
    model_a, info_a = _label(start)
    model_b, info_b = _label(end)
    if ParamLayout.of(model_a) != ParamLayout.of(model_b) or (
            states and _state_shapes(model_a) != _state_shapes(model_b)):
        raise AnalysisError("the two checkpoints have different parameters (not the same model)")
    w_a, w_b = flat_parameters(model_a, torch.float64), flat_parameters(model_b, torch.float64)
    recipe = {"start": info_a, "end": info_b, "states": bool(states)}
    moved = None
    if states and state_names(model_a):
        moved = (flat_states(model_b, torch.float64) - flat_states(model_a, torch.float64)).float()
    return Direction((w_b - w_a).float(), "interpolation", recipe, moved)


def interpolation_axis(points: int) -> np.ndarray:
    """``points`` evenly spaced coordinates from about -0.5 to 1.5 with 0 and 1 among them,
    exactly: the line's grid samples both checkpoints.

    >>> interpolation_axis(51)[[12, 37]].tolist(), interpolation_axis(5).tolist()
    ([0.0, 1.0], [-0.5, 0.0, 0.5, 1.0, 1.5])
    """
    if isinstance(points, bool) or int(points) != points or points < 2:
        raise AnalysisError(f"a grid needs at least 2 points per axis, got {points}")
    steps = int(points) - 1
    per_unit = max(1, -(-steps // 2))        # grid steps between alpha = 0 and alpha = 1
    before = (steps - per_unit) // 2
    return (np.arange(int(points)) - before) / per_unit


def _state_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    buffers = dict(model.named_buffers())
    return [(name, tuple(buffers[name].shape)) for name in state_names(model)]


@dataclass(frozen=True, eq=False)
class TrajectoryPCA:
    r"""The principal directions of a run's checkpoint trajectory and its projection.

    Attributes:
        directions: unit, orthogonal :class:`Direction` s, largest variance first.
        epochs: epoch of each trajectory checkpoint, oldest first.
        coordinates: ``(len(epochs), len(directions))``, the projection
            :math:`\langle w_i - w_{origin}, d_j \rangle` of each checkpoint.
        explained_variance_ratio: share of the trajectory's variance along each direction.
        origin_epoch: epoch of the checkpoint the surface is centred at.
    """

    directions: tuple[Direction, ...]
    epochs: tuple[int, ...]
    coordinates: np.ndarray
    explained_variance_ratio: tuple[float, ...]
    origin_epoch: int


def trajectory_pca(run, count: int = 2, paths: Optional[Sequence[Union[str, Path]]] = None,
                   ignore: Optional[str] = None) -> TrajectoryPCA:
    r"""PCA of the checkpoints of ``run``'s folder up to ``run.epoch`` (Li et al. 2018, sec. 7).

    The trajectory :math:`w_0, \dots, w_T` (the origin :math:`w_T` = ``run``'s checkpoint
    included) is centred and its top ``count`` right singular vectors, computed in float64, are
    the directions. The sign of each is chosen so that the oldest checkpoint has a negative
    coordinate: training then runs towards ``+`` along both axes and ends at the origin.

    Args:
        run: a :class:`landscape.Run`; its checkpoint is the origin.
        count: number of directions.
        paths: checkpoint files of the same run to use instead of the run folder's.
        ignore: ``"biasbn"`` leaves out the 1-D parameters (biases, BatchNorm scales and
            shifts; Li et al.'s ``--ignore biasbn``): the directions are zero there.

    Raises:
        AnalysisError: fewer than ``count + 1`` checkpoints, or a rank-deficient trajectory.
    """
    if ignore is not None and ignore not in IGNORE:
        raise AnalysisError(f"ignore must be one of {', '.join(IGNORE)}, got {ignore!r}")
    layout = ParamLayout.of(run.model)
    if paths is None:
        found = [(e, p) for e, p in ckpt.list_checkpoints(run.run_dir) if e <= run.epoch]
    else:
        found = []
        for path in paths:
            state = ckpt.load_checkpoint(path)
            found.append((int(state["epoch"]), Path(path)))
        found.sort()
    if len(found) < count + 1:
        raise AnalysisError(f"{run.run_dir}: PCA of {count} directions needs at least "
                            f"{count + 1} checkpoints up to epoch {run.epoch}, found {len(found)}")
    origin = flat_parameters(run.model, torch.float64)
    rows = []
    for _, path in found:
        try:
            w = layout.flatten_state(ckpt.load_checkpoint(path)["model"], torch.float64)
        except KeyError as missing:
            raise AnalysisError(f"{path}: no parameter {missing.args[0]!r} (another model?)") \
                from None
        rows.append(w - origin)
    offsets = torch.stack(rows)                      # (T + 1, n): w_i - w_origin
    if ignore == "biasbn":
        kept = layout.flatten([torch.full(shape, float(len(shape) > 1), dtype=torch.float64)
                               for shape in layout.shapes], dtype=torch.float64)
        offsets = offsets * kept
    centred = offsets - offsets.mean(dim=0, keepdim=True)
    _, singular, vt = torch.linalg.svd(centred, full_matrices=False)
    variance = singular ** 2
    if variance.sum() <= 0 or len(variance) < count or variance[count - 1] <= 1e-24 * variance[0]:
        raise AnalysisError(f"{run.run_dir}: the checkpoints span fewer than {count} directions")
    basis = vt[:count].clone()
    coordinates = offsets @ basis.T                  # (T + 1, count)
    for j in range(count):
        if coordinates[0, j] > 0:
            basis[j], coordinates[:, j] = -basis[j], -coordinates[:, j]
    ratio = (variance[:count] / variance.sum()).tolist()
    epochs = tuple(e for e, _ in found)
    directions = tuple(
        Direction(basis[j].float(), "pca",
                  {"index": j, "epochs": list(epochs), "origin_epoch": run.epoch,
                   "checkpoints": [str(p) for _, p in found],
                   "explained_variance_ratio": ratio[j], "ignore": ignore})
        for j in range(count))
    return TrajectoryPCA(directions, epochs, coordinates.numpy(), tuple(ratio), run.epoch)
