"""The per-class sweep against dense per-class Hessians, its cache, its command's bad input, and
the figures that show it (and the report's figures: scales, labels, NaN ratios)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import landscape
from landscape import plots
from landscape.errors import AnalysisError
from landscape.hvp import GroupHessian
from landscape.report import ReportSettings, build_report, write_report
from _reference import CNN_GROUP, dense_group_hessian, dense_hessian

TOL = dict(steps=300, tol=1e-7, trace_hvps=30)


def _check_against_dense(result, hessian: np.ndarray) -> None:
    eigenvalues = np.linalg.eigvalsh(hessian)
    scale = np.abs(eigenvalues).max()
    assert result.converged
    assert result.lambda_max == pytest.approx(eigenvalues[-1], abs=1e-6 * scale)
    assert result.lambda_min == pytest.approx(eigenvalues[0], abs=1e-6 * scale)
    assert result.ratio == pytest.approx(eigenvalues[0] / eigenvalues[-1], abs=1e-5)
    # Hutch++ is unbiased with the stated standard error: within 5 of them (or exact).
    assert abs(result.trace - np.trace(hessian)) <= 5 * result.trace_stderr + 1e-9 * scale


def test_mlp_classes_match_dense_hessians(tiny_mlp_path):
    run = landscape.load(tiny_mlp_path, device="cpu")
    sweep = landscape.class_sweep(run, "0,6,9", cache=False, **TOL)
    assert [r.class_id for r in sweep.classes] == [0, 6, 9]
    for r in sweep.classes:
        assert r.group == ("head" if r.class_id in run.groups["head"] else "tail")
        assert r.train_count == run.config.counts[r.class_id] == r.n_samples
        _check_against_dense(r, dense_group_hessian(run, [r.class_id]).numpy())


def test_class_sweep_dtype(tiny_mlp_path):
    """float32 products (a float64 recurrence) agree with float64 to float32's precision; the
    dtype is part of the cache key, and a bad one is refused."""
    run = landscape.load(tiny_mlp_path, device="cpu")
    f64 = landscape.class_sweep(run, "6", cache=False, dtype="float64", **TOL).classes[0]
    f32 = landscape.class_sweep(run, "6", cache=False, dtype="float32", **TOL).classes[0]
    assert f32.lambda_max == pytest.approx(f64.lambda_max, rel=1e-4)
    assert f32.lambda_max != f64.lambda_max  # really computed in another precision
    with pytest.raises(AnalysisError, match="dtype must be one of auto, float64, float32"):
        landscape.class_sweep(run, "6", cache=False, dtype="float16")


def test_cnn_class_with_batchnorm_and_vs_loss_and_subsample(tiny_cnn_path):
    run = landscape.load(tiny_cnn_path, device="cpu")
    c = CNN_GROUP[0]
    sweep = landscape.class_sweep(run, [c], samples=7, seed=3, cache=False, **TOL)
    (r,) = sweep.classes
    assert r.n_samples == 7 and r.train_count == run.config.counts[c] > 7
    x, y = run.group_data([c], samples=7, seed=3)
    _check_against_dense(r, dense_hessian(run.model, run.loss_fn(), x, y).numpy())


def test_cache_is_reused_and_json_round_trips(tiny_mlp_path, monkeypatch):
    run = landscape.load(tiny_mlp_path, device="cpu")
    first = landscape.class_sweep(run, [2, 8], steps=40, trace_hvps=9, density=True, probes=2)
    assert (run.run_dir / "hessian" / f"epoch_{run.epoch:04d}_class_8.json").exists()

    def no_hvp(self, V):
        raise AssertionError("an HVP on a cached class")

    monkeypatch.setattr(GroupHessian, "matmat", no_hvp)
    again = landscape.class_sweep(run, [2, 8], steps=40, trace_hvps=9, density=True, probes=2)
    assert json.dumps(again.to_json()) == json.dumps(first.to_json())
    np.testing.assert_allclose(again.classes[1].density.density, first.classes[1].density.density)
    with pytest.raises(AssertionError, match="cached class"):  # other settings: computed
        landscape.class_sweep(run, [2], steps=41, trace_hvps=9)
    data = first.to_json()
    assert data["settings"]["steps"] == 40 and data["classes"][1]["class_id"] == 8
    assert set(data["classes"][1]["density"]) >= {"nodes", "weights", "variance"}


def test_the_floor_is_a_setting_and_keys_the_cache(tiny_mlp_path):
    # A loose tolerance stops Lanczos early unless the floor holds it; a class cached without
    # the floor is not the answer with it (the cache key has min_steps), and the JSON says
    # which floor was used.
    from landscape.options import MIN_STEPS

    run = landscape.load(tiny_mlp_path, device="cpu")
    loose = dict(steps=60, tol=1e-2, trace_hvps=9)
    early = landscape.class_sweep(run, [8], min_steps=0, **loose)
    floored = landscape.class_sweep(run, [8], **loose)
    assert early.classes[0].lanczos_steps < MIN_STEPS <= floored.classes[0].lanczos_steps
    assert [s.to_json()["settings"]["min_steps"] for s in (early, floored)] == [0, MIN_STEPS]
    entries = json.loads((run.run_dir / "hessian" / f"epoch_{run.epoch:04d}_class_8.json")
                         .read_text())["entries"]
    assert sorted(e["key"]["min_steps"] for e in entries.values()
                  if e["key"]["kind"] == "class-extremes" and e["key"]["tol"] == 1e-2
                  ) == [0, MIN_STEPS]
    with pytest.raises(AnalysisError, match="min_steps must be an integer >= 0"):
        landscape.class_sweep(run, [8], min_steps=-1)


def test_command_defaults_are_the_settings_defaults():
    from landscape.classes import SweepSettings
    from landscape.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    args = subparsers["classes"].parse_args(["run"])
    names = [n for n in SweepSettings.__dataclass_fields__ if n not in ("density", "params")]
    assert {n: getattr(args, n) for n in names} == {n: getattr(SweepSettings(), n)
                                                    for n in names}
    args = subparsers["report"].parse_args(["run", "--out", "x"])
    from landscape._cli_report import _settings

    assert _settings(args) == ReportSettings()


def test_classes_command_and_figures(tiny_mlp_path, tmp_path, landscape_cli):
    out, js = tmp_path / "figs", tmp_path / "c.json"
    code, stdout, _ = landscape_cli(["classes", tiny_mlp_path, "--classes", "1,7", "--steps",
                                     "30", "--trace_hvps", "6", "--json", str(js), "--out",
                                     str(out), "--no_progress"])
    assert code == 0 and "| 7 | tail |" in stdout
    data = json.loads(js.read_text())
    assert [c["class_id"] for c in data["classes"]] == [1, 7]
    assert (out / "classes.png").read_bytes()[:4] == b"\x89PNG"
    html = (out / "classes.html").read_text()
    assert len(html) > 1_000_000  # plotly.js inline: opens offline
    figure = _plotly_figure(html)
    assert figure["layout"]["xaxis"]["type"] == "log"
    assert "training images" in figure["layout"]["xaxis3"]["title"]["text"]


def _plotly_figure(html: str) -> dict:
    """The figure JSON of a plotly HTML file (the Plotly.newPlot call's arguments)."""
    start = html.index("Plotly.newPlot(")
    body = html[start:]
    data_at = body.index("[")
    decoder = json.JSONDecoder()
    data, end = decoder.raw_decode(body, data_at)
    layout, _ = decoder.raw_decode(body, body.index("{", end))
    return {"data": data, "layout": layout}


@pytest.mark.parametrize("argv, message", [
    (["--classes", "12"], "class id 12"),
    (["--classes", "a,b"], "unknown group"),
    (["--steps", "0"], "steps must be"),
    (["--min_steps", "-1"], "min_steps must be"),
    (["--tol", "2"], "tol must be"),
    (["--samples", "0"], "samples must be"),
    (["--trace_hvps", "2"], "trace_hvps must be"),
    (["--json", "/no/such/folder/x.json"], "--json"),
])
def test_classes_bad_input_is_one_line(tiny_mlp_path, tmp_path, landscape_cli, argv, message):
    out = tmp_path / "never"
    code, stdout, stderr = landscape_cli(["classes", tiny_mlp_path, "--out", str(out),
                                          "--no_progress", *argv])
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert stdout == "" and not out.exists()


def _series(ratio_first: float, ratios: list[float]) -> dict:
    epochs = list(range(0, 5 * len(ratios) + 1, 5))
    values = [ratio_first] + ratios
    return {"head": {"epoch": epochs, "lambda_max": [2.0] * len(epochs),
                     "lambda_min": [2.0 * v for v in values], "ratio": values}}


def test_indicator_rows_are_scaled_to_the_epochs_after_the_first(tmp_path, monkeypatch):
    figures = []
    real = plots.save_png.__globals__["plt"].close
    monkeypatch.setattr("landscape._figures.plt.close", lambda fig: figures.append(fig))
    series = {"SGD": _series(-0.92, [-0.1, -0.024]), "SSE-SAM": _series(-0.93, [-0.1, -0.05])}
    plots.plot_indicators_png(series, tmp_path / "i.png", {"SSE-SAM": 7}, ("head",),
                              "digits: SGD, SSE-SAM")
    (fig,) = figures
    real(fig)
    axes = fig.axes
    assert axes[0].get_yscale() == "log" and fig._suptitle.get_text() == "digits: SGD, SSE-SAM"
    low, high = axes[2].get_ylim()  # the ratio row
    assert -0.2 < low < -0.1 and high > 0  # fits epochs 5, 10 and 0, not epoch 0's -0.93
    assert any("epoch 0 off scale" in t.get_text() for t in axes[2].texts)
    assert any(line.get_ydata()[0] == 0 and line.get_ydata()[-1] == 0 for line in axes[1].lines)


def test_report_renders_nan_ratios_and_html_matches(tmp_path, tiny_mlp_path, monkeypatch):
    """lambda_max <= 0 gives NaN ratios; the figures and tables are still written."""
    import landscape.report.cache as cache

    real = cache.cached_entry

    def negative(run, name, key, compute, use=True):
        result = real(run, name, key, compute, use)
        if name in ("head", "tail"):
            result = {**result, "lambda_max": -abs(result["lambda_max"])}
        return result

    monkeypatch.setattr(cache, "cached_entry", negative)
    settings = ReportSettings(steps=30, probes=2, classes="0,9")
    report = build_report([tiny_mlp_path], settings, device="cpu", cache=False)
    assert np.isnan(report.table_rows()[0]["tail_ratio"])
    out = tmp_path / "report"
    names = {p.name for p in write_report(report, out)}
    assert {"indicators.png", "classes.png", "classes.html", "densities.html"} <= names
    assert "–" in (out / "table.md").read_text()
    assert "## Per class" in (out / "report.md").read_text()
    figure = _plotly_figure((out / "indicators.html").read_text())
    assert figure["layout"]["yaxis"]["title"]["text"] == "λ<sub>max</sub>"
    assert figure["layout"]["xaxis5"]["title"]["text"] == "epoch"
    density = _plotly_figure((out / "densities.html").read_text())
    assert density["layout"]["yaxis"]["exponentformat"] == "power"
    colors = {t["name"]: t["line"]["color"] for t in density["data"]}
    assert colors == {"head": "#1f77b4", "tail": "#d62728"}  # the PNG's colours
