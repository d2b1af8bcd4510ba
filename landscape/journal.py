"""An operator that keeps its products on disk, so that an interrupted eigensolver resumes.

A whole-group Hessian of a CIFAR ResNet over ten thousand images takes an hour or more on a
CPU, and Lanczos keeps its state in memory: killed, the run would start again from nothing.
The iteration is deterministic, though. With the same seed, the same operator is asked for the
same products ``H V`` in the same order, because every ``V`` is computed from the start block
and the products before it. So :class:`JournaledOperator` writes each product to a folder as
soon as it has it, beside a digest of the ``V`` that was asked for. Run again, it answers each
request from the folder for as long as the digests match, then computes on from there. The
result is the uninterrupted run's, bit for bit, at the cost of the products not yet written.

Two guards keep it from mixing two runs:

* ``key``, anything JSON can write, must identify the operator: what ``H`` is made of (the
  checkpoint's contents, not only its path; the samples, the loss, the dtype). The digests
  cannot notice a changed ``H``: the first request depends only on the seed, and every later
  one follows from the replayed products. A folder written under another key is emptied first.
* A request whose digest differs from the stored one (another seed, another tolerance that
  changed the restarts, another build of torch whose float64 rounding differs) drops that
  product and every later one; from there on everything is computed. So does a stored product
  that cannot be read.
* A request that differs from the stored one by rounding only is replayed all the same, its
  stored product being the product of a vector within rounding of it. Another number of CPU
  threads, for one, gives such requests: the QR that orthonormalises the start block (LAPACK)
  splits its work by threads, so the first request of a ResNet-20's 269,722 parameters differs
  in its last bits (by 3e-18). "Rounding only" is judged by a sketch of each request kept with
  its product (:func:`_sketch`: ``SKETCH_ROWS`` random-sign sums and the column norms), within
  ``SKETCH_RTOL`` of the norms: rounding moves a sketch by about ``sqrt(n) 1e-16`` of the norm,
  another vector by about the norm itself. Such a run is a valid run of the operator, but no
  longer the uninterrupted one's digits. The sketch is one more pass over each request, as
  the digest is; its signs are drawn once, as int8.

Bit for bit needs a deterministic operator too: :class:`landscape.hvp.GroupHessian` is, except
that it halves its batch after a CUDA out-of-memory error, after which a resumed run is still
a valid run but no longer the uninterrupted one's digits.

Only the journal's own files are ever removed (``key.json``, ``product_NNNNN.pt`` and the
temporary files of their atomic writes); anything else in the folder stays.

Example:
    >>> import tempfile
    >>> from landscape.eigen import extreme_eigenpairs
    >>> H = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    >>> folder = Path(tempfile.mkdtemp()) / "journal"
    >>> first = JournaledOperator(H, folder, key="diag")
    >>> a = extreme_eigenpairs(first, tol=1e-10)
    >>> again = JournaledOperator(H, folder, key="diag")  # as a rerun after a kill would
    >>> b = extreme_eigenpairs(again, tol=1e-10)
    >>> again.computed, again.replayed == first.computed
    (0, True)
    >>> bool((a.top == b.top).all()), round(float(b.top[0]), 8)
    (True, 10.0)
    >>> again.clear(); folder.exists()
    False
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import torch

from landscape.lanczos import operator_matmat, operator_size
from train.io import TEMP_RE, atomic_write_bytes

__all__ = ["JournaledOperator", "remove"]

_PRODUCT = re.compile(r"product_(\d{5})\.pt")
SKETCH_ROWS = 4  # random-sign sums of a request kept with its product
SKETCH_RTOL = 1e-8  # how close, relative to the column norms, a rounding-only change comes
_SKETCH_CHUNK = 1 << 20  # signs taken to float64 this many entries at a time (bounded memory)


class JournaledOperator:
    """``op`` with every product ``op.matmat(V)`` kept in ``folder`` (module docstring).

    Args:
        op: a :class:`landscape.hvp.GroupHessian`, a dense symmetric tensor, or anything with
            ``matmat`` and ``n_params`` or ``shape``; its ``dtype`` and ``device`` are passed
            on, so that the solvers treat the journal as they would ``op``.
        folder: the journal's folder (made if missing).
        key: identifies the operator (module docstring); a journal written under another key
            is emptied.

    Raises:
        TypeError: ``key`` is not JSON-writable.

    Attributes:
        computed: products computed by ``op`` in this process.
        replayed: products answered from the folder.
        hvps: the vectors of all answered products (a block of ``k`` counts ``k``), as
            :attr:`landscape.hvp.GroupHessian.hvps` counts them.
    """

    def __init__(self, op, folder, *, key: Any):
        self._matmat = operator_matmat(op)
        self.n_params = operator_size(op)
        self.dtype = getattr(op, "dtype", torch.float64)
        self.device = getattr(op, "device", None)
        self.folder = Path(folder)
        self.computed = self.replayed = self.hvps = 0
        self._signs = None  # the sketch's random signs, drawn at the first request
        self._next = 0  # the index of the next request
        self.folder.mkdir(parents=True, exist_ok=True)
        key_file = self.folder / "key.json"
        key = json.loads(json.dumps(key))  # as it reads back (tuples become lists)
        if _read_json(key_file) != key:
            _drop_from(self.folder, 0)
            atomic_write_bytes(key_file, json.dumps(key).encode())

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``op.matmat(V)``, from the folder when the request at this index had this ``V``."""
        if self._signs is None:
            self._signs = _signs(self.n_params)
        index, digest, sketch = self._next, _digest(V), _sketch(V, self._signs)
        self._next += 1
        self.hvps += V.shape[1]
        path = self.folder / f"product_{index:05d}.pt"
        stored = _read_product(path)
        if stored is not None and (stored["digest"] == digest or _close(stored, sketch)):
            self.replayed += 1
            return stored["product"].to(V.device if self.device is None else self.device)
        if path.exists():  # the runs part here (or the file is damaged): nothing later is theirs
            _drop_from(self.folder, index)
        product = self._matmat(V)
        buffer = io.BytesIO()
        torch.save({"digest": digest, "sketch": sketch, "product": product.detach().cpu()},
                   buffer)
        atomic_write_bytes(path, buffer.getvalue())  # whole on disk or absent
        self.computed += 1
        return product

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``op`` times one flat vector, through :meth:`matmat`."""
        return self.matmat(v.reshape(-1, 1)).reshape(-1)

    def clear(self) -> None:
        """Removes the journal (:func:`remove`), once its result is safe elsewhere."""
        remove(self.folder)


def remove(folder) -> None:
    """Removes a journal's files from ``folder``, and the folder when nothing else is in it."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    _drop_from(folder, 0)
    for path in folder.iterdir():
        if _written_name(path.name) == "key.json":
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty (a user's file), or already gone
        folder.rmdir()


def _drop_from(folder: Path, index: int) -> None:
    """Removes the products from ``index`` on, with any temporary file a kill left of one."""
    for path in folder.iterdir():
        match = _PRODUCT.fullmatch(_written_name(path.name))
        if match and int(match.group(1)) >= index:
            path.unlink(missing_ok=True)


def _written_name(name: str) -> str:
    """The file that ``name`` is, or is a temporary file of (``train.io.TEMP_RE``)."""
    temp = TEMP_RE.fullmatch(name)
    return temp.group("name") if temp else name


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing or damaged: no key
        return None


def _read_product(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 -- damaged (torch raises several kinds): recompute it
        return None
    return stored if isinstance(stored, dict) and {"digest", "product"} <= stored.keys() else None


def _signs(n: int) -> torch.Tensor:
    """The sketch's fixed ``(SKETCH_ROWS, n)`` random signs (seed 0), as int8: the memory of
    one float32 vector, drawn once per operator."""
    generator = torch.Generator().manual_seed(0)
    return (2 * torch.randint(0, 2, (SKETCH_ROWS, n), generator=generator) - 1).to(torch.int8)


def _sketch(V: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """``(SKETCH_ROWS + 1, k)`` float64: ``S V`` for the random signs ``S`` (:func:`_signs`,
    taken in chunks of rows, so that no float64 copy of ``S`` is made), and the column norms of
    ``V``."""
    V = V.detach().cpu().to(torch.float64)
    signs = _signs(V.shape[0]) if signs is None else signs
    sums = torch.zeros(SKETCH_ROWS, V.shape[1], dtype=torch.float64)
    for first in range(0, V.shape[0], _SKETCH_CHUNK):
        chunk = slice(first, first + _SKETCH_CHUNK)
        sums += signs[:, chunk].to(torch.float64) @ V[chunk]
    return torch.cat([sums, torch.linalg.vector_norm(V, dim=0, keepdim=True)])


def _close(stored: dict, sketch: torch.Tensor) -> bool:
    """Whether a stored product's request and this one differ by rounding only (module
    docstring); a product stored without a sketch matches by its digest alone."""
    old = stored.get("sketch")
    if not isinstance(old, torch.Tensor) or old.shape != sketch.shape:
        return False
    scale = sketch[-1].clamp_min(torch.finfo(torch.float64).tiny)
    return bool(((old - sketch).abs() <= SKETCH_RTOL * scale).all())


def _digest(V: torch.Tensor) -> str:
    V = V.detach().cpu().contiguous()
    h = hashlib.sha256(f"{V.dtype} {tuple(V.shape)}".encode())
    h.update(V.reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
    return h.hexdigest()
