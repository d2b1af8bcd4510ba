"""Atomic writes: every file of a run is complete on disk or absent, whatever stops the writer.

* Training processes are killed with SIGKILL at random moments (and, aimed by a slowed rename,
  in the middle of checkpoint writes); after every kill each file present loads, and
  ``--resume`` carries the run to the end with checkpoints bitwise equal to a run left alone.
* Failed writes (disk full, no permission) are simulated in-process by making ``os.fsync``,
  ``os.write`` or ``tempfile.mkstemp`` raise: the earlier checkpoints stay intact, the error is
  one line, and no temporary file is left behind.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _kill_helpers import (check_run_folder, digests, forkserver_context,  # noqa: E402
                           metrics_without_time, noop, run_cli, run_left_alone, temp_files)
from train import checkpoint as ckpt  # noqa: E402
from train import io as tio  # noqa: E402
from train.cli import main as train_main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# SSE-SAM switches stage at epoch ceil(0.7 * 10) = 7; --save_every 2 makes resumed runs redo
# epochs whose metrics lines were already written.
ARGS = ["--dataset", "digits", "--opt", "ssesam", "--epochs", "10", "--lr", "0.1",
        "--imb_factor", "20", "--save_every", "2", "--seed", "3", "--no_progress"]
KILLS = 24


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The run of ``ARGS`` left alone."""
    return run_left_alone(tmp_path_factory.mktemp("reference"), ARGS)


def _wait_for_temp(run: Path, process, prefix: str, old: set, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while process.is_alive() and time.monotonic() < deadline:
        if any(name.startswith(prefix) for name in set(temp_files(run)) - old):
            return
        time.sleep(0.003)


@pytest.mark.slow
def test_sigkill_24_times_files_stay_whole_and_resume_is_exact(tmp_path, reference):
    context = forkserver_context()
    rng = random.Random(20240605)
    log = tmp_path / "children.log"
    warm_up = context.Process(target=noop)  # the server's start-up is not part of the timing
    warm_up.start()
    warm_up.join()
    runs, kills, aimed, killed_with_temp, killed_with_checkpoint_temp = [], 0, 0, 0, 0
    run = None
    while kills < KILLS:
        if run is None:
            run = tmp_path / f"run{len(runs)}"
            runs.append(run)
        # Until config.json exists there is no run to resume: the first command is repeated.
        argv = (["--resume", str(run), "--no_progress"] if (run / "config.json").exists()
                else ARGS + ["--out", str(run)])
        aim = kills % 2 == 1  # every other kill is aimed into a write
        old = set(temp_files(run))
        process = context.Process(target=run_cli, args=(argv, str(log), 0.25 if aim else 0.0))
        process.start()
        if aim:
            _wait_for_temp(run, process, ".epoch_" if kills % 4 == 1 else ".", old)
            time.sleep(rng.uniform(0.0, 0.1))  # the kill lands inside the 0.25 s window
        else:
            time.sleep(rng.uniform(0.05, 1.0))
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
        process.join()
        if process.exitcode == -signal.SIGKILL:
            kills += 1
            aimed += aim
            temps = set(temp_files(run)) - old
            killed_with_temp += bool(temps)
            killed_with_checkpoint_temp += any(t.startswith(".epoch_") for t in temps)
        else:
            assert process.exitcode == 0, log.read_text()[-2000:]
            run = None  # finished before the kill: the next kills go to a new run
        if run is not None:
            check_run_folder(run)  # after every kill: each file present is whole and loads
    print(f"{kills} SIGKILLs ({aimed} aimed at writes) over {len(runs)} run folder(s); "
          f"{killed_with_temp} left a temporary file, {killed_with_checkpoint_temp} of them "
          "a half-done checkpoint")
    assert killed_with_checkpoint_temp >= 3, "too few kills landed inside a checkpoint write"

    if run is not None:  # the last run was killed: carry it on with the real command line
        argv = (["--resume", str(run)] if (run / "config.json").exists()
                else ARGS + ["--out", str(run)])
        done = subprocess.run([sys.executable, "-m", "train", *argv, "--no_progress"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr
    expected_digests, expected_metrics = digests(reference), metrics_without_time(reference)
    for finished in runs:
        assert temp_files(finished) == [], "stale temporary files were not cleaned"
        assert check_run_folder(finished) == len(expected_digests)
        assert digests(finished) == expected_digests  # bitwise: weights, momentum, config
        assert metrics_without_time(finished) == expected_metrics


def test_stale_temporary_files_are_ignored_and_cleaned_on_resume(tmp_path, reference, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    # A run stopped after epoch 4, with what kills leave behind: half-written files.
    for epoch in (10, 8, 6):
        ckpt.checkpoint_path(run, epoch).unlink()
    stale = [run / ".epoch_0006.pt.k3j9_x0a.tmp", run / ".checkpoints.json.0123abcd.tmp",
             run / ".metrics.jsonl.zzzz9999.tmp"]
    for path in stale:
        path.write_bytes(b"PK\x03\x04 half a file")
    keep = [run / ".notes.tmp", run / "epoch_0006.pt.bak",  # not the trainer's: never touched
            run / ".report.json.abcd1234.tmp"]  # e.g. an analysis writing at the same time
    for path in keep:
        path.write_bytes(b"user data")
    assert [e for e, _ in ckpt.list_checkpoints(run)] == [0, 2, 4]
    import landscape

    assert landscape.load(run, device="cpu").epoch == 4
    assert check_run_folder(run) == 3

    assert train_main(["--resume", str(run), "--no_progress"]) == 0
    err = capsys.readouterr().err
    assert "removed 3 stale temporary file(s)" in err
    assert not any(path.exists() for path in stale)
    assert all(path.read_bytes() == b"user data" for path in keep)
    assert digests(run) == digests(reference)


def _faulty(real, fail_on: int, error: OSError):
    """``real`` that raises ``error`` on its ``fail_on``-th call (1-based) and works otherwise."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_on:
            raise error
        return real(*args, **kwargs)

    return wrapper


def test_atomic_write_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    tio.atomic_write_json(path, {"old": True})
    monkeypatch.setattr(os, "fsync", _faulty(os.fsync, 1, OSError(errno.ENOSPC,
                                                                  "No space left on device")))
    with pytest.raises(OSError) as caught:
        tio.atomic_write_json(path, {"new": True})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_text() == '{\n  "old": true\n}\n'
    assert temp_files(tmp_path) == []
    # A library writer (np.savez, savefig) through atomic_writer: an error leaves no file.
    with pytest.raises(RuntimeError):
        with tio.atomic_writer(tmp_path / "eig.npz") as f:
            np.savez(f, values=np.arange(3))
            raise RuntimeError("the analysis failed half-way")
    assert not (tmp_path / "eig.npz").exists() and temp_files(tmp_path) == []
    with tio.atomic_writer(tmp_path / "eig.npz") as f:
        np.savez(f, values=np.arange(3))
    assert np.load(tmp_path / "eig.npz")["values"].tolist() == [0, 1, 2]
    assert (tmp_path / "eig.npz").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_append_line_is_whole_or_absent(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    tio.append_line(path, {"epoch": 1})
    before = path.read_bytes()
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:7]))  # a short write
    with pytest.raises(OSError) as caught:
        tio.append_line(path, {"epoch": 2, "acc": 50.0})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_bytes() == before  # the torn part was cut off again
    monkeypatch.setattr(os, "write", real_write)
    tio.append_line(path, {"epoch": 2})
    assert ckpt.read_metrics(tmp_path) == [{"epoch": 1}, {"epoch": 2}]


@pytest.mark.parametrize("fault", ["fsync ENOSPC in a checkpoint", "write ENOSPC in metrics",
                                   "mkstemp EACCES for the manifest"])
def test_failed_write_keeps_earlier_checkpoints_and_says_so(tmp_path, monkeypatch, capsys,
                                                            reference, fault):
    run = tmp_path / "run"
    argv = ARGS + ["--out", str(run)]
    import tempfile

    calls = {"n": 0}
    real_fsync, real_write, real_mkstemp = os.fsync, os.write, tempfile.mkstemp

    def fsync(fd):  # fails for the temporary file of epoch_0004.pt
        if "epoch_0004" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    def write(fd, data):
        if data.startswith(b"{") and b'"epoch": 5' in data:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    def mkstemp(*args, prefix="", **kwargs):
        if prefix.startswith(".checkpoints.json"):
            calls["n"] += 1
            if calls["n"] == 4:  # the manifest update of epoch 6
                raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))
        return real_mkstemp(*args, prefix=prefix, **kwargs)

    if fault.startswith("fsync"):
        monkeypatch.setattr(os, "fsync", fsync)
        last, words = 2, ["epoch_0004.pt", "No space left on device"]
    elif fault.startswith("write"):
        monkeypatch.setattr(os, "write", write)
        last, words = 4, ["metrics.jsonl", "No space left on device"]
    else:
        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        last, words = 4, ["Permission denied"]
    before = digests(reference)
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "earlier checkpoints are intact" in err and all(w in err for w in words), err
    assert temp_files(run) == []
    assert max(e for e, _ in ckpt.list_checkpoints(run)) == last
    check_run_folder(run)
    assert digests(run) == {k: v for k, v in before.items() if int(k[6:10]) <= last}

    monkeypatch.undo()  # space again: the run carries on and ends as if nothing happened
    assert train_main(["--resume", str(run), "--no_progress"]) == 0
    assert digests(run) == before
    assert metrics_without_time(run) == metrics_without_time(reference)
