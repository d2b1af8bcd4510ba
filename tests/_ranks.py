"""Two gloo ranks on this machine, for the data-parallel tests: one session at a time.

Every 2-rank session of the suite goes through :func:`spawn_two_ranks`, which holds one lock
shared by the pytest-xdist workers, so two gloo sessions never compete for the two cores and
the loopback ports at once, and which gets a fresh free port for every attempt. A rank killed
by a signal (gloo aborting a rendezvous on a starved machine, seen once in CI) is retried
once; a rank that raises, or a second crash, fails the test. :func:`run_torchrun`, the real
launcher in a subprocess, goes the same way (a rank aborted by gloo: seen once more, on a
machine whose two cores a background analysis also used).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch.multiprocessing as mp
from filelock import FileLock
from torch.multiprocessing.spawn import ProcessExitedException

__all__ = ["free_port", "shared_folder", "spawn_two_ranks", "run_torchrun"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_folder(tmp_path_factory) -> Path:
    """The base temporary folder common to every pytest-xdist worker of the run."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # gw0, gw1: .../pytest-N/popen-gwK
        shared = shared.parent
    return shared


def spawn_two_ranks(tmp_path_factory, worker, *args) -> None:
    """``worker(rank, 2, port, *args)`` in two processes, one session of the suite at a time."""
    with FileLock(str(shared_folder(tmp_path_factory) / "two_ranks.lock")):
        for attempt in (1, 2):
            try:
                mp.spawn(worker, args=(2, free_port(), *args), nprocs=2, join=True)
                return
            except ProcessExitedException as error:
                if attempt == 2 or error.signal_name is None:
                    raise


def run_torchrun(tmp_path_factory, module_argv, out: Path, **kwargs) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m MODULE_ARGV`` (``kwargs`` go to
    ``subprocess.run``), one 2-rank session of the suite at a time; run once more, ``out``
    removed first, when a rank was killed by a signal."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", *module_argv]
    with FileLock(str(shared_folder(tmp_path_factory) / "two_ranks.lock")):
        for attempt in (1, 2):
            done = subprocess.run(command, capture_output=True, text=True, **kwargs)
            killed = "Signal " in done.stderr and "received by PID" in done.stderr
            if done.returncode == 0 or attempt == 2 or not killed:
                return done
            if out.is_dir():
                shutil.rmtree(out)
            else:
                out.unlink(missing_ok=True)
