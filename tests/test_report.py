"""The saddle report: indicators against a dense Hessian, the per-checkpoint cache, the tables,
the report and demo commands, and bad input."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

import landscape
import landscape.hessian
from landscape.errors import AnalysisError
from landscape.report import (ReportSettings, build_report, group_indicators, select_checkpoints,
                              write_report)
from train import checkpoint as ckpt
from _runs import train_digits

FAST = ReportSettings(steps=40, probes=2, tol=1e-6)


def _train(folder, **changes) -> str:
    return train_digits(folder, **{"save_every": 2, "width": 8, **changes})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {opt: _train(root / opt, opt=opt) for opt in ("sgd", "ssesam")}


def test_indicators_match_the_dense_hessian(runs, tmp_path):
    """lambda_max, lambda_min and the ratio against LAPACK on the dense float64 Hessian of the
    group's mean loss (tests/_reference.py: torch.func, no landscape code)."""
    from _reference import dense_hessian

    run = landscape.load(runs["ssesam"], device="cpu")
    for group in ("head", "tail"):
        found = group_indicators(run, group, FAST, cache=False)
        x, y = run.group_data(group)
        eigenvalues = np.linalg.eigvalsh(dense_hessian(run.model, run.loss_fn(), x, y).numpy())
        scale = np.abs(eigenvalues).max()
        assert found.converged and found.epoch == 4 and found.group == group
        assert found.lambda_max == pytest.approx(eigenvalues[-1], abs=1e-5 * scale)
        assert found.lambda_min == pytest.approx(eigenvalues[0], abs=1e-5 * scale)
        assert found.ratio == pytest.approx(eigenvalues[0] / eigenvalues[-1], abs=1e-4)


def test_results_are_cached_per_checkpoint_and_keyed_by_settings(runs, monkeypatch):
    run = landscape.load(f"{runs['sgd']}/epoch_0002.pt", device="cpu")
    path = run.run_dir / "hessian" / "epoch_0002_tail.json"
    first = group_indicators(run, "tail", FAST)
    assert path.exists()
    calls = []
    real = landscape.hessian.hessian_summary

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(landscape.hessian, "hessian_summary", counting)
    assert group_indicators(run, "tail", FAST) == first and calls == []  # from the cache
    other = group_indicators(run, "tail", ReportSettings(steps=40, probes=2, tol=1e-6, seed=1))
    assert len(calls) == 1 and other.lambda_max == pytest.approx(first.lambda_max, rel=1e-4)
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 2 and {e["key"]["seed"] for e in entries.values()} == {0, 1}
    path.write_text("{not json")  # a damaged cache is recomputed, not trusted
    assert group_indicators(run, "tail", FAST).lambda_max == pytest.approx(first.lambda_max)
    assert len(calls) == 2


def test_select_checkpoints_every_k_keeps_the_last(runs):
    assert [e for e, _ in select_checkpoints(runs["sgd"], 1)] == [0, 2, 4]
    assert [e for e, _ in select_checkpoints(runs["sgd"], 4)] == [0, 4]
    assert [e for e, _ in select_checkpoints(runs["sgd"], 3)] == [0, 4]


@pytest.mark.slow
def test_report_tables_and_figures(runs, tmp_path):
    report = build_report([runs["sgd"], runs["ssesam"]], FAST, device="cpu")
    rows = report.table_rows()
    assert [r["optimizer"] for r in rows] == ["SGD", "SSE-SAM"]
    metrics = {r["epoch"]: r for r in ckpt.read_metrics(runs["ssesam"])}
    assert rows[1]["few"] == pytest.approx(metrics[4]["acc_few"])  # what training measured
    assert rows[1]["many"] == pytest.approx(metrics[4]["acc_many"])
    for row in rows:
        for group in ("head", "tail"):
            assert row[f"{group}_ratio"] == pytest.approx(
                row[f"{group}_lambda_min"] / row[f"{group}_lambda_max"])
    ssesam = report.runs[1]
    assert ssesam.switch_epoch == 3 and report.runs[0].switch_epoch is None  # ceil(0.7 * 4)
    assert ssesam.series("tail")["epoch"] == [0, 2, 4]
    out = tmp_path / "report"
    write_report(report, out)
    parsed = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert [r["run"] for r in parsed] == ["SGD", "SSE-SAM"]
    assert float(parsed[1]["tail_lambda_min"]) == pytest.approx(rows[1]["tail_lambda_min"],
                                                                rel=1e-5)
    markdown = (out / "table.md").read_text().splitlines()
    assert len(markdown) == 4 and "tail λmin/λmax" in markdown[0]
    for name in ("indicators.png", "densities.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    for name in ("indicators.html", "densities.html"):
        assert len((out / name).read_text()) > 1_000_000  # plotly.js inline: opens offline
    data = json.loads((out / "report.json").read_text())
    assert data["runs"][1]["switch_epoch"] == 3 and len(data["runs"][1]["indicators"]) == 6


def test_report_command(runs, tmp_path, landscape_cli):
    out = tmp_path / "out"
    code, stdout, _ = landscape_cli(["report", runs["sgd"], runs["ssesam"], "--out", str(out),
                                     "--steps", "40", "--probes", "2", "--tol", "1e-6",
                                     "--every", "4", "--no_progress"])
    assert code == 0 and "| SSE-SAM |" in stdout
    assert (out / "table.md").read_text() in stdout
    assert [i["epoch"] for i in json.loads((out / "report.json").read_text())["runs"][0][
        "indicators"]] == [0, 0, 4, 4]


def test_report_floor_reaches_lanczos_and_the_cache_key(runs, monkeypatch, landscape_cli,
                                                        tmp_path):
    from landscape.options import MIN_STEPS

    run = landscape.load(f"{runs['sgd']}/epoch_0000.pt", device="cpu")
    loose = dict(steps=60, probes=2, tol=1e-2)
    early = group_indicators(run, "head", ReportSettings(min_steps=0, **loose))
    floored = group_indicators(run, "head", ReportSettings(**loose))
    assert early.lanczos_steps < MIN_STEPS <= floored.lanczos_steps
    entries = json.loads((run.run_dir / "hessian" / "epoch_0000_head.json").read_text())
    assert sorted(e["key"]["min_steps"] for e in entries["entries"].values()
                  if e["key"]["tol"] == 1e-2) == [0, MIN_STEPS]
    out = tmp_path / "out"
    code, _, err = landscape_cli(["report", runs["sgd"], "--out", str(out), "--steps", "30",
                                  "--min_steps", "5", "--no_densities", "--every", "100",
                                  "--no_progress"])
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["settings"]["min_steps"] == 5
    assert "Lanczos, 5 to 30 steps" in (out / "report.md").read_text()


def test_report_bad_input(runs, tmp_path, landscape_cli):
    other_groups = _train(tmp_path / "eta", eta=20.0, epochs=1, save_every=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    ckpt.atomic_write_json(empty / "config.json", ckpt.read_config(runs["sgd"]))
    out = tmp_path / "never"
    cases = [
        ([runs["sgd"], other_groups], "cannot be compared"),
        ([runs["sgd"], str(empty)], "no epoch_NNNN.pt checkpoints"),
        ([runs["sgd"], str(tmp_path / "missing")], "missing"),
        ([runs["sgd"], runs["sgd"]], "given twice"),
        ([runs["sgd"], "--every", "0"], "every must be"),
        ([runs["sgd"], "--min_steps", "-1"], "min_steps must be"),
        ([runs["sgd"], "--groups", "middle"], "unknown or empty"),
    ]
    for argv, message in cases:
        code, stdout, stderr = landscape_cli(["report", *argv, "--out", str(out), "--no_progress"])
        assert code == 2 and message in stderr, (argv, stderr)
        assert len(stderr.strip().splitlines()) == 1 and stdout == ""
        assert not out.exists()
    with pytest.raises(AnalysisError):
        ReportSettings(steps=0)


@pytest.mark.slow
def test_demo_trains_four_optimizers_and_writes_the_report(tmp_path, landscape_cli, monkeypatch):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--epochs", "1", "--save_every", "1", "--steps", "20",
            "--probes", "2", "--no_progress"]
    code, stdout, _ = landscape_cli(argv)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO((out / "report" / "table.csv").read_text())))
    assert [r["optimizer"] for r in rows] == ["SGD", "SAM", "ImbSAM", "SSE-SAM"]
    for opt in ("sgd", "sam", "imbsam", "ssesam"):
        config = ckpt.read_config(out / opt)
        assert config["opt"] == opt and config["lr"] == 0.1 and config["imb_factor"] == 20
    # A rerun trains nothing and computes nothing: everything is on disk.
    monkeypatch.setattr(landscape.hessian, "hessian_summary", None)
    monkeypatch.setattr(landscape.hessian, "spectral_densities", None)
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/epoch_*.pt")}
    assert landscape_cli(argv)[0] == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/epoch_*.pt")} == before
