"""bench/saddle_cifar10.py: a root keeps one size (model, epochs), the curves' epochs, and the
configs it trains (the defaults are the committed ResNet-8 experiment's)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("saddle_cifar10",
                                               ROOT / "bench" / "saddle_cifar10.py")
saddle = sys.modules.setdefault("saddle_cifar10", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(saddle)


@pytest.mark.parametrize("end, expected", [
    (30, [0, 10, 20, 5, 15, 25]),  # the committed experiment's curves
    (60, [0, 20, 40, 10, 30, 50]),
    (10, [0, 5]),  # never closer than save_every
])
def test_curve_epochs(end, expected):
    assert saddle.curve_epochs(end) == expected


def test_a_new_root_keeps_the_size_it_was_made_with(tmp_path):
    root = tmp_path / "r"
    assert saddle.fix_setting(root, model="resnet20", epochs=60) == {"model": "resnet20",
                                                                      "epochs": 60}
    assert json.loads((root / "setting.json").read_text()) == {"model": "resnet20", "epochs": 60}
    assert saddle.fix_setting(root, model=None, epochs=None) == {"model": "resnet20",
                                                                  "epochs": 60}
    assert saddle.fix_setting(root, model="resnet20", epochs=None)["epochs"] == 60
    with pytest.raises(ValueError, match="resnet20, 60-epoch runs.*another --root"):
        saddle.fix_setting(root, model="resnet8", epochs=None)
    with pytest.raises(ValueError, match="'epochs': 30"):
        saddle.fix_setting(root, model=None, epochs=30)


def test_a_root_without_setting_takes_its_runs_size(tmp_path):
    """The roots made before ``setting.json``: their runs' config decides, not the flags'
    defaults."""
    run = tmp_path / "runs" / "sgd-s9826"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": "resnet32", "epochs": 12}))
    with pytest.raises(ValueError):
        saddle.fix_setting(tmp_path, model="resnet8", epochs=None)
    assert not (tmp_path / "setting.json").exists()  # refused: nothing written
    assert saddle.fix_setting(tmp_path, model=None, epochs=None) == {"model": "resnet32",
                                                                      "epochs": 12}
    assert saddle.setting_of(tmp_path)["model"] == "resnet32"


def test_an_empty_root_defaults_to_the_committed_experiment(tmp_path):
    assert saddle.setting_of(tmp_path) == {"model": "resnet8", "epochs": 30}
    assert saddle.fix_setting(tmp_path / "new", model=None, epochs=None) == {"model": "resnet8",
                                                                            "epochs": 30}


def test_configs_take_the_roots_size(tmp_path):
    base = saddle.config_of("ssesam-s1", tmp_path)
    sized = saddle.config_of("ssesam-s1", tmp_path, {"model": "resnet20", "epochs": 60})
    assert sized == dataclasses.replace(base, model="resnet20", epochs=60)
    assert (base.model, base.epochs, base.opt, base.seed) == ("resnet8", 30, "ssesam", 1)
    assert sized.preset().switch == 42  # gamma 0.7 of 60: stage II from (0-based) epoch 42


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--model", "resnet32"], "another --root"),
])
def test_bad_size_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    saddle.fix_setting(tmp_path, model="resnet20", epochs=60)
    assert saddle.main(["--root", str(tmp_path), "--stage", "figures", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "figures").exists()
