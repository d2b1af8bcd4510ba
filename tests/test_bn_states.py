"""Interpolation and PCA with BatchNorm (issue 10, point 5): the line between two checkpoints
moves the running statistics too, so that its ends are the checkpoints' own losses; its default
grid holds both ends; PCA can leave out the 1-D parameters. Checked against plain forward
passes of each checkpoint (float32; agreement to 1e-5 relative)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import landscape
from landscape.directions import (interpolation_axis, interpolation_direction, state_names,
                                  trajectory_pca)
from landscape.surface import Surface, compute_surface

from _runs import train_digits


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory) -> str:
    """A BatchNorm CNN with a checkpoint every epoch (0..3)."""
    return train_digits(tmp_path_factory.mktemp("bn"), model="cnn", width=4, epochs=3)


def _own_loss(run) -> float:
    """The checkpoint's mean training loss over all classes, by a plain forward pass."""
    x, y = run.group_data("all")
    with torch.no_grad():
        return float(run.loss_fn()(run.model(x), y).double().mean())


@pytest.fixture(scope="module")
def ends(bn_run):
    return (landscape.load(f"{bn_run}/epoch_0000.pt", device="cpu"),
            landscape.load(f"{bn_run}/epoch_0003.pt", device="cpu"))


@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_both_ends_of_the_line_are_the_checkpoints_own_losses(ends, method):
    start, end = ends
    assert state_names(start.model)  # the case holds: the model has BatchNorm statistics
    axis = interpolation_axis(5)
    assert axis.tolist() == [-0.5, 0.0, 0.5, 1.0, 1.5]
    line = compute_surface(start, [interpolation_direction(start, end)], axis, groups=["all"],
                           method=method)
    own = [_own_loss(start), _own_loss(end)]
    np.testing.assert_allclose(line.loss["all"][[1, 3]], own, rtol=1e-5)
    # Weights only (the start's statistics all along): alpha = 1 is not the end checkpoint.
    weights_only = compute_surface(start, [interpolation_direction(start, end, states=False)],
                                   axis, groups=["all"], method=method)
    assert weights_only.loss["all"][1] == pytest.approx(own[0], rel=1e-5)
    assert abs(weights_only.loss["all"][3] - own[1]) > 1e-2 * own[1]


def test_the_states_are_stored_and_resumed(ends, tmp_path):
    start, end = ends
    direction = interpolation_direction(start, end)
    path = tmp_path / "line.npz"
    first = compute_surface(start, [direction], interpolation_axis(3), groups=["all"],
                            path=path)
    stored = Surface.load(path).direction_objects()[0]
    assert torch.equal(stored.states, direction.states)
    again = compute_surface(start, [stored], interpolation_axis(3), groups=["all"], path=path)
    np.testing.assert_array_equal(again.loss["all"], first.loss["all"])
    assert "states_digest" in Surface.load(path).meta["directions"][0]


def test_the_command_samples_both_checkpoints_by_default(bn_run, ends, tmp_path,
                                                         landscape_cli):
    start, end = ends
    out = tmp_path / "interp"
    code, _, err = landscape_cli(["surface", f"{bn_run}/epoch_0000.pt", "--directions", "interp",
                                  "--to", f"{bn_run}/epoch_0003.pt", "--grid", "9",
                                  "--groups", "all", "--out", str(out), "--no_progress",
                                  "--device", "cpu"])
    assert code == 0, err
    line = Surface.load(out / "surface.npz")
    at = {float(a): k for k, a in enumerate(line.alphas)}
    assert 0.0 in at and 1.0 in at
    np.testing.assert_allclose([line.loss["all"][at[0.0]], line.loss["all"][at[1.0]]],
                               [_own_loss(start), _own_loss(end)], rtol=1e-5)


def test_the_default_interpolation_grid_holds_both_ends():
    for points in (2, 3, 4, 41, 51, 52):
        axis = interpolation_axis(points)
        assert len(axis) == points and 0.0 in axis.tolist() and 1.0 in axis.tolist()
        assert np.allclose(np.diff(axis), axis[1] - axis[0])
        assert axis[0] <= 0 and axis[-1] >= 1


def test_pca_can_leave_out_the_one_dimensional_parameters(bn_run):
    run = landscape.load(bn_run, device="cpu")
    full, kept = trajectory_pca(run), trajectory_pca(run, ignore="biasbn")
    layout = landscape.layout.ParamLayout.of(run.model)
    one_d = torch.cat([torch.full((int(np.prod(shape)),), len(shape) <= 1)
                       for shape in layout.shapes])
    assert one_d.any()
    for d in kept.directions:
        assert torch.count_nonzero(d.vector[one_d]) == 0 and d.norm == pytest.approx(1, abs=1e-6)
        assert d.recipe["ignore"] == "biasbn"
    assert any(torch.count_nonzero(d.vector[one_d]) > 0 for d in full.directions)
    basis = torch.stack([d.vector.double() for d in kept.directions])
    assert torch.allclose(basis @ basis.T, torch.eye(2, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("argv", [["--directions", "random", "--ignore", "biasbn"],
                                  ["--directions", "random", "--no_states"]])
def test_options_of_other_directions_are_refused(argv, bn_run, landscape_cli, tmp_path):
    code, _, err = landscape_cli(["surface", bn_run, *argv, "--out", str(tmp_path / "s"),
                                  "--no_progress"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
