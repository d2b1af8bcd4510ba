"""Shared fixtures of the test suite (keep this file small)."""

from __future__ import annotations

import pytest
import torch

# The suite runs with `pytest -n 2` on two cores: one intra-op thread per worker avoids
# oversubscription, which makes tiny models many times slower.
torch.set_num_threads(1)


@pytest.fixture
def float64():
    """Makes float64 the default dtype for one test (reference computations)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
