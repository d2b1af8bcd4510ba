"""Shared set-up of the test suite: fixtures used by several test modules.

Plain helpers and constants live in ``_reference.py`` (dense Hessians, ``symmetric``, the tiny
runs' options) and ``_runs.py`` (``train_digits``) so that test modules can import them.
"""

from __future__ import annotations

import pytest
import torch

from _reference import TINY_CNN, TINY_MLP, cached_run

# The suite runs with `pytest -n 2` on two cores: one intra-op thread per worker avoids
# oversubscription, which makes tiny models many times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_mlp_path(tmp_path_factory) -> str:
    """A tiny digits-LT MLP run (``TINY_MLP``), trained once per test process."""
    return cached_run(tmp_path_factory, "mlp", **TINY_MLP)


@pytest.fixture(scope="session")
def tiny_cnn_path(tmp_path_factory) -> str:
    """A tiny BatchNorm CNN run with the VS loss (``TINY_CNN``), trained once per process."""
    return cached_run(tmp_path_factory, "cnn", **TINY_CNN)


@pytest.fixture
def landscape_cli(capsys):
    """Runs ``python -m landscape ARGV`` in process; returns ``(exit code, stdout, stderr)``."""
    from landscape.cli import main

    def run(argv: list[str]) -> tuple[int, str, str]:
        code = main(argv)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
