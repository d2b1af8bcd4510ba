"""One writer per run folder: the ``.lock`` of :class:`train.run_folder.RunLock`.

The lock is tested with real concurrent processes: a training held inside an epoch (its
optimizer step waits for a file to go away) keeps a second trainer and a ``--resume`` out,
each refused in one line naming its pid and host; after a ``SIGKILL`` the next trainer takes
the lock over and finishes the run bitwise equal to a run left alone. Two trainers started
together: one trains, the other is refused. A Ctrl-C gives exit 130 and one line naming the last
checkpoint, and resuming from it loses nothing.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _kill_helpers import (check_run_folder, digests, metrics_without_time,  # noqa: E402
                           run_left_alone)
from train import run_folder  # noqa: E402
from train.cli import main as train_main  # noqa: E402
from train.config import Config  # noqa: E402
from train.run_folder import LOCK, RunBusy, RunLock, owner  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 4
ARGS = ["--dataset", "digits", "--imb_factor", "20", "--opt", "sgd", "--model", "mlp",
        "--width", "8", "--epochs", str(EPOCHS), "--save_every", "1", "--lr", "0.1",
        "--seed", "5", "--device", "cpu", "--no_progress"]
STEPS = math.ceil(sum(Config(dataset="digits", imb_factor=20).counts) / 64)  # per epoch

# ``python -c HELD ARGV``: python -m train whose BLOCK_AT-th optimizer step first touches
# BLOCKED, then waits while HOLD exists (the process holds its lock all that time).
HELD = r"""
import os, sys, time
from pathlib import Path
from train.optim import GroupSAM
real, calls = GroupSAM.step, [0]
block_at, hold, blocked = int(os.environ["BLOCK_AT"]), Path(os.environ["HOLD"]), \
    Path(os.environ["BLOCKED"])
def step(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == block_at:
        blocked.touch()
        while hold.exists():
            time.sleep(0.01)
    return real(self, *args, **kwargs)
GroupSAM.step = step
from train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in extra.items()}}


def _held(argv: list[str], tmp: Path, name: str, block_at: int) -> tuple[subprocess.Popen, Path]:
    """Starts a held training; returns it and the file it touches once it waits."""
    blocked = tmp / f"{name}.blocked"
    # SIGINT at its default in the child: a suite started in the background (``cmd &`` in a
    # non-interactive shell) passes SIGINT on ignored, and Ctrl-C could not be tested.
    process = subprocess.Popen([sys.executable, "-c", HELD, *argv], cwd=ROOT,
                               env=_env(BLOCK_AT=block_at, HOLD=tmp / "hold", BLOCKED=blocked),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return process, blocked


def _wait_until(condition, processes=(), timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for process in processes:
            assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _train_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *argv], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=180)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != LOCK}


def _names_owner(err: str, pid: int) -> None:
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert f"pid {pid} on {socket.gethostname()}" in err and "in use by training" in err, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The run of ``ARGS`` left alone."""
    return run_left_alone(tmp_path_factory.mktemp("reference"), ARGS)


# --------------------------------------------------------------------------------------------
# Real concurrent processes


@pytest.mark.slow
def test_live_run_keeps_others_out_and_a_killed_ones_lock_is_taken_over(tmp_path, reference):
    run = tmp_path / "run"
    (tmp_path / "hold").touch()
    first, blocked = _held(ARGS + ["--out", str(run)], tmp_path, "first", STEPS + 1)
    try:
        _wait_until(blocked.exists, [first])  # inside epoch 2: epochs 0 and 1 are saved
        assert owner(run) == f"training, pid {first.pid} on {socket.gethostname()}"
        before = _snapshot(run)
        for argv in (ARGS + ["--out", str(run)],                 # a second trainer
                     ARGS + ["--out", str(run), "--overwrite"],  # one that would replace it
                     ["--resume", str(run), "--no_progress"]):   # a resume of the live run
            refused = _train_cli(*argv)
            assert refused.returncode == 2, refused.stderr
            _names_owner(refused.stderr, first.pid)
            assert _snapshot(run) == before  # nothing written, nothing removed
    finally:
        first.kill()  # SIGKILL: no clean-up at all
        first.wait()
    assert first.returncode == -signal.SIGKILL
    assert json.loads((run / LOCK).read_text())["pid"] == first.pid  # the stale text stays
    assert owner(run) is None  # ... but nobody holds the lock
    assert train_main(["--resume", str(run), "--no_progress"]) == 0  # taken over
    assert not (run / LOCK).exists()
    assert digests(run) == digests(reference)
    assert metrics_without_time(run) == metrics_without_time(reference)


@pytest.mark.slow
def test_two_trainers_started_together_one_trains_the_other_is_refused(tmp_path, reference):
    run = tmp_path / "run"
    (tmp_path / "hold").touch()
    started = [_held(ARGS + ["--out", str(run)], tmp_path, name, 1) for name in ("a", "b")]
    processes = [process for process, _ in started]
    try:
        _wait_until(lambda: any(b.exists() for _, b in started)
                    and any(p.poll() is not None for p in processes))
        winner, loser = processes if started[0][1].exists() else processes[::-1]
        assert loser.wait(timeout=60) == 2
        _names_owner(loser.communicate()[1], winner.pid)
    finally:
        (tmp_path / "hold").unlink()
    out, err = winner.communicate(timeout=180)
    assert winner.returncode == 0, err
    assert check_run_folder(run) == EPOCHS + 1 and not (run / LOCK).exists()
    assert digests(run) == digests(reference)  # one run's checkpoints and rows, not a mix
    assert metrics_without_time(run) == metrics_without_time(reference)


@pytest.mark.slow
def test_ctrl_c_exits_130_naming_the_last_checkpoint_and_resume_loses_nothing(tmp_path,
                                                                            reference):
    run = tmp_path / "run"
    (tmp_path / "hold").touch()
    process, blocked = _held(ARGS + ["--out", str(run)], tmp_path, "run", 2 * STEPS + 1)
    try:
        _wait_until(blocked.exists, [process])  # inside epoch 3: epochs 0, 1 and 2 are saved
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=180)  # generous: CI shares 2 loaded cores
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"the last checkpoint is {run / 'epoch_0002.pt'}" in err
    assert f"python -m train --resume {run}" in err
    assert not (run / LOCK).exists()  # released on the way out
    assert train_main(["--resume", str(run), "--no_progress"]) == 0
    assert digests(run) == digests(reference)
    assert metrics_without_time(run) == metrics_without_time(reference)


# --------------------------------------------------------------------------------------------
# The lock in this process (a second open file description conflicts like another process)


def test_trainer_refused_while_another_holds_the_lock_writes_nothing(tmp_path, capsys):
    fresh = tmp_path / "fresh" / "run"
    with RunLock(fresh, "training"):
        assert train_main(ARGS + ["--out", str(fresh)]) == 2
        _names_owner(capsys.readouterr().err, os.getpid())
        assert sorted(p.name for p in fresh.iterdir()) == [LOCK]  # only the holder's lock
    assert not (tmp_path / "fresh").exists()  # the lock made the folders and removed them

    run = tmp_path / "run"
    assert train_main(ARGS + ["--epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    before = _snapshot(run)
    with RunLock(run, "landscape hessian"):
        for argv in (["--resume", str(run), "--no_progress"],
                     ARGS + ["--epochs", "1", "--out", str(run), "--overwrite"]):
            assert train_main(argv) == 2
            err = capsys.readouterr().err
            assert f"in use by landscape hessian, pid {os.getpid()}" in err, err
            assert _snapshot(run) == before
    assert sorted(p.name for p in run.iterdir()) == sorted(before)  # .lock removed


def test_owner_and_takeover_of_a_stale_lock(tmp_path, capsys):
    run = tmp_path / "run"
    assert owner(run) is None  # no folder
    assert train_main(ARGS + ["--epochs", "1", "--out", str(run)]) == 0
    assert owner(run) is None and not (run / LOCK).exists()
    lock = RunLock(run, "training").acquire()
    try:
        assert owner(run) == f"training, pid {os.getpid()} on {socket.gethostname()}"
        with pytest.raises(RunBusy, match=f"pid {os.getpid()}"):
            RunLock(run, "training").acquire()
    finally:
        lock.release()
    assert owner(run) is None and not (run / LOCK).exists()

    # A killed holder's lock file: its text stays, its flock went with the process.
    (run / LOCK).write_text(json.dumps({"pid": 2**22 + 1, "host": "gone", "what": "training"}))
    assert owner(run) is None
    capsys.readouterr()
    assert train_main(ARGS + ["--epochs", "1", "--out", str(run), "--overwrite"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "--overwrite" in line]
    assert not (run / LOCK).exists() and not any(LOCK in line for line in said), said
    (run / LOCK).write_text("not json")  # garbage in a stale lock file: taken over too
    assert train_main(["--resume", str(run), "--no_progress"]) == 0


def test_lock_file_is_the_trainers_own_and_not_a_run():
    assert run_folder.is_own(LOCK) and not run_folder.is_own(".lock.bak")
    assert run_folder.LOCK == ".lock"


def test_refusal_names_a_holder_that_has_not_named_itself(tmp_path):
    (tmp_path / LOCK).write_text("")
    with RunLock(tmp_path, "training"):
        (tmp_path / LOCK).write_text("")  # as between another holder's flock and its write
        with pytest.raises(RunBusy, match="a process that has not named itself"):
            RunLock(tmp_path, "training").acquire()
    assert not run_folder.holds_run(tmp_path) and list(tmp_path.iterdir()) == []
