"""Exact resume, and no silent damage: divergence and existing run folders.

A run interrupted at arbitrary points (mid-epoch, inside a checkpoint write, on both sides of
the SSE-SAM stage switch) and resumed each time ends with every checkpoint bitwise identical to
the same run left alone: model weights, BatchNorm running statistics, momentum, and the metrics
(learning rate, stage, radii, losses, accuracies). The global random generators are scrambled
before every resumption, to show that nothing depends on them.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _kill_helpers import check_run_folder, digests, metrics_without_time  # noqa: E402
from train import checkpoint as ckpt  # noqa: E402
from train.cli import main as train_main  # noqa: E402
from train.config import Config  # noqa: E402
from train.data import load_dataset  # noqa: E402
from train.loop import train  # noqa: E402
from train.optim import GroupSAM  # noqa: E402

EPOCHS, SAVE_EVERY = 8, 3  # checkpoints 0, 3, 6, 8; SSE-SAM stage II from 0-based epoch 6


class Interrupted(BaseException):
    """Stands for a Ctrl-C / crash at one chosen point."""


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", 20)


def _config(opt: str) -> Config:
    return Config(dataset="digits", imb_factor=20, opt=opt, model="cnn", width=4, epochs=EPOCHS,
                  lr=0.1, save_every=SAVE_EVERY, seed=11, device="cpu")


def _stop_at_step(monkeypatch, n: int) -> None:
    """Makes the ``n``-th optimizer step from now raise, after it has changed the weights."""
    real, calls = GroupSAM.step, {"n": 0}

    def step(self, *args, **kwargs):
        loss = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == n:
            raise Interrupted(f"step {n}")
        return loss

    monkeypatch.setattr(GroupSAM, "step", step)


def _stop_in_save(monkeypatch, epoch: int) -> None:
    """Raises inside the write of ``epoch_NNNN.pt``: manifest updated, file fsynced, not renamed."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == f"epoch_{epoch:04d}.pt":
            raise Interrupted(f"saving epoch {epoch}")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def _scramble_global_generators(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.mark.parametrize("opt", ["sgd", "ssesam"])
def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path, monkeypatch, digits, opt):
    config = _config(opt)
    steps = math.ceil(sum(config.counts) / config.batch_size)  # optimizer steps per epoch
    assert config.preset().switch == (6 if opt == "ssesam" else EPOCHS)
    reference = train(config, tmp_path / "reference", progress=False, log=lambda m: None,
                      data=digits)

    run = tmp_path / "run"
    interruptions = [
        # (how, where, newest checkpoint left): fresh run, then three resumed attempts
        (_stop_at_step, 3 * steps + steps // 2, 3),        # mid-epoch 4 (stage I)
        (_stop_in_save, 6, 3),                              # inside the write of epoch 6
        (_stop_at_step, 3 * steps + steps // 2 + 1, 6),   # from 3 across the switch, into 7
    ]
    for attempt, (how, where, newest) in enumerate(interruptions):
        _scramble_global_generators(1000 + attempt)
        how(monkeypatch, where)
        with pytest.raises(Interrupted):
            train(config, run, resume=attempt > 0, progress=False, log=lambda m: None,
                  data=digits)
        monkeypatch.undo()
        assert max(e for e, _ in ckpt.list_checkpoints(run)) == newest
        check_run_folder(run)
    _scramble_global_generators(2000)
    train(config, run, resume=True, progress=False, log=lambda m: None, data=digits)

    assert digests(run) == digests(reference)  # every checkpoint, byte for byte
    assert metrics_without_time(run) == metrics_without_time(reference)
    stages = [row["stage"] for row in metrics_without_time(run)]
    assert stages == ([1] * 6 + [2] * 2 if opt == "ssesam" else [1] * EPOCHS)
    ours = ckpt.load_checkpoint(ckpt.checkpoint_path(run, EPOCHS))
    theirs = ckpt.load_checkpoint(ckpt.checkpoint_path(reference, EPOCHS))
    assert any("running_mean" in k for k in ours["model"])  # BatchNorm statistics covered
    assert ours["model"].keys() == theirs["model"].keys()
    for key, tensor in ours["model"].items():
        assert torch.equal(tensor, theirs["model"][key]), key
    momenta = [s["momentum_buffer"] for s in ours["optimizer"]["state"].values()]
    assert len(momenta) == len(list(ours["model"].keys())) - sum(
        1 for k in ours["model"] if "running" in k or "num_batches" in k)
    for index, state in ours["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"],
                           theirs["optimizer"]["state"][index]["momentum_buffer"])
    assert ours["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]


def test_resume_is_not_exact_when_momentum_is_lost(tmp_path, digits):
    """The comparison above can fail: resuming without the optimizer state changes the result."""
    config = _config("sgd")
    reference = train(config, tmp_path / "reference", progress=False, log=lambda m: None,
                      data=digits)
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for epoch in (8, 6):
        ckpt.checkpoint_path(run, epoch).unlink()
    path = ckpt.checkpoint_path(run, 3)
    state = ckpt.load_checkpoint(path)
    state["optimizer"]["state"] = {}  # momentum dropped
    del state["format"], state["epoch"]
    ckpt.save_checkpoint(run, 3, state)
    train(config, run, resume=True, progress=False, log=lambda m: None, data=digits)
    assert digests(run)["epoch_0008.pt"] != digests(reference)["epoch_0008.pt"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


ARGS = ["--dataset", "digits", "--opt", "ssesam", "--epochs", "6", "--lr", "0.1",
        "--imb_factor", "20", "--save_every", "1", "--no_progress"]


def test_divergence_names_epoch_and_step_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch, capsys):
    # A real divergence: the loss is non-finite from the second step on.
    assert train_main(ARGS + ["--lr", "1e30", "--out", str(tmp_path / "huge")]) == 3
    err = _one_error_line(capsys)
    assert "non-finite training loss at epoch 1, step 2 of" in err
    assert "the last good checkpoint is kept" in err
    assert [e for e, _ in ckpt.list_checkpoints(tmp_path / "huge")] == [0]

    # A divergence late in a run: the checkpoints before it stay, nothing after it is written.
    real, calls = GroupSAM.step, {"n": 0}
    steps = math.ceil(sum(Config(dataset="digits", imb_factor=20).counts) / 64)

    def step(self, *args, **kwargs):
        loss = real(self, *args, **kwargs)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 3 * steps + 4 else loss

    monkeypatch.setattr(GroupSAM, "step", step)
    run = tmp_path / "late"
    assert train_main(ARGS + ["--out", str(run)]) == 3
    err = _one_error_line(capsys)
    assert f"non-finite training loss at epoch 4, step 4 of {steps}" in err
    assert [e for e, _ in ckpt.list_checkpoints(run)] == [0, 1, 2, 3]
    assert [row["epoch"] for row in ckpt.read_metrics(run)] == [1, 2, 3]
    check_run_folder(run)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _user_files(folder: Path) -> dict[str, bytes]:
    """What a user or an analysis might keep in a run folder, under names near the run's."""
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.rglob("*"))
    for sub in ("hessian", "spectrum", "surface"):  # analysis outputs
        (folder / sub).mkdir()
        (folder / sub / "result.json").write_text("{}")
    (folder / "notes.txt").write_text("mine")
    (folder / "epoch_0001.pt.bak").write_bytes(b"a backup")  # not epoch_NNNN.pt
    (folder / ".config.json.swp").write_bytes(b"an editor's")  # not a .NAME.XXXXXXXX.tmp
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(set(folder.rglob("*")) - before) if p.is_file()}


def _kept(folder: Path, files: dict[str, bytes]) -> bool:
    return all((folder / name).read_bytes() == data for name, data in files.items())


def test_overwrite_removes_only_the_runs_files_and_names_the_rest(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(ARGS + ["--epochs", "2", "--out", str(run)]) == 0
    mine = _user_files(run)
    capsys.readouterr()
    assert train_main(ARGS + ["--epochs", "1", "--out", str(run), "--overwrite"]) == 0
    assert _kept(run, mine)
    own = sorted(p.name for p in run.iterdir() if p.is_file() and p.name not in mine)
    assert len(mine) == 6
    assert own == ["checkpoints.json", "config.json", "epoch_0000.pt", "epoch_0001.pt",
                   "metrics.jsonl"]  # epoch 2 of the old run is gone
    assert json.loads((run / "config.json").read_text())["epochs"] == 1
    said = [line for line in capsys.readouterr().err.splitlines() if "--overwrite" in line]
    assert len(said) == 1, said
    for name in (".config.json.swp", "epoch_0001.pt.bak", "hessian", "notes.txt", "spectrum",
                 "surface"):
        assert name in said[0]


def test_overwrite_of_a_folder_without_a_run_deletes_nothing(tmp_path, capsys):
    folder = tmp_path / "not-a-run"
    mine = _user_files(folder)
    assert train_main(ARGS + ["--epochs", "1", "--out", str(folder), "--overwrite"]) == 0
    assert _kept(folder, mine)
    said = [line for line in capsys.readouterr().err.splitlines() if "--overwrite" in line]
    assert len(said) == 1 and "nothing removed" in said[0] and "notes.txt" in said[0], said


def test_existing_run_is_never_overwritten_without_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(ARGS + ["--epochs", "2", "--out", str(run)]) == 0
    capsys.readouterr()
    before = _snapshot(run)
    for argv in (ARGS + ["--epochs", "2", "--out", str(run)],            # same command again
                 ARGS + ["--epochs", "3", "--out", str(run)],            # other settings
                 ["--resume", str(run), "--epochs", "3"],                # resume, other settings
                 ["--resume", str(run), "--overwrite"],                  # contradictory
                 ["--resume", str(run), "--out", str(tmp_path / "x")]):  # two folders
        assert train_main(argv) == 2, argv
        err = _one_error_line(capsys)
        assert str(run) in err or "--overwrite" in err, err
        assert _snapshot(run) == before, argv
    # Files of a run that crashed before its config was written also count as a run.
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert train_main(ARGS + ["--out", str(partial)]) == 2
    _one_error_line(capsys)
    assert (partial / "metrics.jsonl").read_text() == '{"epoch": 1}\n'

    # --overwrite replaces the run (what else is in the folder stays: next test); --resume of a
    # finished run is a no-op that leaves every checkpoint as it was.
    assert train_main(ARGS + ["--epochs", "1", "--out", str(run), "--overwrite"]) == 0
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints.json", "config.json", "epoch_0000.pt", "epoch_0001.pt", "metrics.jsonl"]
    assert json.loads((run / "config.json").read_text())["epochs"] == 1
    finished = _snapshot(run)
    assert train_main(["--resume", str(run), "--no_progress"]) == 0
    assert _snapshot(run) == finished
    assert len(ckpt.read_metrics(run)) == 1


@pytest.mark.parametrize("epoch", ['"3"', "null", "1.5", "true", "0", "two rows"])
def test_metrics_row_without_a_whole_epoch_refuses_resume(tmp_path, capsys, epoch):
    """Rule: every row of metrics.jsonl names a whole epoch >= 1, once; else --resume refuses in
    one line and writes nothing (a row it cannot place is never dropped or kept in silence)."""
    run = tmp_path / "run"
    assert train_main(ARGS + ["--epochs", "3", "--out", str(run)]) == 0
    ckpt.checkpoint_path(run, 3).unlink()  # so that the resume has an epoch to redo
    rows = (run / "metrics.jsonl").read_text().splitlines()
    bad = rows[1] if epoch == "two rows" else json.dumps({**json.loads(rows[1]),
                                                           "epoch": json.loads(epoch)})
    (run / "metrics.jsonl").write_text("\n".join([rows[0], bad, *rows[1:]]) + "\n")
    capsys.readouterr()
    before = _snapshot(run)
    assert train_main(["--resume", str(run), "--no_progress"]) == 2
    err = _one_error_line(capsys)
    assert str(run / "metrics.jsonl") in err
    assert ("two rows for epoch 2" if epoch == "two rows" else f"epoch {epoch}, not a whole") in err
    assert _snapshot(run) == before


def test_resume_with_every_checkpoint_moved_away_refuses_unless_overwrite(tmp_path, capsys):
    run, away = tmp_path / "run", tmp_path / "away"
    assert train_main(ARGS + ["--epochs", "2", "--out", str(run)]) == 0
    away.mkdir()
    for _, path in ckpt.list_checkpoints(run):
        path.rename(away / path.name)
    for moved in ([], ["metrics.jsonl"]):  # then the manifest alone remembers the epochs
        for name in moved:
            (run / name).rename(away / name)
        capsys.readouterr()
        before = _snapshot(run)
        assert train_main(["--resume", str(run), "--no_progress"]) == 2
        err = _one_error_line(capsys)
        assert f"{run}: no checkpoint left to resume from" in err and "--overwrite" in err
        assert ("checkpoints.json records epoch_0002.pt" if moved
                else "metrics.jsonl holds 2 epoch(s)") in err
        assert _snapshot(run) == before

    # Asked to (resume and overwrite): the run starts over.
    config = Config.from_json(ckpt.read_config(run))
    train(config, run, resume=True, overwrite=True, progress=False, log=lambda m: None)
    assert [row["epoch"] for row in ckpt.read_metrics(run)] == [1, 2]
    assert [e for e, _ in ckpt.list_checkpoints(run)] == [0, 1, 2]

    # A run killed before its first checkpoint had nothing to lose: --resume starts it.
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(run / "config.json", partial / "config.json")
    (partial / "metrics.jsonl").write_bytes(b"")
    assert train_main(["--resume", str(partial), "--no_progress"]) == 0
    assert [e for e, _ in ckpt.list_checkpoints(partial)] == [0, 1, 2]
