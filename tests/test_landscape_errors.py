"""``python -m landscape``: file-system errors, out-of-range seeds, edited run files, NaN
weights and Ctrl-C give one line on stderr (exit 2, or 130 for Ctrl-C), no traceback and no
half-written file (issue 10, D1, D2, D4, D5, D9)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from train import checkpoint as ckpt


@pytest.fixture
def run_copy(tiny_mlp_path, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tiny_mlp_path, copy)
    return copy


def _one_line(code: int, err: str, expected: int = 2) -> str:
    assert code == expected, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_out_that_is_a_file_is_one_line_naming_the_path(run_copy, tmp_path, landscape_cli):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    code, _, err = landscape_cli(["surface", str(run_copy), "--grid", "2", "--dim", "1",
                                  "--out", str(blocker / "surf"), "--no_progress",
                                  "--device", "cpu"])
    assert str(blocker) in _one_line(code, err)
    assert blocker.read_text() == "mine"


def test_a_full_disk_is_one_line_naming_the_path(run_copy, tmp_path, landscape_cli,
                                                 monkeypatch):
    import train.io

    out = tmp_path / "h.json"

    def full(path, data, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(train.io, "atomic_write_bytes", full)
    code, _, err = landscape_cli(["hessian", str(run_copy), "--json", str(out),
                                  "--no_progress", "--device", "cpu", "--max_steps", "5"])
    line = _one_line(code, err)
    assert str(out) in line and "No space left" in line and not out.exists()


@pytest.mark.parametrize("command", [["hessian"], ["spectrum", "--out", "x"],
                                     ["surface", "--grid", "2"]])
@pytest.mark.parametrize("seed", [2 ** 64, -1])
def test_a_seed_outside_64_bits_is_refused(command, seed, run_copy, landscape_cli):
    argv = [command[0], str(run_copy), *command[1:], "--seed", str(seed), "--no_progress"]
    code, _, err = landscape_cli(argv)
    assert "--seed" in _one_line(code, err)


def test_the_largest_seed_works(run_copy, landscape_cli):
    code, out, err = landscape_cli(["hessian", str(run_copy), "--seed", str(2 ** 63 - 1),
                                    "--no_progress", "--device", "cpu", "--max_steps", "5"])
    assert code == 0, err
    assert json.loads(out)["seed"] == 2 ** 63 - 1


def test_a_non_numeric_accuracy_in_metrics_is_one_line_naming_the_file(run_copy, tmp_path,
                                                                       landscape_cli):
    rows = [json.loads(line) for line in (run_copy / ckpt.METRICS).read_text().splitlines()]
    rows[-1]["acc"] = "x"
    (run_copy / ckpt.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = landscape_cli(["report", str(run_copy), "--out", str(tmp_path / "rep"),
                                  "--no_progress", "--device", "cpu"])
    assert str(run_copy / ckpt.METRICS) in _one_line(code, err)
    assert not (tmp_path / "rep").exists()


def test_an_edited_derived_entry_is_one_line_naming_the_config(run_copy, tmp_path,
                                                               landscape_cli):
    config = json.loads((run_copy / "config.json").read_text())
    config["derived"] = "x"
    (run_copy / "config.json").write_text(json.dumps(config))
    code, _, err = landscape_cli(["report", str(run_copy), "--out", str(tmp_path / "rep"),
                                  "--no_progress", "--device", "cpu"])
    assert str(run_copy / "config.json") in _one_line(code, err)


@pytest.mark.parametrize("command", ["hessian", "report"])
def test_nan_weights_are_one_line_naming_the_checkpoint(command, run_copy, tmp_path,
                                                        landscape_cli):
    epoch, path = ckpt.list_checkpoints(run_copy)[-1]
    state = ckpt.load_checkpoint(path)
    name = next(iter(state["model"]))
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    ckpt.save_checkpoint(run_copy, epoch, state)  # a digest-valid checkpoint
    extra = ["--out", str(tmp_path / "rep")] if command == "report" else []
    code, _, err = landscape_cli([command, str(run_copy), *extra, "--no_progress",
                                  "--device", "cpu"])
    line = _one_line(code, err)
    assert str(path) in line and "NaN" in line


def test_ctrl_c_is_exit_130_and_one_line(run_copy, landscape_cli, monkeypatch):
    import landscape.hessian

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(landscape.hessian, "hessian_summary", interrupted)
    code, _, err = landscape_cli(["hessian", str(run_copy), "--no_progress", "--device", "cpu"])
    assert "interrupted" in _one_line(code, err, expected=130)
