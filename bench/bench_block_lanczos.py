"""Extreme eigenvalues with multiplicities: HVPs and errors of ``landscape.eigen`` (block
Lanczos, a block of ``max(top, bottom)`` vectors) on the test problems, against dense float64
eigenvalues.

    .venv/bin/python bench/bench_block_lanczos.py            # trains two tiny runs first

Cases: the width-1 MLP of issue 10's D8 (87 parameters, 78 exact zero eigenvalues; bottom 3),
a dense matrix with a repeated top (``[5, 5, 5]`` above 100 eigenvalues evenly in 0..4.5; top 3,
bottom 2), the known spectrum of tests/test_lanczos.py (top 4, bottom 3, tol 1e-10) and the
tiny width-8 MLP's head group (top 5 + bottom 1, the BENCHMARKS.md Hessian table's question;
tol 1e-6). Error = the largest absolute error of the reported eigenvalues over ``||H||``.
Figures go to BENCHMARKS.md ("Hessian analysis").
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import landscape  # noqa: E402
from landscape.eigen import extreme_eigenpairs  # noqa: E402
from landscape.hvp import GroupHessian  # noqa: E402

from _reference import dense_eigh, dense_group_hessian, symmetric, tiny_run  # noqa: E402


def _case(name: str, op, dense: torch.Tensor, top: int, bottom: int, tol: float) -> None:
    exact = dense_eigh(dense)
    began = time.perf_counter()
    r = extreme_eigenpairs(op, top=top, bottom=bottom, tol=tol, seed=0)
    seconds = time.perf_counter() - began
    wanted = np.r_[exact[::-1][:top], exact[:bottom]]
    error = np.abs(np.r_[r.top, r.bottom] - wanted).max() / np.abs(exact).max()
    block = getattr(r, "block_size", 1)
    print(f"| {name} | {top} + {bottom} | {tol:g} | {block} | {r.steps} | {r.hvps} | "
          f"{error:.1e} | {r.converged} | {seconds:.3f} |")


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        width1 = landscape.load(tiny_run(Path(folder) / "w1", width=1, epochs=4), device="cpu")
        width8 = landscape.load(tiny_run(Path(folder) / "w8", width=8, epochs=2), device="cpu")
        print("| case | top + bottom | tol | block | steps | HVPs | error / norm | converged "
              "| seconds |")
        print("|---|---|---|---|---|---|---|---|---|")
        _case("D8: width-1 MLP, all (87 params)", GroupHessian.from_run(width1, "all"),
              dense_group_hessian(width1, "all"), 1, 3, 1e-6)
        repeated = symmetric(np.r_[[5.0, 5.0, 5.0], np.linspace(0, 4.5, 100)], seed=6)
        _case("[5, 5, 5] + 100 in 0..4.5 (dense)", repeated, repeated, 3, 2, 1e-6)
        known = symmetric(np.r_[np.linspace(-3, 5, 150), [9.0, 8.5, -4.0]])
        _case("test_lanczos known spectrum (dense, 153)", known, known, 4, 3, 1e-10)
        _case("width-8 MLP, head (682 params)", GroupHessian.from_run(width8, "head"),
              dense_group_hessian(width8, "head"), 5, 1, 1e-6)
        _case("width-8 MLP, head, extremes only", GroupHessian.from_run(width8, "head"),
              dense_group_hessian(width8, "head"), 1, 1, 1e-6)


if __name__ == "__main__":
    main()
