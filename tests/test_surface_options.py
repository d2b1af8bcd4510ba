"""Issue 11, point 3: the surface command's --loss, contour bands (--levels, --vmin/--vmax,
--scale), saved direction files (--save_directions, --directions file:PATH), trajectories
projected onto any directions (--trajectory) and VTK export (--vtk), each against an independent
computation, and their bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import landscape
from landscape.directions import random_directions, trajectory_pca
from landscape.surface import Surface
from landscape.surface_files import (load_directions, project_trajectory, save_directions,
                                     write_vtk)
from train import checkpoint as ckpt
from _runs import train_digits


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_digits(tmp_path_factory.mktemp("opts"), epochs=3)  # checkpoints 0, 1, 2, 3


def _surface(landscape_cli, run_dir, out, *extra) -> Surface:
    code, _, err = landscape_cli(["surface", run_dir, "--grid", "5", "--out", str(out),
                                  "--no_progress", *extra])
    assert code == 0, err
    return Surface.load(out / "surface.npz")


def test_loss_option_evaluates_that_loss(run_dir, tmp_path, landscape_cli):
    surface = _surface(landscape_cli, run_dir, tmp_path / "s", "--loss", "LDAM")
    run = landscape.load(run_dir, device="cpu")
    x, y = run.group_data("all")
    with torch.no_grad():
        ldam = float(run.loss_fn("LDAM")(run.model(x), y).mean())
        ce = float(run.loss_fn("CE")(run.model(x), y).mean())
    assert surface.meta["loss"] == "LDAM" and abs(ldam - ce) > 1e-2
    assert surface.centre("all")[0] == pytest.approx(ldam, rel=1e-5)


def test_contour_bands_follow_levels_vmin_vmax_and_scale(run_dir, tmp_path, landscape_cli,
                                                         monkeypatch):
    import matplotlib.axes

    seen = []
    real = matplotlib.axes.Axes.contourf

    def recording(self, *args, **kwargs):
        seen.append(np.asarray(kwargs["levels"]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "contourf", recording)
    _surface(landscape_cli, run_dir, tmp_path / "log", "--levels", "8", "--vmin", "0.1",
             "--vmax", "10")
    assert len(seen) == 3  # head, tail, all
    assert all(len(edges) == 9 for edges in seen)
    np.testing.assert_allclose(seen[0], np.linspace(-1, 1, 9))  # log10 of 0.1 .. 10
    seen.clear()
    surface = _surface(landscape_cli, run_dir, tmp_path / "lin", "--levels", "4", "--scale",
                       "linear")
    tail = surface.loss["tail"]
    np.testing.assert_allclose(seen[1], np.linspace(tail.min(), tail.max(), 5))


def test_saved_directions_give_the_same_surface(run_dir, tmp_path, landscape_cli):
    saved = tmp_path / "dirs.npz"
    first = _surface(landscape_cli, run_dir, tmp_path / "a", "--seed", "3",
                     "--save_directions", str(saved))
    again = _surface(landscape_cli, run_dir, tmp_path / "b", "--directions", f"file:{saved}")
    from_surface = _surface(landscape_cli, run_dir, tmp_path / "c", "--directions",
                            f"file:{tmp_path / 'a' / 'surface.npz'}")
    for other in (again, from_surface):
        assert [d["digest"] for d in other.meta["directions"]] == [
            d["digest"] for d in first.meta["directions"]]
        for group in first.groups:
            np.testing.assert_array_equal(other.loss[group], first.loss[group])
    run = landscape.load(run_dir, device="cpu")
    expected = random_directions(run.model, 2, seed=3)
    assert [d.digest() for d in load_directions(saved, run)] == [d.digest() for d in expected]
    line = _surface(landscape_cli, run_dir, tmp_path / "d", "--directions", f"file:{saved}",
                    "--dim", "1")
    assert line.ndim == 1 and line.meta["directions"][0]["digest"] == expected[0].digest()


def test_direction_file_refuses_other_models_and_altered_vectors(run_dir, tmp_path):
    run = landscape.load(run_dir, device="cpu")
    other = landscape.load(train_digits(tmp_path / "wide", epochs=1, width=16), device="cpu")
    path = tmp_path / "dirs.npz"
    save_directions(path, random_directions(other.model, 2, seed=0), other)
    with pytest.raises(landscape.errors.AnalysisError, match="another model"):
        load_directions(path, run)
    with np.load(path) as f:
        arrays = dict(f)
    arrays["direction_1"] = arrays["direction_1"] * 2
    np.savez(path, **arrays)
    with pytest.raises(landscape.errors.AnalysisError, match="digest"):
        load_directions(path, other)


def _flat(path) -> np.ndarray:
    state = ckpt.load_checkpoint(path)["model"]
    return np.concatenate([state[k].double().numpy().ravel() for k in state
                           if not k.endswith(("running_mean", "running_var",
                                              "num_batches_tracked"))])


def test_trajectory_is_the_least_squares_projection(run_dir):
    run = landscape.load(run_dir, device="cpu")
    directions = random_directions(run.model, 2, seed=1)
    found = project_trajectory(run, directions)
    basis = np.stack([d.vector.double().numpy() for d in directions]).T      # (n, 2)
    origin = _flat(ckpt.checkpoint_path(run_dir, run.epoch))
    assert found.epochs == (0, 1, 2, 3)
    for e, coords, off in zip(found.epochs, found.coordinates, found.off_plane):
        offset = _flat(ckpt.checkpoint_path(run_dir, e)) - origin
        expected, *_ = np.linalg.lstsq(basis, offset, rcond=None)
        np.testing.assert_allclose(coords, expected, rtol=1e-9, atol=1e-12)
        assert off == pytest.approx(np.linalg.norm(offset - basis @ expected), rel=1e-9)
    pca = trajectory_pca(run)  # orthonormal directions: the PCA's own coordinates
    np.testing.assert_allclose(project_trajectory(run, pca.directions).coordinates,
                               pca.coordinates, atol=1e-6)


def test_trajectory_option_stores_and_draws_the_path(run_dir, tmp_path, landscape_cli,
                                                     monkeypatch):
    from landscape import plots

    drawn = []
    real = plots.plot_surface_contour_png

    def recording(surface, path, group, quantity="loss", trajectory=None, *args, **kwargs):
        drawn.append(trajectory)
        return real(surface, path, group, quantity, trajectory, *args, **kwargs)

    monkeypatch.setattr(plots, "plot_surface_contour_png", recording)
    surface = _surface(landscape_cli, run_dir, tmp_path / "t", "--trajectory")
    stored = surface.meta["request"]["trajectory"]
    run = landscape.load(run_dir, device="cpu")
    expected = project_trajectory(run, surface.direction_objects())
    assert stored["epochs"] == [0, 1, 2, 3]
    np.testing.assert_allclose(stored["coordinates"], expected.coordinates)
    assert len(drawn) == 3 and all(np.allclose(t, expected.coordinates) for t in drawn)
    reach = max(1.0, 1.2 * np.abs(expected.coordinates).max())  # the grid covers the path
    assert surface.alphas[0] == pytest.approx(-reach) and surface.alphas[-1] == pytest.approx(reach)


def _read_vtk(path):
    """A small reader of the legacy ASCII structured grid, written from the VTK file-format
    guide (not from landscape's writer)."""
    tokens = path.read_text().split("\n")
    assert tokens[0].startswith("# vtk DataFile Version") and tokens[2] == "ASCII"
    words = " ".join(tokens[3:]).split()
    assert words[:2] == ["DATASET", "STRUCTURED_GRID"] and words[2] == "DIMENSIONS"
    nx, ny, nz = map(int, words[3:6])
    assert words[6] == "POINTS" and int(words[7]) == nx * ny * nz
    count = nx * ny * nz
    points = np.array(words[9:9 + 3 * count], dtype=float).reshape(count, 3)
    rest = words[9 + 3 * count:]
    assert rest[:2] == ["POINT_DATA", str(count)]
    arrays, k = {}, 2
    while k < len(rest):
        assert rest[k] == "SCALARS" and rest[k + 3] == "1" and rest[k + 4:k + 6] == [
            "LOOKUP_TABLE", "default"]
        arrays[rest[k + 1]] = np.array(rest[k + 6:k + 6 + count], dtype=float)
        k += 6 + count
    return (nx, ny, nz), points, arrays


def test_vtk_export_reads_back(run_dir, tmp_path, landscape_cli):
    path = tmp_path / "surface.vtk"
    surface = _surface(landscape_cli, run_dir, tmp_path / "v", "--vtk", str(path), "--range",
                       "-0.5", "0.5")
    dims, points, arrays = _read_vtk(path)
    assert dims == (5, 5, 1)
    for j, beta in enumerate(surface.betas):          # x fastest: point (i, j) is j * nx + i
        for i, alpha in enumerate(surface.alphas):
            assert tuple(points[j * 5 + i]) == (alpha, beta, surface.loss["all"][j, i])
    assert sorted(arrays) == sorted(f"{q}_{g}" for q in ("loss", "accuracy")
                                    for g in surface.groups)
    for g in surface.groups:
        np.testing.assert_array_equal(arrays[f"loss_{g}"].reshape(5, 5), surface.loss[g])
        np.testing.assert_array_equal(arrays[f"accuracy_{g}"].reshape(5, 5), surface.accuracy[g])
    with pytest.raises(landscape.errors.AnalysisError, match="2-D"):
        line = Surface(surface.alphas, None, {}, {}, surface.done[0], (), {})
        write_vtk(line, tmp_path / "line.vtk")


@pytest.mark.parametrize("extra, message", [
    (["--levels", "1"], "--levels must be at least 2"),
    (["--vmin", "2", "--vmax", "1"], "--vmin must be below --vmax"),
    (["--vmin", "0"], "a log scale needs --scale linear"),
    (["--vmax", "nan"], "--vmax must be finite"),
    (["--scale", "cubic"], "invalid choice"),
    (["--loss", "focal"], "invalid choice"),
    (["--directions", "file:"], "file:PATH"),
    (["--directions", "file:/no/such/dirs.npz"], "no such file"),
    (["--vtk", "/no/such/folder/s.vtk"], "not a file in an existing folder"),
    (["--save_directions", "/no/such/folder/d.npz"], "not a file in an existing folder"),
    (["--vtk", "s.vtk", "--dim", "1"], "--vtk writes a 2-D surface"),
    (["--trajectory", "--dim", "1"], "--trajectory is drawn on a 2-D surface"),
])
def test_surface_option_bad_input(run_dir, tmp_path, landscape_cli, extra, message):
    out = tmp_path / "never"
    code, stdout, stderr = landscape_cli(["surface", run_dir, "--out", str(out), "--no_progress",
                                          *extra])
    assert code == 2 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and stdout == ""
    assert not out.exists()


def test_a_file_that_is_not_a_direction_file_is_one_line(run_dir, tmp_path, landscape_cli):
    bogus = tmp_path / "bogus.npz"
    bogus.write_bytes(b"not a zip")
    out = tmp_path / "never"
    code, _, stderr = landscape_cli(["surface", run_dir, "--out", str(out), "--no_progress",
                                     "--directions", f"file:{bogus}"])
    assert code == 2 and "not a readable directions file" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not out.exists()
