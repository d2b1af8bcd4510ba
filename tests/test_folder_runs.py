"""Training and analysing ``--dataset folder`` runs end to end, and its bad input at the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from _folders import write_folder
from PIL import Image

import landscape
from landscape.load import GroupError
from train.cli import main as train_main


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path / "cache"))


def _train(capsys, *argv):
    code = train_main(["--no_progress", "--device", "cpu", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_folder_run_trains_and_is_analysed(tmp_path, capsys):
    root = write_folder(tmp_path / "images", per_class=(8, 8, 8), test=3, size=(8, 8))
    out = tmp_path / "run"
    code, _, err = _train(capsys, "--dataset", "folder", "--data_dir", str(root), "--imb_factor",
                          "4", "--eta", "5", "--model", "cnn", "--width", "4", "--epochs", "2",
                          "--lr", "0.1", "--batch_size", "8", "--save_every", "1",
                          "--out", str(out))
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    derived = config["derived"]
    assert derived["class_counts"] == [8, 4, 2]
    assert derived["classes"] == ["a_dog", "b_cat", "c_emu"]
    assert derived["image_shape"] == [3, 8, 8] and len(derived["mean"]) == 3
    assert derived["groups"] == {"head": [0], "tail": [1, 2]}
    run = landscape.load(out, device="cpu")
    x, y = run.group_data("tail")
    assert x.shape == (6, 3, 8, 8) and sorted(y.tolist()) == [1] * 4 + [2] * 2
    summary = landscape.hessian_summary(run, "tail", top=1, bottom=1, max_steps=60)
    assert summary.converged


def test_group_subsample_is_fixed_and_in_data_order(tiny_mlp_path):
    run = landscape.load(tiny_mlp_path, device="cpu")
    x_all, y_all = run.group_data("head")
    x, y = run.group_data("head", samples=25)
    again, _ = run.group_data("head", samples=25)
    other, _ = run.group_data("head", samples=25, seed=1)
    assert x.shape[0] == 25 and torch.equal(x, again) and not torch.equal(x, other)
    # a subset, in the order of the full group
    rows = [int(((x_all - xi).abs().flatten(1).sum(1) == 0).nonzero()[0]) for xi in x]
    assert rows == sorted(rows) and torch.equal(y_all[rows], y)
    assert torch.equal(run.group_data("head", samples=10**6)[0], x_all)
    with pytest.raises(GroupError, match="samples must be"):
        run.group_data("head", samples=0)


@pytest.mark.parametrize("setup, argv, message", [
    (lambda root: None, ["--imb_factor", "100"], "has no image left after the cut"),
    (lambda root: (root / "train" / "a_dog" / "001.png").write_bytes(b"junk"), [],
     "a_dog/001.png: not a readable image"),
    (lambda root: Image.new("RGB", (5, 9)).save(root / "train" / "a_dog" / "zz.png"), [],
     "pass --image_size N"),
    (lambda root: [p.unlink() for p in root.glob("train/*/*")], [], "train: no images"),
    (lambda root: ((root / "train.txt").write_text("train/a_dog/000.png 0\ntrain/b_cat/0.png 1\n"),
                   (root / "test.txt").write_text("test/a_dog/000.png 7\n")),
     ["--train_list", "{root}/train.txt", "--test_list", "{root}/test.txt"],
     "test.txt:1: label 7 out of range"),
])
def test_bad_folder_input_is_one_line_and_writes_nothing(tmp_path, capsys, setup, argv, message):
    root = write_folder(tmp_path / "images")
    setup(root)
    out = tmp_path / "run"
    argv = [a.replace("{root}", str(root)) for a in argv]
    code, _, err = _train(capsys, "--dataset", "folder", "--data_dir", str(root), "--model",
                          "cnn", "--epochs", "1", "--imb_factor", "2", "--out", str(out), *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_folder_options_need_dataset_folder(tmp_path, capsys):
    code, _, err = _train(capsys, "--image_size", "32", "--out", str(tmp_path / "run"))
    assert code == 2 and "need --dataset folder" in err
