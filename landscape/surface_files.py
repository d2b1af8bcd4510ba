r"""Files around a loss surface: saved directions, a trajectory projected onto them, VTK export.

**Direction files.** A surface is only comparable with another along the same directions, so
they can be saved and reused (``python -m landscape surface --save_directions PATH``, then
``--directions file:PATH``). :func:`load_directions` reads either

* a directions file (format ``landscape-directions/1``, written by :func:`save_directions`): a
  NumPy ``.npz`` without pickles holding ``direction_0``, ``direction_1``, ... (flat float32
  vectors over the model's trainable parameters, in the order of
  :class:`landscape.layout.ParamLayout`) and ``meta``, a JSON string
  ``{"format", "n_params", "parameter_names", "directions": [{"kind", "recipe", "digest",
  "norm"}], "checkpoint", "epoch", "model"}``; or
* a surface file (``surface.npz``, :data:`landscape.surface.FORMAT`), whose directions it reuses.

Each vector's SHA-256 (:meth:`landscape.directions.Direction.digest`) is checked on reading.

**Trajectory.** :func:`project_trajectory` places each checkpoint :math:`w_i` of a run on the
plane (or line) of directions :math:`D = (d_1, \dots, d_k)` through the centre :math:`w`: the
least-squares coordinates

.. math::  c_i = \arg\min_c \lVert w + D^T c - w_i \rVert_2 = (D D^T)^{-1} D (w_i - w),

in float64, which are the inner products :math:`\langle w_i - w, d_j \rangle` for orthonormal
directions (PCA, eigenvectors) and still the nearest point of the plane for random ones. The
distance left, :math:`\lVert w + D^T c_i - w_i \rVert`, says how far the path runs off the
plane.

**VTK.** :func:`write_vtk` writes a 2-D surface as a legacy-format VTK structured grid
(``# vtk DataFile Version 3.0``, ASCII), which ParaView and VisIt open directly. The format is a
few lines of documented text (the VTK file-format guide), so it is written here rather than
through the ``vtk`` or ``pyevtk`` packages, which would be a large dependency for one file.

>>> import landscape, tempfile, os
>>> run = landscape.load(run_dir, device="cpu")
>>> found = landscape.random_directions(run.model, 2, seed=0)
>>> path = os.path.join(tempfile.mkdtemp(), "directions.npz")
>>> save_directions(path, found, run)
>>> again = load_directions(path, run)
>>> [d.digest() for d in again] == [d.digest() for d in found]
True
>>> path_of = project_trajectory(run, found)
>>> path_of.epochs[-1] == run.epoch, path_of.coordinates.shape, float(path_of.off_plane[-1])
(True, (4, 2), 0.0)
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from landscape.directions import Direction, flat_parameters
from landscape.errors import AnalysisError
from landscape.layout import ParamLayout
from train import checkpoint as ckpt
from train.io import atomic_write_bytes

__all__ = ["DIRECTIONS_FORMAT", "save_directions", "load_directions", "Trajectory",
           "project_trajectory", "write_vtk"]

DIRECTIONS_FORMAT = "landscape-directions/1"
_SURFACE_FORMAT = "landscape-surface/1"  # landscape.surface.FORMAT (not imported: no cycle)


def _direction_meta(directions: Sequence[Direction]) -> list[dict]:
    return [{"kind": d.kind, "recipe": dict(d.recipe), "digest": d.digest(), "norm": d.norm}
            for d in directions]


def save_directions(path: Union[str, Path], directions: Sequence[Direction], run) -> None:
    """Writes ``directions`` (taken at ``run``'s checkpoint) to ``path`` atomically, in the
    format of the module docstring."""
    layout = ParamLayout.of(run.model)
    meta = {"format": DIRECTIONS_FORMAT, "n_params": layout.n,
            "parameter_names": list(layout.names), "directions": _direction_meta(directions),
            "checkpoint": str(run.path), "epoch": int(run.epoch), "model": run.config.model}
    arrays = {f"direction_{k}": d.vector.float().numpy() for k, d in enumerate(directions)}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_directions(path: Union[str, Path], run) -> tuple[Direction, ...]:
    """The directions saved in ``path`` (a directions file or a ``surface.npz``), checked
    against their digests and against ``run``'s parameters.

    Raises:
        AnalysisError: unreadable file, another format, a digest that does not match, or
            vectors of another model (one line naming the file).
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            kinds = meta.get("directions") if isinstance(meta, dict) else None
            if meta.get("format") not in (DIRECTIONS_FORMAT, _SURFACE_FORMAT) or not kinds:
                raise ValueError(f"format {meta.get('format')!r}, not a directions or surface "
                                 "file")
            vectors = [np.array(f[f"direction_{k}"], dtype=np.float32)
                       for k in range(len(kinds))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile,
            EOFError) as error:
        raise AnalysisError(f"{path}: not a readable directions file ({error})") from None
    n = ParamLayout.of(run.model).n
    found = []
    for k, (vector, info) in enumerate(zip(vectors, kinds)):
        if vector.ndim != 1 or vector.size != n:
            raise AnalysisError(f"{path}: direction {k} has {vector.size} entries, the model "
                                f"{n} parameters (directions of another model)")
        direction = Direction(torch.from_numpy(vector), str(info.get("kind", "file")),
                              {**dict(info.get("recipe", {})), "file": str(path)})
        if direction.digest() != info.get("digest"):
            raise AnalysisError(f"{path}: direction {k} does not match its digest (altered)")
        found.append(direction)
    return tuple(found)


@dataclass(frozen=True, eq=False)
class Trajectory:
    """A run's checkpoints placed on a surface's directions (module docstring).

    Attributes:
        epochs: the checkpoints' epochs, oldest first (up to the centre's).
        coordinates: ``(len(epochs), k)`` least-squares coordinates.
        off_plane: ``(len(epochs),)`` distance of each checkpoint from the plane.
    """

    epochs: tuple[int, ...]
    coordinates: np.ndarray
    off_plane: np.ndarray

    def to_json(self) -> dict:
        return {"epochs": list(self.epochs), "coordinates": self.coordinates.tolist(),
                "off_plane": self.off_plane.tolist()}


def project_trajectory(run, directions: Sequence[Direction]) -> Trajectory:
    """Projects the checkpoints of ``run``'s folder up to ``run.epoch`` onto ``directions``
    through ``run``'s weights.

    Raises:
        AnalysisError: no checkpoint, linearly dependent directions, or a checkpoint of another
            model.
    """
    layout = ParamLayout.of(run.model)
    found = [(e, p) for e, p in ckpt.list_checkpoints(run.run_dir) if e <= run.epoch]
    if not found:
        raise AnalysisError(f"{run.run_dir}: no checkpoint to draw a trajectory from")
    basis = torch.stack([d.vector.to(torch.float64) for d in directions])   # (k, n)
    gram = basis @ basis.T
    if torch.linalg.matrix_rank(gram) < len(directions):
        raise AnalysisError("the directions are linearly dependent: no plane to project on")
    origin = flat_parameters(run.model, torch.float64)
    coordinates, off_plane = [], []
    for _, path in found:
        state = ckpt.load_checkpoint(path)["model"]
        missing = [name for name in layout.names if name not in state]
        if missing:
            raise AnalysisError(f"{path}: no parameter {missing[0]!r} (another model?)")
        offset = layout.flatten_state(state, torch.float64) - origin
        c = torch.linalg.solve(gram, basis @ offset)
        coordinates.append(c.numpy())
        off_plane.append(float((offset - basis.T @ c).norm()))
    return Trajectory(tuple(e for e, _ in found), np.array(coordinates), np.array(off_plane))


def write_vtk(surface, path: Union[str, Path], height: str = "all") -> Path:
    """Writes a 2-D ``surface`` as a legacy ASCII VTK structured grid: points
    ``(alpha, beta, loss of group height)``, and as point data the loss and accuracy of every
    group (``loss_GROUP``, ``accuracy_GROUP``; NaN where a point is not computed). Points run
    along ``alphas`` fastest (VTK's order), i.e. ``surface.loss[g].reshape(-1)``.

    Raises:
        AnalysisError: a 1-D surface, or ``height`` not one of its groups.
    """
    if surface.ndim != 2:
        raise AnalysisError("VTK export needs a 2-D surface (this one is a line)")
    if height not in surface.groups:
        raise AnalysisError(f"no group {height!r} in the surface ({', '.join(surface.groups)})")
    beta, alpha = np.meshgrid(surface.betas, surface.alphas, indexing="ij")
    z = np.asarray(surface.loss[height], dtype=np.float64)
    count = z.size
    lines = ["# vtk DataFile Version 3.0",
             f"landscape surface: {surface.meta.get('checkpoint')} (z = {height} loss)",
             "ASCII", "DATASET STRUCTURED_GRID",
             f"DIMENSIONS {len(surface.alphas)} {len(surface.betas)} 1",
             f"POINTS {count} double"]
    lines += [f"{a!r} {b!r} {h!r}" for a, b, h in zip(alpha.reshape(-1).tolist(),
                                                      beta.reshape(-1).tolist(),
                                                      z.reshape(-1).tolist())]
    lines.append(f"POINT_DATA {count}")
    for group in surface.groups:
        for quantity, table in (("loss", surface.loss), ("accuracy", surface.accuracy)):
            values = np.asarray(table[group], dtype=np.float64).reshape(-1).tolist()
            lines += [f"SCALARS {quantity}_{_vtk_name(group)} double 1", "LOOKUP_TABLE default"]
            lines += [repr(v) for v in values]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("ascii"))
    return Path(path)


def _vtk_name(group: str) -> str:
    """A VTK array name has no spaces; class-id groups ``0,3`` become ``0_3``."""
    return "".join(c if c.isalnum() else "_" for c in group)
