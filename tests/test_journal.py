"""landscape.journal: an interrupted eigensolver run, resumed from its journal, is the
uninterrupted run bit for bit, and a journal never answers for another run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from landscape.eigen import extreme_eigenpairs
from landscape.hvp import GroupHessian
from landscape.journal import JournaledOperator


class _Counted:
    """A dense symmetric operator that counts its products and fails after ``fail_after``."""

    def __init__(self, H: torch.Tensor, fail_after: int | None = None):
        self.H, self.n_params, self.dtype = H, H.shape[0], H.dtype
        self.calls, self.fail_after = 0, fail_after

    def matmat(self, V):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        return self.H @ V


def _saddle(n: int = 40, seed: int = 0) -> torch.Tensor:
    """A symmetric matrix with negative and positive eigenvalues, a repeated pair at the top."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    values = torch.linspace(-3.0, 2.0, n, dtype=torch.float64)
    values[-2:] = 5.0
    return Q @ torch.diag(values) @ Q.T


def _same(a, b) -> bool:
    pairs = ((a.top, b.top), (a.bottom, b.bottom), (a.top_vectors, b.top_vectors),
             (a.bottom_vectors, b.bottom_vectors))
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)


@pytest.mark.parametrize("killed_after", [0, 1, 7, 15])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, killed_after):
    H = _saddle()
    kwargs = dict(top=2, bottom=1, tol=1e-10, max_steps=60, seed=3)
    counted = _Counted(H)
    plain = extreme_eigenpairs(counted, **kwargs)
    with pytest.raises(KeyboardInterrupt):
        extreme_eigenpairs(JournaledOperator(_Counted(H, fail_after=killed_after),
                                             tmp_path / "j", key="H"), **kwargs)
    op = _Counted(H)
    journal = JournaledOperator(op, tmp_path / "j", key="H")
    resumed = extreme_eigenpairs(journal, **kwargs)
    assert _same(resumed, plain)
    assert journal.replayed == killed_after  # what was written before the kill is reused
    assert op.calls == journal.computed == counted.calls - killed_after
    assert resumed.converged and abs(float(resumed.top[0]) - 5.0) < 1e-8


def test_another_key_empties_the_journal(tmp_path):
    H = _saddle()
    extreme_eigenpairs(JournaledOperator(H, tmp_path, key={"run": "a"}), tol=1e-8)
    other = _saddle(seed=1)
    journal = JournaledOperator(other, tmp_path, key={"run": "b"})
    result = extreme_eigenpairs(journal, tol=1e-8)
    assert journal.replayed == 0
    assert abs(float(result.bottom[0]) - float(torch.linalg.eigvalsh(other)[0])) < 1e-7


def test_a_diverging_request_drops_the_rest(tmp_path):
    """Same key, another seed: the first request already differs, so nothing stale is used
    and the products of the first run beyond the second's are gone."""
    H = _saddle()
    first = JournaledOperator(H, tmp_path, key="H")
    extreme_eigenpairs(first, tol=1e-12, max_steps=40, seed=0)
    op = _Counted(H)
    second = JournaledOperator(op, tmp_path, key="H")
    result = extreme_eigenpairs(second, tol=1e-4, max_steps=40, seed=1)
    counted = _Counted(H)
    assert _same(result, extreme_eigenpairs(counted, tol=1e-4, max_steps=40, seed=1))
    assert second.replayed == 0 and op.calls == counted.calls
    assert first.computed > counted.calls  # so the first run's last products were dropped
    assert len(list(tmp_path.glob("product_*.pt"))) == counted.calls


@pytest.mark.parametrize("change, replayed", [(1e-15, True), (1e-6, False)])
def test_a_request_changed_by_rounding_only_is_replayed(tmp_path, change, replayed):
    """As a resume on another thread count asks: the same start block up to its last bits.
    Rounding (1e-15 relative) replays every product, to the uninterrupted numbers within
    rounding; a change far above it (1e-6) replays none and computes them all again."""
    # Distinct eigenvalues: at _saddle's repeated top, rounding may turn the Ritz vector within
    # the eigenspace, and the residual product is then rightly asked for another vector.
    g = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    H = Q @ torch.diag(torch.linspace(-3.0, 5.0, 40, dtype=torch.float64)) @ Q.T
    start = torch.randn(H.shape[0], generator=g, dtype=torch.float64)
    first = JournaledOperator(H, tmp_path, key="H")
    a = extreme_eigenpairs(first, tol=1e-10, start=start)
    nudged = start * (1 + change * torch.randn(start.shape, generator=g, dtype=torch.float64))
    op = _Counted(H)
    again = JournaledOperator(op, tmp_path, key="H")
    b = extreme_eigenpairs(again, tol=1e-10, start=nudged)
    assert (again.replayed, op.calls) == ((first.computed, 0) if replayed else (0, first.computed))
    np.testing.assert_allclose(b.top, a.top, rtol=1e-12)
    np.testing.assert_allclose(b.bottom, a.bottom, rtol=1e-12)


def test_a_sketch_is_close_to_its_request_by_rounding_and_far_from_another():
    from landscape.journal import SKETCH_RTOL, _close, _sketch

    g = torch.Generator().manual_seed(0)
    V = torch.randn(3 * (1 << 20) // 2, 2, generator=g, dtype=torch.float64)  # two chunks
    stored = {"sketch": _sketch(V)}
    assert _close(stored, _sketch(V * (1 + 1e-15)))
    # float32 rounding (3e-8 of the norm here) is not the rounding of float64 requests
    assert not _close(stored, _sketch(V.to(torch.float32).to(torch.float64)))
    other = V.clone()
    other[7, 1] += 1e-4 * float(V[:, 1].norm())  # one entry, a hundred-thousandth of the norm
    assert not _close(stored, _sketch(other))
    assert not _close({}, _sketch(V)) and not _close(stored, _sketch(V[:, :1]))
    assert SKETCH_RTOL < 1e-4


def test_a_run_that_parts_midway_replays_up_to_there(tmp_path):
    """Same seed, more steps allowed: the first run's Lanczos products are replayed, its
    residual products (where the longer run asks for step 11 instead) are not."""
    H = _saddle()
    short = JournaledOperator(H, tmp_path, key="H")
    extreme_eigenpairs(short, tol=1e-14, max_steps=10, seed=0)
    longer = JournaledOperator(_Counted(H), tmp_path, key="H")
    result = extreme_eigenpairs(longer, tol=1e-14, max_steps=20, seed=0)
    assert longer.replayed == 10 < short.computed
    assert _same(result, extreme_eigenpairs(H, tol=1e-14, max_steps=20, seed=0))


def test_a_damaged_product_is_computed_again(tmp_path):
    H = _saddle()
    plain = extreme_eigenpairs(H, tol=1e-8, seed=0)
    extreme_eigenpairs(JournaledOperator(H, tmp_path, key="H"), tol=1e-8, seed=0)
    (tmp_path / "product_00003.pt").write_bytes(b"half a file")
    op = _Counted(H)
    journal = JournaledOperator(op, tmp_path, key="H")
    assert _same(extreme_eigenpairs(journal, tol=1e-8, seed=0), plain)
    assert journal.replayed == 3 and op.calls == journal.computed > 0


def test_clear_removes_only_the_journals_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    journal = JournaledOperator(_saddle(), tmp_path, key="H")
    extreme_eigenpairs(journal, tol=1e-8)
    (tmp_path / ".product_00099.pt.abcd1234.tmp").write_bytes(b"")  # a kill mid-write
    journal.clear()
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    journal = JournaledOperator(_saddle(), tmp_path / "j", key="H")
    extreme_eigenpairs(journal, tol=1e-8)
    journal.clear()
    assert not (tmp_path / "j").exists()


def test_a_group_hessian_with_batchnorm_through_the_journal(tmp_path):
    """The operator the bench journals: float32 products, float64 recurrence, BatchNorm in
    eval mode. Resumed after a kill, the same numbers as without a journal."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 3))
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 1, 6, 6))  # running statistics that are not the defaults
    x, y = torch.randn(20, 1, 6, 6), torch.randint(0, 3, (20,))

    def op():
        return GroupHessian(model, nn.CrossEntropyLoss(reduction="none"), x, y,
                            dtype=torch.float32)

    kwargs = dict(top=1, bottom=1, tol=1e-4, max_steps=40, seed=0)
    plain = extreme_eigenpairs(op(), **kwargs)

    class Killed(Exception):
        pass

    inner = op()
    inner.matmat = lambda V, f=inner.matmat: f(V) if inner.hvps < 5 else _raise(Killed())
    with pytest.raises(Killed):
        extreme_eigenpairs(JournaledOperator(inner, tmp_path, key="bn"), **kwargs)
    journal = JournaledOperator(op(), tmp_path, key="bn")
    assert journal.dtype == torch.float32
    assert _same(extreme_eigenpairs(journal, **kwargs), plain)
    assert journal.replayed == 5


def _raise(error):
    raise error
