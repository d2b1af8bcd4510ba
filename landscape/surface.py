r"""1-D and 2-D loss and accuracy surfaces of class groups, resumable on disk.

A surface along directions :math:`d_1` (and :math:`d_2`) around the weights :math:`w` is

.. math::
    L_G(\alpha, \beta) = \frac{1}{|G|} \sum_{i \in G} \ell\big(f(x_i; w + \alpha d_1 + \beta d_2),
    y_i\big), \qquad
    A_G(\alpha, \beta) = \frac{100}{|G|} \sum_{i \in G} [\hat y_i = y_i],

for each group :math:`G` (``head``, ``tail``, and always ``all``: every sample of the split),
over the group's un-augmented samples, model in eval mode (BatchNorm uses the checkpoint's
running statistics, which are not perturbed), without gradients. One forward pass over the
evaluation set per grid point gives every group at once: the per-sample losses and hits are
reduced by a ``(groups, samples)`` membership matrix, in float64.

Arrays are indexed ``[j, i]`` = ``(beta_j, alpha_i)``: rows follow ``betas``, columns
``alphas`` (what ``matplotlib.contour(alphas, betas, Z)`` and plotly expect); a 1-D surface is
indexed ``[i]``.

The grid points are evaluated by :class:`landscape.evaluator.SurfaceEvaluator` (``method``:
``"loop"`` or ``"vmap"``).

The surface file (``.npz``) is rewritten atomically every ``save_every`` points with what is
done so far (``done`` mask, NaN elsewhere), so an interrupted computation resumes where it
stopped; it records the checkpoint, the directions (vectors, recipes and digests: seeds,
normalisation, Lanczos settings), the groups and their classes, the split, the loss and the
grid, which is everything needed to recompute it.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from landscape import _distributed
from landscape.directions import Direction
from landscape.errors import AnalysisError
from landscape.evaluator import METHODS, SurfaceEvaluator
from train.io import atomic_write_bytes

__all__ = ["Surface", "SurfaceEvaluator", "compute_surface", "grid_axis", "METHODS", "FORMAT"]

FORMAT = "landscape-surface/1"
# Settings that do not change the numbers beyond rounding: a file may be resumed with others.
_NOT_IDENTITY = ("method", "batch_size", "request")


def grid_axis(points: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """``points`` evenly spaced coordinates from ``low`` to ``high`` (both included).

    Raises:
        AnalysisError: fewer than 2 points, or ``low >= high``, or a non-finite bound.
    """
    if isinstance(points, bool) or int(points) != points or points < 2:
        raise AnalysisError(f"a grid needs at least 2 points per axis, got {points}")
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise AnalysisError(f"grid range must be finite with low < high, got [{low}, {high}]")
    return np.linspace(float(low), float(high), int(points))


@dataclass(frozen=True, eq=False)
class Surface:
    """A (possibly partial) surface and everything needed to recompute it.

    Attributes:
        alphas: coordinates along the first direction.
        betas: coordinates along the second direction; ``None`` for a 1-D surface.
        loss: group name -> mean loss, shape ``(len(betas), len(alphas))`` or ``(len(alphas),)``,
            NaN where not computed yet.
        accuracy: group name -> accuracy in %, same shape.
        done: bool mask of computed points, same shape.
        directions: the directions' flat float32 vectors.
        meta: JSON-able settings (checkpoint, epoch, directions' kinds / recipes / digests,
            groups and their classes, split, loss, dtype, ...).
        states: per direction ``None`` or its BatchNorm-statistics vector
            (:class:`landscape.directions.Direction`'s ``states``).
    """

    alphas: np.ndarray
    betas: Optional[np.ndarray]
    loss: Mapping[str, np.ndarray]
    accuracy: Mapping[str, np.ndarray]
    done: np.ndarray
    directions: tuple[np.ndarray, ...]
    meta: Mapping[str, Any]
    states: tuple[Optional[np.ndarray], ...] = ()

    @property
    def groups(self) -> list[str]:
        return list(self.loss)

    @property
    def ndim(self) -> int:
        return 1 if self.betas is None else 2

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def direction_objects(self) -> tuple[Direction, ...]:
        """The stored directions as :class:`Direction` s (to resume without recomputing)."""
        states = self.states or (None,) * len(self.directions)
        return tuple(Direction(torch.from_numpy(np.array(v, dtype=np.float32)), d["kind"],
                               d["recipe"], None if m is None else torch.from_numpy(
                                   np.array(m, dtype=np.float32)))
                     for v, d, m in zip(self.directions, self.meta["directions"], states))

    def centre(self, group: str = "all") -> tuple[float, float]:
        """``(loss, accuracy)`` of ``group`` at the grid point nearest the origin."""
        index = (int(np.abs(self.alphas).argmin()),)
        if self.betas is not None:
            index = (int(np.abs(self.betas).argmin()),) + index
        return float(self.loss[group][index]), float(self.accuracy[group][index])

    def to_bytes(self) -> bytes:
        arrays = {"alphas": self.alphas, "done": self.done,
                  "meta": np.array(json.dumps(dict(self.meta), sort_keys=True))}
        if self.betas is not None:
            arrays["betas"] = self.betas
        for k, name in enumerate(self.groups):
            arrays[f"loss_{k}"] = self.loss[name]
            arrays[f"accuracy_{k}"] = self.accuracy[name]
        for k, vector in enumerate(self.directions):
            arrays[f"direction_{k}"] = vector
        for k, moved in enumerate(self.states):
            if moved is not None:
                arrays[f"states_{k}"] = moved
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    def save(self, path: Union[str, Path]) -> None:
        """Atomically writes the ``.npz``: the old file or the new one, never half of one."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Surface":
        """Reads a surface file (no pickles).

        Raises:
            AnalysisError: not a readable surface file.
        """
        try:
            with np.load(path, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                if meta.get("format") != FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}, {FORMAT} expected")
                groups = meta["group_names"]
                return cls(
                    alphas=f["alphas"], betas=f["betas"] if "betas" in f else None,
                    loss={g: f[f"loss_{k}"] for k, g in enumerate(groups)},
                    accuracy={g: f[f"accuracy_{k}"] for k, g in enumerate(groups)},
                    done=f["done"].astype(bool),
                    directions=tuple(f[f"direction_{k}"] for k in range(len(meta["directions"]))),
                    meta=meta, states=tuple(f[f"states_{k}"] if f"states_{k}" in f else None
                                            for k in range(len(meta["directions"]))))
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as error:
            raise AnalysisError(f"{path}: not a readable surface file ({error})") from None


def _identity(meta: Mapping[str, Any]) -> dict:
    return {k: v for k, v in meta.items() if k not in _NOT_IDENTITY}


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    a, b = _identity(old), _identity(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _check_grid(alphas, betas, directions) -> tuple[np.ndarray, Optional[np.ndarray]]:
    alphas = np.asarray(alphas, dtype=np.float64)
    if betas is not None:
        betas = np.asarray(betas, dtype=np.float64)
    for axis in (alphas, betas):
        if axis is not None and (axis.ndim != 1 or len(axis) < 2):
            raise AnalysisError(f"a grid needs at least 2 points per axis, got {axis.size}")
    wanted = 1 if betas is None else 2
    if len(directions) != wanted:
        raise AnalysisError(f"a {wanted}-D surface needs {wanted} direction(s), "
                            f"got {len(directions)}")
    return alphas, betas


def _states_digest(direction: Direction) -> dict:
    """``{"states_digest": SHA-256}`` of a direction that moves the BatchNorm statistics."""
    if direction.states is None:
        return {}
    data = direction.states.float().contiguous().numpy().tobytes()
    return {"states_digest": hashlib.sha256(data).hexdigest()}


def _meta(run, directions, alphas, betas, names, classes, split, loss_name, dtype, method,
          batch_size, request) -> dict:
    """Everything that defines the surface (and the settings that do not, _NOT_IDENTITY)."""
    return {
        "format": FORMAT, "checkpoint": str(run.path), "epoch": int(run.epoch),
        "run_dir": str(run.run_dir), "dataset": run.config.dataset, "model": run.config.model,
        "directions": [{"kind": d.kind, "recipe": dict(d.recipe), "digest": d.digest(),
                        "norm": d.norm, **_states_digest(d)} for d in directions],
        "group_names": names, "groups": classes, "split": split, "loss": loss_name,
        "dtype": str(dtype).replace("torch.", ""), "alphas": alphas.tolist(),
        "betas": None if betas is None else betas.tolist(),
        "method": method, "batch_size": batch_size, "request": dict(request or {}),
    }


def _start(path, alphas, betas, names, vectors, meta, states=()) -> Surface:
    """An empty surface, or what the file at ``path`` holds of this one (to resume)."""
    shape = (len(alphas),) if betas is None else (len(betas), len(alphas))
    if path is None or not Path(path).exists():
        return Surface(alphas, betas, {g: np.full(shape, np.nan) for g in names},
                       {g: np.full(shape, np.nan) for g in names}, np.zeros(shape, dtype=bool),
                       vectors, meta, states)
    previous = Surface.load(path)
    changed = _changed(previous.meta, meta)
    if changed:
        raise AnalysisError(f"{path} holds a surface with other settings "
                            f"({', '.join(changed)}); remove it or choose another output")
    return Surface(alphas, betas, {g: previous.loss[g].copy() for g in names},
                   {g: previous.accuracy[g].copy() for g in names}, previous.done.copy(),
                   vectors, meta, states)


def _fill(surface: Surface, evaluator: SurfaceEvaluator, save_every: Optional[int], path,
          progress: Optional[Callable[[int], object]]) -> None:
    """Evaluates the points not done yet, block by block, saving after each block."""
    alphas, betas, names = surface.alphas, surface.betas, surface.groups
    if betas is None:
        coords = alphas[:, None]
    else:
        b, a = np.meshgrid(betas, alphas, indexing="ij")         # row j: beta_j
        coords = np.stack([a.reshape(-1), b.reshape(-1)], axis=1)
    flat_done = surface.done.reshape(-1)
    pending = np.flatnonzero(~flat_done)
    if save_every is None:
        save_every = len(alphas) if betas is not None else max(1, len(alphas) // 10)
    save_every = max(1, int(save_every))
    flat_loss = {g: surface.loss[g].reshape(-1) for g in names}      # views: writes land in place
    flat_acc = {g: surface.accuracy[g].reshape(-1) for g in names}
    for first in range(0, len(pending), save_every):
        block = pending[first:first + save_every]
        # Under torchrun the block's points are shared out and gathered on every rank.
        group_loss, group_acc = _distributed.evaluate_shared(evaluator, coords[block])
        for k, g in enumerate(names):
            flat_loss[g][block] = group_loss[:, k]
            flat_acc[g][block] = group_acc[:, k]
        flat_done[block] = True
        if path is not None and _distributed.is_writer():  # rank 0 writes under torchrun
            surface.save(path)
        if progress is not None:
            progress(len(block))


def compute_surface(run, directions: Sequence[Direction], alphas: Sequence[float],
                    betas: Optional[Sequence[float]] = None, *,
                    groups: Sequence[str] = ("head", "tail"), split: str = "train",
                    loss: Optional[str] = None, dtype: torch.dtype = torch.float32,
                    method: str = "loop", batch_size: Optional[int] = None,
                    path: Union[str, Path, None] = None, save_every: Optional[int] = None,
                    progress: Optional[Callable[[int], object]] = None,
                    request: Optional[Mapping[str, Any]] = None) -> Surface:
    """Computes (or resumes) the surface of ``run`` along one or two directions.

    Args:
        run: a :class:`landscape.Run`: the centre ``w`` and the data.
        directions: one direction (with ``betas=None``) or two.
        alphas, betas: grid coordinates (see :func:`grid_axis`).
        groups: group names (``head``, ``tail``, ``all``, or class ids like ``"0,3"``);
            ``all`` is added when absent.
        split: evaluation samples, ``train`` or ``test``.
        loss: per-sample loss name (default: the run's own).
        dtype: dtype of the forward passes (float32; float64 for references).
        method: ``"loop"`` or ``"vmap"``.
        batch_size: samples per forward pass.
        path: ``.npz`` to save to every ``save_every`` points and to resume from.
        save_every: points between saves (default: a row of the grid, or a tenth of a line).
        progress: called with the number of points finished after each block.
        request: caller's settings (e.g. the command line), stored in the file, not compared.

    Raises:
        AnalysisError: a grid with fewer than 2 points, a direction count that does not match
            the grid, or a file at ``path`` holding a surface with other settings.

    Example:
        >>> import landscape
        >>> from landscape.directions import random_directions
        >>> run = landscape.load(run_dir, device="cpu")
        >>> axis = grid_axis(5)
        >>> s = compute_surface(run, random_directions(run.model, 2, seed=0), axis, axis)
        >>> s.groups, s.loss["tail"].shape, s.complete
        (['head', 'tail', 'all'], (5, 5), True)
        >>> loss, accuracy = s.centre("all")          # at w itself
        >>> bool(loss < s.loss["all"].max()), 0 <= accuracy <= 100
        (True, True)
    """
    alphas, betas = _check_grid(alphas, betas, directions)
    names = list(dict.fromkeys(str(g) for g in groups))
    if "all" not in names:
        names.append("all")
    classes = {name: run.classes(name) for name in names}
    meta = _meta(run, directions, alphas, betas, names, classes, split, loss or run.config.loss,
                 dtype, method, batch_size, request)
    vectors = tuple(d.vector.float().numpy().copy() for d in directions)
    states = tuple(None if d.states is None else d.states.float().numpy().copy()
                   for d in directions)
    surface = _start(path, alphas, betas, names, vectors, meta, states)
    if surface.complete:
        return surface
    inputs, targets = run.group_data("all", split)
    memberships = torch.stack([torch.isin(targets, torch.tensor(classes[g], device=targets.device))
                               for g in names])
    evaluator = SurfaceEvaluator(run.model, run.loss_fn(loss), inputs, targets, memberships,
                                 [d.vector for d in directions], dtype=dtype, method=method,
                                 batch_size=batch_size, states=[d.states for d in directions])
    _fill(surface, evaluator, save_every, path, progress)
    return surface
