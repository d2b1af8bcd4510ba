"""``python -m landscape hessian`` / ``spectrum`` and the Python API behind them.

Checked against the dense float64 Hessian (eigenvalues to 1e-6 relative, the trace within 4 of
its standard errors); bad input gives one line on stderr, exit status 2 and no output file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import landscape
from landscape.cli import main
from landscape.hessian import hessian_summary, spectral_densities

from _reference import dense_eigh, dense_group_hessian

REQUIRED = {"group", "classes", "n_samples", "loss", "top", "bottom", "residuals", "converged",
            "trace", "trace_stderr", "ratio", "hvps", "seconds"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mlp_path(tiny_mlp_path):
    return tiny_mlp_path


@pytest.fixture(scope="module")
def cnn_path(tiny_cnn_path):
    return tiny_cnn_path


@pytest.fixture(scope="module")
def tail_hessian(mlp_path):
    return dense_group_hessian(landscape.load(mlp_path, device="cpu"), "tail")


def test_hessian_command_writes_the_json_and_agrees_with_the_dense_hessian(
        mlp_path, tail_hessian, tmp_path, capsys):
    out = tmp_path / "tail.json"
    argv = ["hessian", mlp_path, "--group", "tail", "--top", "3", "--bottom", "2", "--trace",
            "--tol", "1e-10", "--json", str(out), "--no_progress", "--device", "cpu"]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert REQUIRED <= set(data)
    exact = dense_eigh(tail_hessian)
    np.testing.assert_allclose(data["top"], exact[::-1][:3], rtol=1e-6)
    np.testing.assert_allclose(data["bottom"], exact[:2], rtol=1e-6)
    assert data["ratio"] == pytest.approx(exact[0] / exact[-1], rel=1e-6)
    assert data["converged"] is True
    assert max(data["residuals"]["top"] + data["residuals"]["bottom"]) <= data["residual_tol"]
    assert abs(data["trace"] - float(torch.trace(tail_hessian))) < 4 * data["trace_stderr"]
    # Lanczos, one product per reported eigenvector (its true residual), the trace.
    assert data["hvps"] == data["lanczos_steps"] + 3 + 2 + data["trace_hvps"]
    assert data["reason"] is None
    assert (data["group"], data["classes"], data["loss"]) == ("tail", [4, 5, 6, 7, 8, 9], "CE")
    assert data["n_samples"] == 94
    assert "lambda_max" in capsys.readouterr().out
    # Same seed, same numbers (all but the wall time); another batch size, the same maths.
    again = tmp_path / "again.json"
    assert main(argv[:-5] + ["--json", str(again), "--no_progress", "--batch_size", "10"]) == 0
    second = json.loads(again.read_text())
    np.testing.assert_allclose(second["top"], data["top"], rtol=1e-9)
    assert main(argv[:-5] + ["--json", str(again), "--no_progress"]) == 0
    third = json.loads(again.read_text())
    assert {k: v for k, v in third.items() if k != "seconds"} == \
        {k: v for k, v in data.items() if k != "seconds"}


def test_repeated_zero_eigenvalues_of_dead_units_from_the_command_line(tmp_path_factory, tmp_path,
                                                                      capsys):
    # D8: a width-1 MLP, 78 of its 87 Hessian eigenvalues exactly 0; single-vector Lanczos
    # reported [7e-18, 0.0488, 0.058], converged.
    from _reference import cached_run

    path = cached_run(tmp_path_factory, "mlp-width1", model="mlp", width=1, epochs=4)
    exact = dense_eigh(dense_group_hessian(landscape.load(path, device="cpu"), "all"))
    out = tmp_path / "bottom.json"
    assert main(["hessian", path, "--bottom", "3", "--json", str(out), "--no_progress",
                 "--device", "cpu"]) == 0
    data = json.loads(out.read_text())
    np.testing.assert_allclose(data["bottom"], exact[:3], rtol=0, atol=1e-9 * exact[-1])
    assert data["converged"] is True and data["reason"] is None
    # Too few steps: not converged, and why, in the JSON and on stderr.
    assert main(["hessian", path, "--bottom", "3", "--max_steps", "3", "--json", str(out),
                 "--no_progress", "--device", "cpu"]) == 0
    data = json.loads(out.read_text())
    assert data["converged"] is False and data["reason"].startswith("max_steps reached")
    assert "not converged: max_steps reached" in capsys.readouterr().err


def test_min_steps_floor_from_the_command_line(mlp_path, tail_hessian, tmp_path, capsys):
    # A loose tolerance stops Lanczos early; --min_steps holds it to the floor, the JSON says
    # which floor was used, and the result is still the dense Hessian's.
    runs = {}
    for floor in (0, 40):
        out = tmp_path / f"floor{floor}.json"
        assert main(["hessian", mlp_path, "--group", "tail", "--tol", "1e-2", "--min_steps",
                     str(floor), "--json", str(out), "--no_progress", "--device", "cpu"]) == 0
        runs[floor] = json.loads(out.read_text())
    assert runs[0]["min_steps"] == 0 and runs[40]["min_steps"] == 40
    assert runs[0]["lanczos_steps"] < 40 <= runs[40]["lanczos_steps"]
    exact = dense_eigh(tail_hessian)
    assert runs[40]["top"][0] == pytest.approx(exact[-1], rel=1e-6)
    assert runs[40]["bottom"][0] == pytest.approx(exact[0], rel=1e-4)
    out = tmp_path / "bad.json"
    assert main(["hessian", mlp_path, "--min_steps", "-1", "--json", str(out)]) == 2
    assert "--min_steps must be >= 0" in _one_error_line(capsys)
    assert not out.exists()


class _Killed(Exception):
    pass


def test_a_journaled_summary_interrupted_resumes_to_the_same_digits(mlp_path, tmp_path):
    run = landscape.load(mlp_path, device="cpu")
    kwargs = dict(top=2, bottom=2, trace=True, trace_hvps=9, tol=1e-8, seed=3)
    whole = hessian_summary(run, "tail", **kwargs)
    calls = []  # the HVPs of each product (a block of 2 vectors counts 2), as they are done

    def killed_at(k):  # as a kill during the k-th product would: it is never written
        def progress(hvps):
            calls.append(hvps)
            if len(calls) == k:
                raise _Killed
        return progress

    folder = tmp_path / "journal"
    with pytest.raises(_Killed):
        hessian_summary(run, "tail", **kwargs, journal=folder, progress=killed_at(12))
    assert len(list(folder.glob("product_*.pt"))) == 11
    kept, calls[:] = sum(calls[:11]), []
    again = hessian_summary(run, "tail", **kwargs, journal=folder, progress=calls.append)
    assert sum(calls) == whole.provenance.hvps - kept  # the kept ones are not computed again
    assert again.top == whole.top and again.bottom == whole.bottom
    for end in ("top", "bottom"):
        np.testing.assert_array_equal(again.residuals[end], whole.residuals[end])
    assert (again.trace.value, again.trace.stderr) == (whole.trace.value, whole.trace.stderr)
    assert again.provenance.hvps == whole.provenance.hvps
    # Another group is another operator: the journal's products are not taken for its own.
    other = hessian_summary(run, "head", **kwargs, journal=folder)
    assert other.top == hessian_summary(run, "head", **kwargs).top


def test_journal_from_the_command_line_is_removed_but_not_the_users_files(mlp_path, tmp_path,
                                                                          capsys):
    folder = tmp_path / "journal"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    out = tmp_path / "tail.json"
    argv = ["hessian", mlp_path, "--group", "tail", "--json", str(out), "--no_progress",
            "--device", "cpu"]
    assert main(argv + ["--journal", str(folder)]) == 0
    journaled = json.loads(out.read_text())
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert main(argv) == 0
    plain = json.loads(out.read_text())
    assert journaled["top"] == plain["top"] and journaled["bottom"] == plain["bottom"]
    capsys.readouterr()
    for bad, says in (([str(out)], "not a folder"), ([str(folder), "--per_layer"], "per_layer")):
        target = tmp_path / "bad.json"
        assert main(["hessian", mlp_path, "--json", str(target), "--journal"] + bad) == 2
        assert says in _one_error_line(capsys)
        assert not target.exists()


@pytest.mark.slow
def test_group_as_class_ids_on_a_batchnorm_cnn_prints_json(cnn_path, capsys):
    assert main(["hessian", cnn_path, "--group", "7,8,9", "--top", "1", "--bottom", "1",
                 "--no_progress", "--split", "test", "--loss", "CE"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["classes"] == [7, 8, 9] and data["n_samples"] == 150  # 50 test images each
    assert data["loss"] == "CE" and data["split"] == "test" and data["trace"] is None
    run = landscape.load(cnn_path, device="cpu")
    exact = dense_eigh(dense_group_hessian(run, [7, 8, 9], split="test", loss="CE"))
    assert data["top"][0] == pytest.approx(exact[-1], rel=1e-6)


def test_python_api_for_the_saddle_report(mlp_path):
    run = landscape.load(mlp_path, device="cpu")
    s = hessian_summary(run, "head", top=1, bottom=1)
    assert s.ratio == pytest.approx(s.bottom[0] / s.top[0])
    assert s.top[0] > 0 and s.converged and s.provenance.loss == "CE"
    assert s.provenance.hvps == s.eigen.hvps and s.trace is None
    # One ratio convention: undefined (NaN, JSON null) unless both ends were computed.
    one_end = hessian_summary(run, "head", top=1, bottom=0)
    assert math.isnan(one_end.ratio) and one_end.to_json()["ratio"] is None
    json.dumps(s.to_json())  # plain JSON types only
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.ratio = 0.0


def test_spectrum_command_writes_data_and_offline_figures(mlp_path, cnn_path, tmp_path):
    out = tmp_path / "spectra"
    assert main(["spectrum", cnn_path, "--groups", "head,7+8+9", "--probes", "2", "--steps",
                 "8", "--out", str(out), "--no_progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "spectrum.html", "spectrum.json", "spectrum.npz", "spectrum.png"]
    with np.load(out / "spectrum.npz") as f:
        assert f["nodes_head"].shape == f["weights_head"].shape == (2, 8)
        assert f["grid_7,8,9"].shape == f["density_7,8,9"].shape == (10_000,)
    meta = json.loads((out / "spectrum.json").read_text())
    assert meta["classes"]["7,8,9"] == [7, 8, 9] and meta["groups"]["head"]["hvps"] == 16
    assert (out / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "spectrum.html").read_text()
    assert len(html) > 1_000_000  # plotly.js is inside the file
    # No script is fetched (the bundle's own text names a CDN only as a geo-map default).
    assert re.findall(r"<script[^>]*\bsrc=", html) == [] and "plotly" in html


def test_spectral_densities_api_equals_slq_per_group(mlp_path):
    run = landscape.load(mlp_path, device="cpu")
    both = spectral_densities(run, ["head", "tail"], probes=2, steps=6, seed=1)
    alone = spectral_densities(run, ["tail"], probes=2, steps=6, seed=1)
    assert list(both) == ["head", "tail"]
    assert np.array_equal(both["tail"].nodes, alone["tail"].nodes)


def _mismatched_copy(path: str, tmp_path: Path) -> str:
    copy = tmp_path / "mismatched"
    shutil.copytree(path, copy)
    config = json.loads((copy / "config.json").read_text())
    config["width"] = 9  # the weights are of a width-8 MLP
    (copy / "config.json").write_text(json.dumps(config))
    return str(copy)


BAD_HESSIAN = {"unknown group": ["--group", "middle"], "unknown class id": ["--group", "3,10"],
               "empty group": ["--group", ","], "k too large": ["--top", "100000"],
               "config mismatch": [], "bad device": ["--device", "tpu:0"]}
BAD_SPECTRUM = {"unknown group": ["--groups", "head,middle"],
                "unknown class id": ["--groups", "head,3+10"], "empty group": ["--groups", "head,"],
                "k too large": ["--steps", "0"], "config mismatch": [],
                "bad device": ["--device", "tpu:0"]}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("case", list(BAD_HESSIAN))
def test_bad_input_is_one_line_exit_2_and_no_file(case, mlp_path, tmp_path, capsys):
    path = _mismatched_copy(mlp_path, tmp_path) if case == "config mismatch" else mlp_path
    out = tmp_path / "out.json"
    assert main(["hessian", path, "--json", str(out)] + BAD_HESSIAN[case]) == 2
    err = _one_error_line(capsys)
    if case == "config mismatch":
        assert "config" in err
    assert not out.exists()
    spectra = tmp_path / "spectra"
    assert main(["spectrum", path, "--out", str(spectra)] + BAD_SPECTRUM[case]) == 2
    _one_error_line(capsys)
    assert not spectra.exists()


@pytest.mark.slow
def test_command_line_exit_status_in_a_subprocess(mlp_path, tmp_path):
    out = tmp_path / "x.json"
    done = subprocess.run([sys.executable, "-m", "landscape", "hessian", mlp_path, "--group",
                           "middle", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: unknown group 'middle' (head, tail, all, or class ids like 0,3,7)"]
    assert done.stdout == "" and not out.exists()


def test_density_plot_functions_write_files_and_the_symlog_axis_is_continuous(tmp_path):
    from landscape import plots

    grid = np.linspace(-2.0, 50.0, 500)
    densities = {"head": (grid, np.exp(-grid ** 2)), "tail": (grid, np.exp(-(grid - 1) ** 2))}
    png = plots.plot_density_panels_png({"t": densities}, tmp_path / "d.png")
    html = plots.plot_density_panels_html({"a": densities, "b": densities}, tmp_path / "d.html")
    assert png.read_bytes()[:4] == b"\x89PNG" and "plotly" in html.read_text()
    c = plots.symlog_threshold(densities)
    assert c == 0.01  # 1e-3 * 50, down to a power of ten
    x = np.array([-10 * c, -c, -c / 2, 0.0, c / 2, c, 10 * c, 100 * c])
    np.testing.assert_allclose(plots._symlog(x, c), [-2, -1, -0.5, 0, 0.5, 1, 2, 3])
    dense = np.linspace(-100 * c, 100 * c, 100_001)
    assert np.all(np.diff(plots._symlog(dense, c)) > 0)  # monotonic, no jump at +-c
