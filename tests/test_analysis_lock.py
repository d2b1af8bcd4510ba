"""Analyses that write into a run folder take its lock (issue 10, point 1, the landscape side):
a live process (here a real second process holding the lock, as a trainer does) keeps the
report's caches and a default-placed surface out; the report still reads the run and says so
in one line."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from train.run_folder import LOCK, owner

ROOT = Path(__file__).resolve().parents[1]
REPORT = ["--steps", "10", "--probes", "1", "--no_densities", "--groups", "tail",
          "--no_progress", "--device", "cpu"]


@pytest.fixture
def run_copy(tiny_mlp_path, tmp_path) -> Path:
    """The shared tiny run without the caches that other tests' analyses wrote into it (the
    tests here check what an analysis writes)."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_mlp_path, copy, ignore=shutil.ignore_patterns("hessian", "surface"))
    return copy


@pytest.fixture
def trainer(run_copy):
    """Another process holding the run's lock as a trainer does, until the test ends."""
    code = textwrap.dedent(f"""
        import sys, time
        from train.run_folder import RunLock
        with RunLock({str(run_copy)!r}, "training"):
            print("held", flush=True)
            sys.stdin.read()
    """)
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield process
    process.stdin.close()
    process.wait(timeout=60)


def test_report_reads_a_run_being_trained_says_so_and_writes_nothing_into_it(
        run_copy, trainer, tmp_path, landscape_cli):
    code, _, err = landscape_cli(["report", str(run_copy), "--out", str(tmp_path / "rep"),
                                  *REPORT])
    assert code == 0, err
    assert (f"{run_copy} is being trained by pid {trainer.pid} on {socket.gethostname()}; "
            "using its checkpoints so far") in err
    assert not (run_copy / "hessian").exists()          # no cache written into the run
    assert owner(run_copy).startswith("training")       # and the trainer's lock untouched


def test_report_writes_its_caches_under_the_lock_when_no_one_trains(run_copy, tmp_path,
                                                                   landscape_cli):
    code, _, err = landscape_cli(["report", str(run_copy), "--out", str(tmp_path / "rep"),
                                  *REPORT])
    assert code == 0, err and "being trained" not in err
    assert list((run_copy / "hessian").glob("epoch_*_tail.json"))
    assert not (run_copy / LOCK).exists()                # released


def test_a_surface_into_a_run_being_trained_is_refused(run_copy, trainer, tmp_path,
                                                       landscape_cli):
    code, _, err = landscape_cli(["surface", str(run_copy), "--grid", "2", "--dim", "1",
                                  "--no_progress", "--device", "cpu"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"pid {trainer.pid}" in err and "--out" in err
    assert not (run_copy / "surface").exists()
    # Elsewhere it is fine.
    code, _, err = landscape_cli(["surface", str(run_copy), "--grid", "2", "--dim", "1",
                                  "--out", str(tmp_path / "s"), "--no_progress",
                                  "--device", "cpu"])
    assert code == 0, err


def test_a_surface_into_the_run_holds_the_lock_and_releases_it(run_copy, landscape_cli,
                                                               monkeypatch):
    import landscape.surface

    seen = []
    compute = landscape.surface.compute_surface

    def spy(*args, **kwargs):
        seen.append(owner(run_copy))
        return compute(*args, **kwargs)

    monkeypatch.setattr(landscape.surface, "compute_surface", spy)
    code, _, err = landscape_cli(["surface", str(run_copy), "--grid", "2", "--dim", "1",
                                  "--no_progress", "--device", "cpu"])
    assert code == 0, err
    assert seen and seen[0].startswith("landscape surface")
    assert owner(run_copy) is None and not (run_copy / LOCK).exists()
