"""Helpers of the reliability tests: killable training processes and run-folder checks.

Killing a training process at many moments needs many processes, and each ``python -m train``
spends 2-3 s importing torch and scikit-learn. The kill tests therefore start training processes
from a ``multiprocessing`` *forkserver* that imports the package once: the server is a fresh,
single-threaded interpreter (never the pytest worker, whose torch thread pools would make a
fork unsafe), and each training process it forks is a real OS process running
``train.cli.main`` that the test ends with a real ``SIGKILL``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

# torch._dynamo: torch.optim imports it on first use, which alone takes seconds.
PRELOAD = ["torch", "torch._dynamo", "sklearn.datasets", "tqdm.auto", "train.loop", "train.cli",
           "_kill_helpers"]


def forkserver_context():
    """The forkserver context, with the package preloaded in the server."""
    tests = str(Path(__file__).resolve().parent)
    if tests not in sys.path:  # the server imports this module by name
        sys.path.insert(0, tests)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def noop() -> None:
    """A process that does nothing (to start the forkserver before anything is timed)."""


def run_cli(argv: list[str], log_path: str, rename_delay: float = 0.0) -> None:
    """Target of a forked training process: ``train.cli.main(argv)``, output to ``log_path``.

    ``rename_delay`` makes every rename of a finished temporary file wait that long, after
    its fsync and before its rename, so that a kill can be aimed at a checkpoint write.
    """
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import threading

    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(1)  # the reference run in the test process uses one thread too
    tqdm.set_lock(threading.RLock())  # not tqdm's default semaphore, which a kill would leak
    if rename_delay:
        real_replace = os.replace

        def slow_replace(src, dst, *args, **kwargs):
            if str(src).endswith(".tmp"):
                time.sleep(rename_delay)
            return real_replace(src, dst, *args, **kwargs)

        os.replace = slow_replace
    from train.cli import main

    rc = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def run_left_alone(folder: Path, argv: list[str]) -> Path:
    """Trains ``python -m train ARGV --out FOLDER/run`` in this process, uninterrupted (the
    reference the interrupted runs must equal; one thread, like the processes tested)."""
    from train.cli import parse
    from train.loop import train

    out = folder / "run"
    config, *_ = parse(argv + ["--out", str(out)])
    train(config, out, progress=False, log=lambda message: None)
    return out


def temp_files(run: Path) -> list[str]:
    from train.io import TEMP_RE

    return sorted(p.name for p in run.iterdir() if TEMP_RE.match(p.name)) if run.is_dir() else []


def check_run_folder(run: Path) -> int:
    """Asserts that every file of a run folder is whole and loads; returns the checkpoints seen.

    ``config.json`` and the manifest parse, ``metrics.jsonl`` holds only whole JSON lines, and
    every ``epoch_NNNN.pt`` loads with its digest verified.
    """
    from train import checkpoint as ckpt
    from train.config import Config

    if (run / "config.json").exists():
        Config.from_json(ckpt.read_config(run))
    if (run / ckpt.MANIFEST).exists():
        assert isinstance(json.loads((run / ckpt.MANIFEST).read_text()), dict)
    if (run / "metrics.jsonl").exists():
        data = (run / "metrics.jsonl").read_bytes()
        assert data == b"" or data.endswith(b"\n"), "metrics.jsonl ends in a partial line"
        for line in data.splitlines():
            assert isinstance(json.loads(line), dict)
    found = ckpt.list_checkpoints(run)
    for epoch, path in found:
        assert ckpt.load_checkpoint(path)["epoch"] == epoch
    return len(found)


def digests(run: Path) -> dict[str, str]:
    """SHA-256 of every checkpoint present (its recorded digest, verified by loading)."""
    from train import checkpoint as ckpt

    manifest = json.loads((run / ckpt.MANIFEST).read_text())
    names = [path.name for _, path in ckpt.list_checkpoints(run)]
    for _, path in ckpt.list_checkpoints(run):
        ckpt.load_checkpoint(path)
    return {name: manifest[name]["sha256"] for name in names}


def metrics_without_time(run: Path) -> list[dict]:
    from train import checkpoint as ckpt

    return [{k: v for k, v in row.items() if k != "seconds"} for row in ckpt.read_metrics(run)]
