"""Loss surfaces against a slow per-point reference; resuming; the surface command."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import landscape
from landscape.directions import random_directions
from landscape.errors import AnalysisError
from landscape.surface import Surface, compute_surface, grid_axis
from _runs import train_digits


def _train(folder, **changes) -> str:
    return train_digits(folder, **{"epochs": 3, **changes})


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("mlp"))


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("cnn"), model="cnn", width=4, epochs=2)


def reference_surface(run, directions, alphas, betas, groups=("head", "tail", "all")):
    """The slow reference: for every grid point, a fresh float64 copy of the model gets the
    perturbed weights through load_state_dict, and each group is evaluated in its own pass
    over its own samples (plain mean cross-entropy, % of correct predictions)."""
    names = [name for name, _ in run.model.named_parameters()]
    shapes = [p.shape for p in run.model.parameters()]
    w = torch.cat([p.detach().reshape(-1) for p in run.model.parameters()]).double()
    vectors = [d.vector.double() for d in directions]
    data = {g: run.group_data(g) for g in groups}
    shape = (len(alphas),) if betas is None else (len(betas), len(alphas))
    loss = {g: np.zeros(shape) for g in groups}
    accuracy = {g: np.zeros(shape) for g in groups}
    for index in np.ndindex(*shape):
        coords = [alphas[index[-1]]] + ([] if betas is None else [betas[index[0]]])
        flat = w + sum(c * v for c, v in zip(coords, vectors))
        fresh = copy.deepcopy(run.model).double().eval()
        state = fresh.state_dict()
        offset = 0
        for name, shape_ in zip(names, shapes):
            size = int(np.prod(shape_))
            state[name] = flat[offset:offset + size].reshape(shape_)
            offset += size
        fresh.load_state_dict(state)
        with torch.no_grad():
            for g, (x, y) in data.items():
                logits = fresh(x.double())
                loss[g][index] = float(F.cross_entropy(logits, y))
                accuracy[g][index] = 100.0 * float((logits.argmax(1) == y).double().mean())
    return loss, accuracy


@pytest.mark.parametrize("fixture", ["mlp_run", "cnn_run"])
@pytest.mark.parametrize("method", ["loop", "vmap"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_surface_matches_the_per_point_reference(fixture, method, dtype, request):
    run = landscape.load(request.getfixturevalue(fixture), device="cpu")
    directions = random_directions(run.model, 2, seed=5)
    alphas, betas = grid_axis(4, -1.0, 0.5), grid_axis(3)  # not square: catches a transpose
    surface = compute_surface(run, directions, alphas, betas, dtype=dtype, method=method)
    loss, accuracy = reference_surface(run, directions, alphas, betas)
    assert surface.groups == ["head", "tail", "all"] and surface.complete
    # float64 agrees to rounding; float32 to its precision (a prediction at a near-tie may
    # flip, so accuracy may differ by one sample of the group).
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (2e-4, 2e-5)
    for g in surface.groups:
        assert surface.loss[g].shape == (3, 4)
        np.testing.assert_allclose(surface.loss[g], loss[g], rtol=rtol, atol=atol)
        one_sample = 100.0 / len(run.group_data(g)[1])
        tolerance = 1e-9 if dtype == torch.float64 else one_sample + 1e-9
        np.testing.assert_allclose(surface.accuracy[g], accuracy[g], rtol=0, atol=tolerance)


def test_one_dimensional_surface_is_the_middle_row_of_the_plane(mlp_run):
    run = landscape.load(mlp_run, device="cpu")
    plane = compute_surface(run, random_directions(run.model, 2, seed=1), grid_axis(5),
                            grid_axis(5), dtype=torch.float64)
    line = compute_surface(run, random_directions(run.model, 1, seed=1), grid_axis(5),
                           dtype=torch.float64)
    assert line.ndim == 1 and line.loss["tail"].shape == (5,)
    for g in line.groups:
        np.testing.assert_allclose(line.loss[g], plane.loss[g][2], rtol=1e-12)
    loss, accuracy = reference_surface(run, random_directions(run.model, 1, seed=1),
                                       grid_axis(5), None)
    np.testing.assert_allclose(line.loss["head"], loss["head"], rtol=1e-10)


def test_surface_leaves_the_model_and_batchnorm_statistics_alone(cnn_run):
    run = landscape.load(cnn_run, device="cpu")
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    surface = compute_surface(run, random_directions(run.model, 2, seed=0), grid_axis(3),
                              grid_axis(3))
    after = run.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not run.model.training
    # The centre of the grid is the checkpoint itself.
    x, y = run.group_data("all")
    with torch.no_grad():
        centre = float(F.cross_entropy(run.model(x), y))
    assert surface.loss["all"][1, 1] == pytest.approx(centre, rel=1e-5)


def test_interrupted_surface_resumes_where_it_stopped(mlp_run, tmp_path):
    run = landscape.load(mlp_run, device="cpu")
    directions = random_directions(run.model, 2, seed=2)
    path = tmp_path / "surface.npz"
    finished = []

    def interrupt_after_two_blocks(count):
        finished.append(count)
        if len(finished) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compute_surface(run, directions, grid_axis(5), grid_axis(5), path=path, save_every=3,
                        progress=interrupt_after_two_blocks)
    partial = Surface.load(path)
    assert partial.done.sum() == 6 and not partial.complete
    assert np.isnan(partial.loss["tail"][~partial.done]).all()
    assert np.isfinite(partial.loss["tail"][partial.done]).all()
    resumed_counts = []
    resumed = compute_surface(run, directions, grid_axis(5), grid_axis(5), path=path,
                              save_every=3, progress=resumed_counts.append)
    assert sum(resumed_counts) == 25 - 6  # only the missing points were evaluated
    whole = compute_surface(run, directions, grid_axis(5), grid_axis(5))
    for g in whole.groups:
        np.testing.assert_allclose(resumed.loss[g], whole.loss[g], rtol=1e-6)
        np.testing.assert_allclose(resumed.accuracy[g], whole.accuracy[g])
    again = []
    compute_surface(run, directions, grid_axis(5), grid_axis(5), path=path, progress=again.append)
    assert again == []  # a finished file is not recomputed


def test_file_with_other_settings_is_refused(mlp_run, tmp_path):
    run = landscape.load(mlp_run, device="cpu")
    path = tmp_path / "surface.npz"
    compute_surface(run, random_directions(run.model, 2, seed=0), grid_axis(3), grid_axis(3),
                    path=path)
    with pytest.raises(AnalysisError, match="other settings"):
        compute_surface(run, random_directions(run.model, 2, seed=1), grid_axis(3),
                        grid_axis(3), path=path)
    with pytest.raises(AnalysisError, match="other settings"):
        compute_surface(run, random_directions(run.model, 2, seed=0), grid_axis(4),
                        grid_axis(4), path=path)


def test_surface_file_records_how_to_recompute_it(mlp_run, tmp_path):
    run = landscape.load(mlp_run, device="cpu")
    path = tmp_path / "surface.npz"
    compute_surface(run, random_directions(run.model, 2, seed=4, one_d="weights"), grid_axis(3),
                    grid_axis(3), groups=["tail"], path=path)
    saved = Surface.load(path)
    assert saved.meta["checkpoint"] == str(run.path) and saved.meta["epoch"] == run.epoch
    assert saved.meta["groups"]["tail"] == run.groups["tail"] and saved.groups == ["tail", "all"]
    recipes = [d["recipe"] for d in saved.meta["directions"]]
    rebuilt = random_directions(landscape.load(saved.meta["checkpoint"], device="cpu").model, 2,
                                seed=recipes[0]["seed"], normalization=recipes[0]["normalization"],
                                one_d=recipes[0]["one_d"])
    assert [d.digest() for d in rebuilt] == [d["digest"] for d in saved.meta["directions"]]
    assert np.array_equal(saved.directions[1], rebuilt[1].vector.numpy())


def test_grid_and_direction_count_errors(mlp_run):
    run = landscape.load(mlp_run, device="cpu")
    with pytest.raises(AnalysisError, match="at least 2 points"):
        grid_axis(1)
    with pytest.raises(AnalysisError):
        grid_axis(5, 1.0, -1.0)
    with pytest.raises(AnalysisError, match="at least 2 points"):
        compute_surface(run, random_directions(run.model, 2), [0.0], [0.0, 1.0])
    with pytest.raises(AnalysisError, match="needs 2 direction"):
        compute_surface(run, random_directions(run.model, 1), grid_axis(3), grid_axis(3))


# The command ------------------------------------------------------------------------------


def test_surface_command_writes_data_png_and_offline_html(mlp_run, tmp_path, landscape_cli):
    out = tmp_path / "surf"
    code, stdout, _ = landscape_cli(["surface", mlp_run, "--grid", "5", "--groups", "head,tail",
                                     "--out", str(out), "--no_progress", "--save_every", "7"])
    assert code == 0 and "surface.npz" in stdout
    surface = Surface.load(out / "surface.npz")
    assert surface.complete and surface.loss["head"].shape == (5, 5)
    assert surface.meta["request"]["directions"] == "random"
    for group in ("head", "tail", "all"):
        for kind in ("contour", "3d"):
            assert (out / f"{group}_loss_{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "surface_loss.html").read_text()
    # plotly.js is inline (megabytes), and no script is fetched from anywhere: opens offline.
    assert len(html) > 1_000_000 and not re.search(r"<script[^>]*\bsrc=", html)
    # Rerunning the same command finds the finished file and only redraws.
    before = (out / "surface.npz").read_bytes()
    assert landscape_cli(["surface", mlp_run, "--grid", "5", "--out", str(out),
                          "--no_progress"])[0] == 0
    assert (out / "surface.npz").read_bytes() == before


@pytest.mark.slow
def test_surface_command_pca_eigen_and_interp(mlp_run, tmp_path, landscape_cli):
    pca = tmp_path / "pca"
    assert landscape_cli(["surface", mlp_run, "--directions", "pca", "--grid", "3",
                          "--out", str(pca), "--no_progress"])[0] == 0
    surface = Surface.load(pca / "surface.npz")
    coordinates = np.asarray(surface.meta["request"]["trajectory"]["coordinates"])
    assert surface.alphas.max() >= np.abs(coordinates).max()  # the grid covers the trajectory
    eigen = tmp_path / "eigen"
    assert landscape_cli(["surface", mlp_run, "--directions", "eigen", "--eigen_group", "tail",
                          "--grid", "3", "--out", str(eigen), "--no_progress"])[0] == 0
    kinds = [d["recipe"]["end"] for d in Surface.load(eigen / "surface.npz").meta["directions"]]
    assert kinds == ["top", "bottom"]
    line = tmp_path / "interp"
    assert landscape_cli(["surface", f"{mlp_run}/epoch_0000.pt", "--directions", "interp", "--to",
                          f"{mlp_run}/epoch_0003.pt", "--grid", "5", "--out", str(line),
                          "--no_progress"])[0] == 0
    surface = Surface.load(line / "surface.npz")
    assert surface.ndim == 1 and (line / "loss_line.png").exists()
    end = landscape.load(f"{mlp_run}/epoch_0003.pt", device="cpu")
    x, y = end.group_data("all")
    with torch.no_grad():
        end_loss = float(F.cross_entropy(end.model(x), y))
    assert surface.loss["all"][np.argmin(np.abs(surface.alphas - 1.0))] == pytest.approx(
        end_loss, rel=1e-4)  # alpha = 1 is the end checkpoint


@pytest.mark.parametrize("extra, message", [
    (["--grid", "1"], "--grid must be at least 2"),
    (["--groups", "head,middle"], "unknown group"),
    (["--directions", "interp"], "needs --to"),
    (["--range", "1", "-1"], "--range"),
])
def test_surface_command_bad_input(mlp_run, tmp_path, landscape_cli, extra, message):
    out = tmp_path / "never"
    code, stdout, stderr = landscape_cli(["surface", mlp_run, "--out", str(out), "--no_progress",
                                          *extra])
    assert code == 2 and message in stderr
    assert len(stderr.strip().splitlines()) == 1 and stdout == ""
    assert not out.exists()


def test_surface_command_missing_checkpoint(tmp_path, landscape_cli):
    code, _, stderr = landscape_cli(["surface", str(tmp_path / "nothing"), "--out",
                                     str(tmp_path / "out")])
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
