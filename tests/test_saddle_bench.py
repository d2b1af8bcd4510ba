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


def test_whole_groups_come_last_and_the_asked_ones_first(tmp_path):
    """Every run's whole tail, then its whole head, once each, each followed by its witness;
    within a group the runs whose lambda_min a question compares come first, so SAM's head
    (hours, read by none) is last."""
    tasks = saddle._task_list(tmp_path, full=True)
    n = 4 * len(saddle.RUNS)
    assert saddle._task_list(tmp_path) == tasks[:-n]
    whole = tasks[-n:]
    assert [t[0] for t in whole] == ["full", "witness"] * (n // 2)
    assert all(a[1:] == b[1:] for a, b in zip(whole[::2], whole[1::2]))
    full = whole[::2]
    assert [t[3] for t in full] == ["tail"] * len(saddle.RUNS) + ["head"] * len(saddle.RUNS)
    for group in ("tail", "head"):
        names = [t[1] for t in full if t[3] == group]
        assert sorted(names) == sorted(saddle.RUNS)
        asked = [saddle.RUNS[n]["opt"] in saddle.ASKED[group] for n in names]
        assert asked == sorted(asked, reverse=True)
    assert [t[1] for t in full][-1] == "sam-s9826"
    assert [t[1] for t in full if t[3] == "tail"][-1] == "imbsam-s9826"


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--model", "resnet32"], "another --root"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_bad_size_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    saddle.fix_setting(tmp_path, model="resnet20", epochs=60)
    assert saddle.main(["--root", str(tmp_path), "--stage", "figures", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "figures").exists()


def test_an_analysis_worker_runs_on_the_threads_asked_for(tmp_path, monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(saddle, "_task_list", lambda root, full: [])
    try:
        saddle.analyse(tmp_path, jobs=1, worker=0, threads=2)
        assert torch.get_num_threads() == 2
        saddle.analyse(tmp_path, jobs=1, worker=0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _root_with(tmp_path, name: str, run_dir: str) -> tuple[Path, int]:
    """A bench root whose run ``name`` is a copy of a tiny test run; its last epoch."""
    import shutil

    root = tmp_path / name
    shutil.copytree(run_dir, root / "runs" / "sgd-s9826")
    epoch = json.loads((root / "runs" / "sgd-s9826" / "config.json").read_text())["epochs"]
    (root / "setting.json").write_text(json.dumps({"model": "cnn", "epochs": epoch}))
    return root, epoch


def test_a_killed_whole_group_task_resumes_from_its_journal(tmp_path, tiny_cnn_path,
                                                             monkeypatch):
    """The ``full`` task keeps its products as they come: killed after 4, rerun, it computes
    only the rest, writes the uninterrupted numbers, and removes its journal."""
    from landscape.hvp import GroupHessian

    products, calls = GroupHessian.matmat, []

    def counted(self, V, kill_at=None):
        if len(calls) == kill_at:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return products(self, V)

    monkeypatch.setattr(GroupHessian, "matmat", counted)
    plain_root, epoch = _root_with(tmp_path, "plain", tiny_cnn_path)
    task = ("full", "sgd-s9826", epoch, "tail")
    saddle.run_task(plain_root, task)
    plain = json.loads(saddle._result_path(plain_root, *task).read_text())
    uninterrupted = len(calls)

    root, _ = _root_with(tmp_path, "killed", tiny_cnn_path)
    calls.clear()
    monkeypatch.setattr(GroupHessian, "matmat", lambda self, V: counted(self, V, kill_at=4))
    with pytest.raises(KeyboardInterrupt):
        saddle.run_task(root, task)
    result = saddle._result_path(root, *task)
    journal = result.with_suffix(".journal")
    assert not result.exists() and not result.with_suffix(".claim").exists()
    assert len(list(journal.glob("product_*.pt"))) == 4

    calls.clear()
    monkeypatch.setattr(GroupHessian, "matmat", counted)
    saddle.run_task(root, task)
    assert len(calls) == uninterrupted - 4 > 0  # the four journaled products were not redone
    resumed = json.loads(result.read_text())
    same = ("lambda_max", "lambda_min", "ratio", "residuals", "steps", "samples", "converged")
    assert {k: resumed[k] for k in same} == {k: plain[k] for k in same}
    assert plain["steps"] > 4 and plain["converged"]
    assert not journal.exists()


def test_a_journal_left_beside_its_result_is_removed(tmp_path, tiny_cnn_path):
    """Killed after the result was written but before the clean-up: the next pass removes
    the journal, and only its files."""
    root, epoch = _root_with(tmp_path, "r", tiny_cnn_path)
    task = ("full", "sgd-s9826", epoch, "tail")
    result = saddle._result_path(root, *task)
    result.parent.mkdir(parents=True)
    result.write_text("{}")
    journal = result.with_suffix(".journal")
    journal.mkdir()
    for name in ("key.json", "product_00000.pt", "notes.txt"):
        (journal / name).write_text("x")
    saddle.run_task(root, task)
    assert [p.name for p in journal.iterdir()] == ["notes.txt"]
    assert result.read_text() == "{}"


def test_extremes_that_stopped_before_the_floor_are_computed_again(tmp_path, tiny_cnn_path):
    """A result from before landscape.eigen.MIN_STEPS that stopped early is set aside (kept,
    renamed) and computed again with the floor; one computed with the floor stays."""
    from landscape.eigen import MIN_STEPS

    root, epoch = _root_with(tmp_path, "r", tiny_cnn_path)
    early, floored = ("final", "sgd-s9826", epoch, "tail"), ("final", "sgd-s9826", epoch, "head")
    old = {"steps": 8, "lambda_min": -0.0009, "settings": {"max_steps": 100}}
    for task, extra in ((early, {}), (floored, {"min_steps": MIN_STEPS})):
        path = saddle._result_path(root, *task)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = dict(zip(("kind", "run", "epoch", "group"), task))
        path.write_text(json.dumps({**old, **names, **extra}))
        saddle.run_task(root, task)
    redone = json.loads(saddle._result_path(root, *early).read_text())
    assert redone["min_steps"] == MIN_STEPS and redone["steps"] >= min(MIN_STEPS, 8 + 1)
    kept = saddle._result_path(root, *early).with_name(f"final_e{epoch:04d}_tail.json.before-floor")
    assert json.loads(kept.read_text())["lambda_min"] == old["lambda_min"]
    assert json.loads(saddle._result_path(root, *floored).read_text())["steps"] == 8
    assert saddle._results(root, "final")[("sgd-s9826", epoch, "tail")] == redone  # not the kept


def test_the_witness_is_the_whole_groups_curvature_along_the_final_vectors(tmp_path,
                                                                           tiny_cnn_path):
    """``u^T H u`` against the float64 dense Hessian (tests/_reference.py) of the whole tail
    of a BatchNorm CNN, to float32 rounding; within the dense spectrum; and a whole-group
    result whose lambda_min lies above it is caught as ``missed``."""
    import torch

    import landscape
    from _reference import dense_eigh, dense_group_hessian

    root, epoch = _root_with(tmp_path, "r", tiny_cnn_path)
    for kind in ("final", "full", "witness"):
        saddle.run_task(root, (kind, "sgd-s9826", epoch, "tail"))
    path = saddle._result_path(root, "witness", "sgd-s9826", epoch, "tail")
    witness = json.loads(path.read_text())
    full = json.loads(saddle._result_path(root, "full", "sgd-s9826", epoch, "tail").read_text())
    run = landscape.load(root / "runs" / "sgd-s9826" / f"epoch_{epoch:04d}.pt", device="cpu")
    H = dense_group_hessian(run, "tail")
    assert witness["samples"] == len(run.group_data("tail")[1])
    vectors = torch.load(saddle._result_path(root, "final", "sgd-s9826", epoch, "tail")
                         .with_suffix(".pt"))
    scale = float(torch.linalg.matrix_norm(H, 2))
    for key, end in (("rayleigh_bottom", "bottom"), ("rayleigh_top", "top")):
        u = vectors[end].double() / vectors[end].double().norm()
        assert witness[key] == pytest.approx(float(u @ H @ u), abs=1e-5 * scale)
    eigenvalues = dense_eigh(H)
    assert eigenvalues[0] - 1e-5 * scale <= witness["rayleigh_bottom"] < 0
    assert witness["rayleigh_top"] <= eigenvalues[-1] + 1e-5 * scale
    assert (witness["lambda_min"], witness["missed"]) == (full["lambda_min"], False)
    assert "witness (bottom, top)" in saddle.table(root)

    path.unlink()  # a whole-group search that stopped above the subsample's curvature
    forged = {**full, "lambda_min": witness["rayleigh_bottom"] + 1.5 * full["tolerance"]}
    saddle._result_path(root, "full", "sgd-s9826", epoch, "tail").write_text(json.dumps(forged))
    saddle.run_task(root, ("witness", "sgd-s9826", epoch, "tail"))
    assert json.loads(path.read_text())["missed"]
    assert "(missed)" in saddle.table(root)


def test_a_witness_waits_for_its_result_and_goes_with_it(tmp_path, tiny_cnn_path):
    """No witness before its whole-group result exists; a result set aside for the floor
    takes its witness with it (kept), and both are computed again."""
    root, epoch = _root_with(tmp_path, "r", tiny_cnn_path)
    full, witness = (("full" if k == 0 else "witness", "sgd-s9826", epoch, "tail")
                     for k in range(2))
    saddle.run_task(root, ("final", "sgd-s9826", epoch, "tail"))
    saddle.run_task(root, witness)
    assert not saddle._result_path(root, *witness).exists()
    saddle.run_task(root, full)
    early = json.loads(saddle._result_path(root, *full).read_text())
    early.pop("min_steps")
    early["steps"] = 5
    saddle._result_path(root, *full).write_text(json.dumps(early))
    saddle.run_task(root, witness)
    assert json.loads(saddle._result_path(root, *witness).read_text())["lambda_min"] == \
        early["lambda_min"]
    saddle.run_task(root, full)  # stopped before the floor: both set aside, it computed again
    for task in (full, witness):
        kept = saddle._result_path(root, *task)
        assert json.loads(kept.with_name(kept.name + ".before-floor").read_text())[
            "lambda_min"] == early["lambda_min"]
    assert not saddle._result_path(root, *witness).exists()
    saddle.run_task(root, witness)
    assert json.loads(saddle._result_path(root, *full).read_text())["min_steps"]
    assert saddle._result_path(root, *witness).exists()
