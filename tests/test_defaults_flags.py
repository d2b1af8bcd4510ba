"""Issue 11, point 5: dataset-aware training defaults, --threads on every command, one warning
line for an optimizer setting the chosen optimizer ignores, and report skipping folders that are
not runs."""

from __future__ import annotations

import json

import numpy as np

import pytest
import torch

from train import cli as train_cli
from train.config import Config
from train.data import SPECS
from train.optim import READS, ignored_flags


def test_training_defaults_follow_the_dataset():
    digits, cifar = Config(), Config(dataset="cifar100")
    assert (digits.lr, digits.epochs) == (SPECS["digits"].default_lr,
                                          SPECS["digits"].default_epochs) == (0.1, 60)
    assert (cifar.lr, cifar.epochs) == (0.01, 200)  # the seed README's
    assert (Config(lr=0.03, epochs=7).lr, Config(lr=0.03, epochs=7).epochs) == (0.03, 7)
    stored = Config().to_json()  # config.json holds the resolved values, not null
    assert (stored["lr"], stored["epochs"]) == (0.1, 60)
    assert Config.from_json({**stored, "lr": None, "epochs": None}) == Config()


def test_help_shows_the_per_dataset_defaults():
    text = train_cli.build_parser().format_help()
    assert "60 for digits" in text and "0.1 for digits" in text and "0.01 for cifar10" in text
    assert "[None]" not in text


def test_ignored_flags_follow_the_presets():
    assert ignored_flags("sgd", ["rho", "head_rho", "lr"]) == ["rho", "head_rho"]
    assert ignored_flags("ssesam", ["rho", "head_rho", "gamma"]) == ["rho"]
    assert ignored_flags("sam", ["tail_scale", "gamma", "rho"]) == ["gamma", "tail_scale"]
    assert ignored_flags("imbsam", ["rho", "tail_scale"]) == []
    for opt, reads in READS.items():  # what a preset reads is never called ignored
        assert ignored_flags(opt, reads) == []


def test_an_ignored_flag_is_one_warning_line_and_training_goes_on(capsys, tmp_path):
    config, *_, notices = train_cli.parse(["--opt", "sgd", "--rho", "0.2", "--head_rho", "0.1"])
    assert notices == ["warning: --opt sgd ignores --rho, --head_rho"]
    assert config.opt == "sgd" and config.rho == 0.2
    assert train_cli.parse(["--opt", "ssesam", "--head_rho", "0.1", "--gamma", "0.5"])[-1] == []
    argv = ["--opt", "sgd", "--rho", "0.2", "--epochs", "1", "--width", "4", "--no_progress",
            "--out", str(tmp_path / "run")]
    assert train_cli.main(argv) == 0  # said once training starts, and it trains
    assert capsys.readouterr().err.strip().splitlines() == ["warning: --opt sgd ignores --rho"]
    assert train_cli.main(argv) == 2  # bad input (the run exists): its one line, no warning
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "already holds a run" in err[0]


def test_threads_on_the_training_command(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    config, *_ = train_cli.parse(["--threads", "3"])
    assert calls == [3] and "threads" not in json.dumps(config.to_json())
    assert train_cli.main(["--threads", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --threads must be an integer >= 1, got 0"]


def test_threads_on_every_landscape_subcommand(monkeypatch, landscape_cli):
    from landscape.cli import SUBCOMMANDS, build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert set(SUBCOMMANDS) <= set(subparsers)
    for name, sub in subparsers.items():
        assert "--threads" in sub.format_help(), name
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    code, _, err = landscape_cli(["hessian", "no-such-run", "--threads", "2"])
    assert code == 2 and calls == [2] and len(err.strip().splitlines()) == 1
    code, _, err = landscape_cli(["surface", "no-such-run", "--threads", "-1"])
    assert code == 2 and err.strip() == "error: --threads must be an integer >= 1, got -1"


def test_report_skips_folders_that_are_not_runs(tiny_mlp_path, tmp_path, landscape_cli):
    beside = tmp_path / "report"  # what `report checkpoints/demo/*` meets beside the runs
    beside.mkdir()
    out = tmp_path / "out"
    code, stdout, err = landscape_cli(["report", tiny_mlp_path, str(beside), "--out", str(out),
                                       "--no_densities", "--steps", "20", "--every", "100",
                                       "--no_progress"])
    assert code == 0, err
    assert err.strip().splitlines() == [
        f"skipping 1 folder(s) that are not runs (no config.json): {beside}"]
    assert (out / "table.md").exists()
    code, _, err = landscape_cli(["report", str(beside), "--out", str(out), "--no_progress"])
    assert code == 2 and "no run folder" in err and len(err.strip().splitlines()) == 1


def test_help_is_plain_text():
    from landscape.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    texts = [parser.format_help(), train_cli.build_parser().format_help()]
    texts += [sub.format_help() for sub in subparsers.values()]
    for text in texts:
        assert "`" not in text and ":func:" not in text, text[:200]


def test_analysis_dtype_auto_follows_the_parameter_count(tiny_mlp_path, monkeypatch):
    import landscape
    import landscape.hessian as hessian
    from landscape.hessian import AUTO_FLOAT64_MAX_PARAMS, analysis_dtype, hessian_summary

    assert analysis_dtype("auto", AUTO_FLOAT64_MAX_PARAMS) == torch.float64
    assert analysis_dtype("auto", AUTO_FLOAT64_MAX_PARAMS + 1) == torch.float32
    assert analysis_dtype("float64", 10**9) == torch.float64
    with pytest.raises(landscape.errors.AnalysisError, match="auto, float32 or float64"):
        analysis_dtype("half", 10)
    run = landscape.load(tiny_mlp_path, device="cpu")
    small = hessian_summary(run, "tail", seed=0)
    assert small.provenance.dtype == "float64"  # a tiny model: float64 products
    monkeypatch.setattr(hessian, "AUTO_FLOAT64_MAX_PARAMS", 10)  # as if it were large
    large = hessian_summary(run, "tail", seed=0)
    assert large.provenance.dtype == "float32"
    assert large.top[0] == pytest.approx(small.top[0], rel=1e-4)  # float64 recurrence
    assert hessian_summary(run, "tail", seed=0, dtype="float64").provenance.dtype == "float64"


def test_hessian_progress_total_is_the_work_done(tiny_mlp_path):
    import landscape
    from landscape.hessian import hessian_summary

    run = landscape.load(tiny_mlp_path, device="cpu")
    planned, done = [], []
    s = hessian_summary(run, "head", trace=True, trace_hvps=9, seed=0, max_steps=300,
                        planned=planned.append, progress=done.append)
    assert planned == [s.provenance.hvps] == [sum(done)] and s.provenance.hvps < 300


def test_slq_batches_probes_only_where_measured_to_pay(tiny_mlp_path, monkeypatch):
    import landscape
    import landscape.slq as slq_module
    from landscape.hvp import GroupHessian
    from landscape.slq import PROBE_BLOCK_MAX_PARAMS, default_probe_batch, slq

    assert default_probe_batch(PROBE_BLOCK_MAX_PARAMS, 10) == 10
    assert default_probe_batch(PROBE_BLOCK_MAX_PARAMS + 1, 10) == 1
    assert default_probe_batch(100, 10, "cuda") == 1  # not measured on a GPU: one at a time
    run = landscape.load(tiny_mlp_path, device="cpu")
    op = GroupHessian.from_run(run, "tail")
    assert op.n_params <= PROBE_BLOCK_MAX_PARAMS
    blocks = []
    real = slq_module.lanczos

    def recording(matmat, start, *args, **kwargs):
        blocks.append(start.shape[0])
        return real(matmat, start, *args, **kwargs)

    monkeypatch.setattr(slq_module, "lanczos", recording)
    batched = slq(op, probes=4, steps=12, seed=0)
    monkeypatch.setattr(slq_module, "PROBE_BLOCK_MAX_PARAMS", 10)
    single = slq(op, probes=4, steps=12, seed=0)
    assert blocks == [4, 1, 1, 1, 1]
    np.testing.assert_allclose(single.nodes, batched.nodes, rtol=1e-9, atol=1e-12)


def test_report_settings_dtype():
    from landscape.errors import AnalysisError
    from landscape.report import ReportSettings

    assert ReportSettings().dtype == "auto"
    with pytest.raises(AnalysisError, match="dtype must be"):
        ReportSettings(dtype="half")
