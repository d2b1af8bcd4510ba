"""Shared set-up of the test suite (keep this file small)."""

from __future__ import annotations

import torch

# The suite runs with `pytest -n 2` on two cores: one intra-op thread per worker avoids
# oversubscription, which makes tiny models many times slower.
torch.set_num_threads(1)
