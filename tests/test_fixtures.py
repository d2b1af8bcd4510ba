"""The shared test fixtures do what the tests rely on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from _reference import cached_run, symmetric


def _config(run: str) -> dict:
    return json.loads((Path(run) / "config.json").read_text())


def test_cached_run_is_keyed_by_every_option_not_by_its_label(tmp_path_factory):
    one = cached_run(tmp_path_factory, "same-label", model="mlp", width=4, epochs=1)
    other = cached_run(tmp_path_factory, "same-label", model="mlp", width=6, epochs=1)
    assert one != other
    assert _config(one)["width"] == 4 and _config(other)["width"] == 6
    stamp = (Path(one) / "checkpoints.json").stat().st_mtime_ns
    # The same training spelled with a default written out is the same cached run, not retrained.
    again = cached_run(tmp_path_factory, "same-label", model="mlp", width=4, epochs=1, loss="CE")
    assert again == one and (Path(one) / "checkpoints.json").stat().st_mtime_ns == stamp


def test_symmetric_has_the_asked_spectrum():
    values = [-2.0, 0.0, 0.5, 3.0]
    H = symmetric(values, seed=3)
    assert np.allclose(H.numpy(), H.numpy().T, atol=0)
    assert np.allclose(np.linalg.eigvalsh(H.numpy()), values, atol=1e-12)
