"""The saddle question on real CIFAR-10-LT: SGD, SAM, ImbSAM and SSE-SAM, then the saddle report.

    .venv/bin/python bench/saddle_cifar10.py --root checkpoints/cifar10-lt            # everything
    .venv/bin/python bench/saddle_cifar10.py --root checkpoints/cifar10-lt --stage train --jobs 2

Every stage resumes: run it again after an interruption and it carries on where it stopped
(training from each run's newest checkpoint, the analysis from its per-checkpoint caches).

Stages:

1. ``data``: real CIFAR-10 from the JPEG archive (``--archive``, all 60,000 images; see
   ``../shared/data/README.md``) is decoded once with Pillow into the standard CIFAR python
   batches under ``ROOT/data/cifar-10-batches-py`` (classes in sorted-name order = CIFAR-10's
   label order; within a class, the archive's file order), so that ``--dataset cifar10
   --selection first`` keeps the first ``n_c`` images of every class, as the SSE-SAM code does.
   CIFAR-10-LT IF=100 then holds 5000, 2997, ..., 50 images (12,406); the test set all 10,000.
2. ``train``: the runs of :data:`RUNS` (``--jobs`` at a time, one CPU thread each).
3. ``analysis``: the Hessian numbers, one JSON file per (run, checkpoint, group, kind) under
   ``ROOT/analysis/`` (written atomically, skipped when present; :data:`ANALYSIS` says what is
   computed, cheapest and most needed first), ``--jobs`` processes at a time, one thread each.
   A whole-group task (``--full``) keeps each Hessian-vector product in ``TASK.journal/`` as it
   comes, so that a killed one resumes from its last product (:mod:`landscape.journal`),
   and is checked by its witness: the whole group's curvature along the 512-image extreme
   eigenvectors, which would prove a missed eigenvalue (``witness_*.json``, :func:`_witness`).
4. ``figures``: the figures and ``ROOT/table.md`` from those files (no computation).

The choices (measured first, see RESULTS.md): batch 128, lr 0.1 cosine, weight decay 5e-4, CE;
by default ResNet-8 (the CIFAR ResNet family at 1 block a stage, 75k parameters, BatchNorm) for
30 epochs. ``--model`` and ``--epochs`` choose another size; a root keeps the size it was made
with (``ROOT/setting.json``), so one root never mixes two.
``eta = 1000``: the tail is the classes with fewer than 1,000 images (classes 4-9, 1,536
images), which mirrors the paper's CIFAR-100 choice (eta = 100 = n_max / 5: Medium and Few are
tail).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
COMMON = dict(dataset="cifar10", imb_factor=100.0, selection="first", eta=1000.0, model="resnet8",
              loss="CE", epochs=30, batch_size=128, lr=0.1, momentum=0.9, wd=5e-4, save_every=5,
              device="cpu")
# name -> the optimizer's settings. ImbSAM is the ImbSAM authors' own code (batch-mean
# normalisation, tail loss x2) with SSE-SAM's tail radius, so that it differs from SSE-SAM's
# second stage only by that factor; SAM uses the seed's rho.
RUNS = {
    "sgd-s9826": dict(opt="sgd", seed=9826),
    "ssesam-s9826": dict(opt="ssesam", head_rho=0.05, tail_rho=0.1, gamma=0.7, seed=9826),
    "sam-s9826": dict(opt="sam", rho=0.05, seed=9826),
    "imbsam-s9826": dict(opt="imbsam", rho=0.1, tail_scale=2.0, seed=9826),
    "sgd-s1": dict(opt="sgd", seed=1),
    "ssesam-s1": dict(opt="ssesam", head_rho=0.05, tail_rho=0.1, gamma=0.7, seed=1),
}


MODELS = ("resnet8", "resnet20", "resnet32")  # the CIFAR ResNets of train.options.MODELS
SIZE = ("model", "epochs")  # what a root's setting.json fixes; the rest is COMMON


def setting_of(root: Path) -> dict:
    """The root's size (``model``, ``epochs``): what :func:`fix_setting` wrote, or the defaults."""
    path = root / "setting.json"
    stored = json.loads(path.read_text()) if path.is_file() else {}
    return {k: stored.get(k, COMMON[k]) for k in SIZE}


def fix_setting(root: Path, **asked) -> dict:
    """Binds ``root`` to one size the first time, and refuses another size later.

    A root made before ``setting.json`` existed takes the size of the runs it holds.

    Raises:
        ValueError: ``asked`` (the flags given, ``None`` = not given) contradicts the root.
    """
    from train.io import atomic_write_json

    path = root / "setting.json"
    if path.is_file():
        setting = setting_of(root)
    else:
        configs = sorted((root / "runs").glob("*/config.json"))
        made = json.loads(configs[0].read_text()) if configs else {}
        setting = {k: made.get(k, asked[k] if asked[k] is not None else COMMON[k])
                   for k in SIZE}
    if asked.get("epochs") is not None and asked["epochs"] < 1:
        raise ValueError(f"--epochs must be at least 1, not {asked['epochs']}")
    clash = {k: v for k, v in asked.items() if v is not None and v != setting[k]}
    if clash:
        raise ValueError(f"{root} holds the {setting['model']}, {setting['epochs']}-epoch runs; "
                         f"use another --root for {clash}")
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, setting)
    return setting


def curve_epochs(end: int, points: int | None = None) -> list[int]:
    """The curves' checkpoints before ``end``: ``points`` evenly spaced on the ``save_every``
    grid, every other one first (0, 10, 20, 5, 15, 25 for 30 epochs), so that a curve
    interrupted half-way still spans the run."""
    points = points or ANALYSIS["curve"]["points"]
    every = COMMON["save_every"]
    step = max(every, round(end / points / every) * every)
    epochs = list(range(0, end, step))
    return epochs[::2] + epochs[1::2]


def model_label(model: str) -> str:
    return f"ResNet-{model.removeprefix('resnet')}"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# 1. Data


def build_data(archive: Path, root: Path) -> Path:
    """Decodes the JPEG archive into CIFAR python batches under ``root/data`` (once)."""
    from PIL import Image

    from train.io import atomic_write_bytes

    folder = root / "data" / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if all((folder / n).is_file() for n in names):
        return root / "data"
    if not archive.is_file():
        sys.exit(f"saddle_cifar10: archive {archive} not found (pass --archive)")
    log(f"decoding {archive}")
    images: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in images:
                continue
            split, label = parts[-3], parts[-2]
            raw = io.BytesIO(tar.extractfile(member).read())
            pixels = np.asarray(Image.open(raw).convert("RGB"))
            images[split].setdefault(label, []).append((parts[-1], pixels))
    classes = sorted(images["train"])
    folder.mkdir(parents=True, exist_ok=True)

    def batch(split):
        x, y = [], []
        for c, name in enumerate(classes):
            for _, pixels in sorted(images[split][name], key=lambda item: item[0]):
                x.append(pixels.transpose(2, 0, 1).reshape(-1))
                y.append(c)
        return np.stack(x), y

    x, y = batch("train")
    for i in range(5):
        part = {"data": x[i * 10000:(i + 1) * 10000], "labels": y[i * 10000:(i + 1) * 10000]}
        atomic_write_bytes(folder / names[i], pickle.dumps(part, protocol=2))
    x, y = batch("test")
    atomic_write_bytes(folder / "test_batch", pickle.dumps({"data": x, "labels": y}, protocol=2))
    log(f"wrote {folder} ({len(classes)} classes)")
    return root / "data"


# --------------------------------------------------------------------------------------------
# 2. Training


def config_of(name: str, data_dir: Path, setting: dict | None = None):
    from train.config import Config

    return Config(**{**COMMON, **(setting or {})}, **RUNS[name], data_dir=str(data_dir))


def finished(root: Path, name: str) -> bool:
    return (root / "runs" / name / f"epoch_{setting_of(root)['epochs']:04d}.pt").is_file()


def train_one(name: str, root: Path) -> None:
    """Trains (or resumes) one run in this process, on one CPU thread."""
    import torch

    from train.loop import train

    torch.set_num_threads(1)
    out = root / "runs" / name
    if finished(root, name):
        return
    resume = (out / "config.json").is_file()
    train(config_of(name, root / "data", setting_of(root)), out, resume=resume, progress=False,
          log=log)


def train_all(root: Path, jobs: int, names) -> None:
    """Runs :func:`train_one` for every unfinished run, ``jobs`` processes at a time."""
    pending = [n for n in names if not finished(root, n)]
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            log(f"training {name}")
            logfile = open(root / f"train-{name}.log", "a")
            running.append((name, subprocess.Popen(
                [sys.executable, __file__, "--root", str(root), "--stage", "train-one", name],
                stdout=logfile, stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"})))
        time.sleep(5)
        for name, proc in list(running):
            if proc.poll() is not None:
                running.remove((name, proc))
                log(f"{name} exited {proc.returncode}")
                if proc.returncode != 0:
                    sys.exit(f"saddle_cifar10: training {name} failed, see {root}/train-{name}.log")


# --------------------------------------------------------------------------------------------
# 3. Analysis
#
# Hessian-vector products in float32 with the Lanczos recurrence in float64 (landscape.eigen);
# the model in eval mode (BatchNorm running statistics), the group's un-augmented training
# images. One HVP of ResNet-8 costs about 4.5 ms an image on a loaded core here (7 s over the
# 1,536 tail images), so every quantity is computed on a fixed subsample of each group
# (Run.group_data(samples=, seed=0): the same images at every checkpoint and for every
# optimizer); the whole groups (1,536 tail and 10,870 head images) come last and are left to
# run on when time allows, across sessions: their products are journaled (_extremes).

ANALYSIS = dict(
    dtype="float32", seed=0,
    final=dict(samples=512, tol=1e-3, max_steps=100),
    curve=dict(samples=256, tol=1e-3, max_steps=60, points=6),  # + the end: see curve_epochs
    density=dict(samples=256, probes=3, steps=40),
    surface=dict(samples=512, points=13, span=1.0),
    full=dict(samples=None, tol=1e-3, max_steps=100),  # every image of the group: slow
    witness=dict(samples=None),  # the whole group along the final's (subsample's) vectors
)
GROUPS = ("head", "tail")


def _task_list(root: Path, full: bool = False) -> list[tuple[str, ...]]:
    """Every computation, most needed first: the final extremes of the first-seed runs, the
    second seeds', the curves, the densities, the surfaces, then (with ``full``) the
    whole-group extremes, each followed by its witness (:func:`_witness`)."""
    first = [n for n in RUNS if n.endswith("s9826")]
    second = [n for n in RUNS if n not in first]
    end = setting_of(root)["epochs"]
    tasks = [("final", n, end, g) for n in first + second for g in GROUPS]
    tasks += [("curve", n, e, g) for e in (*curve_epochs(end), end) for n in first
              for g in GROUPS]
    tasks += [("density", n, end, g) for n in first for g in GROUPS]
    tasks += [("surface", n, end, "tail") for n in first]
    if full:  # every tail first (1,536 images), then the heads (10,870: hours here)
        tasks += [(kind, n, end, g) for g in ("tail", "head")
                  for n in sorted(first + second, key=lambda n: not _asked(n, g))
                  for kind in ("full", "witness")]
    return tasks


# The four questions compare SSE-SAM's lambda_min with SGD's in both groups, SAM's in
# the tail and ImbSAM's in the head (RESULTS.md): the optimizers each group's answers read.
ASKED = {"head": ("ssesam", "sgd", "imbsam"), "tail": ("ssesam", "sgd", "sam")}


def _asked(name: str, group: str) -> bool:
    """Whether a question reads ``name``'s ``group``: its whole group then comes first (SAM's
    head, which none reads, is the last of the hours-long heads)."""
    return RUNS[name]["opt"] in ASKED[group]


def _result_path(root: Path, kind: str, name: str, epoch: int, group: str) -> Path:
    return root / "analysis" / name / f"{kind}_e{epoch:04d}_{group}.json"


def _group_hessian(run, group: str, samples: int | None):
    """The Hessian of ``group``'s mean loss over its fixed subsample of ``samples`` images
    (None: all of them), products in :data:`ANALYSIS`'s dtype; and the number of images."""
    import torch

    from landscape.hvp import GroupHessian

    x, y = run.group_data(group, samples=samples, seed=ANALYSIS["seed"])
    dtype = getattr(torch, ANALYSIS["dtype"])
    return GroupHessian(run.model, run.loss_fn(), x, y, dtype=dtype), int(len(y))


def _extremes(run, group: str, settings: dict, journal: Path | None = None) -> dict:
    """lambda_max and lambda_min of the group's Hessian; with ``journal``, every product is
    kept there as it comes (:mod:`landscape.journal`), so that a killed whole-group run (an
    hour or more of ResNet-20 products) resumes where it stopped, to the same numbers."""
    import torch

    from landscape.eigen import extreme_eigenpairs, saddle_ratio
    from landscape.journal import JournaledOperator
    from train.checkpoint import contents_sha256

    op, samples = _group_hessian(run, group, settings["samples"])
    if journal is not None:
        # the checkpoint's contents, not only its name (landscape.load checked the bytes)
        op = JournaledOperator(op, journal, key=dict(
            checkpoint=contents_sha256(run.path), group=group, samples=samples, settings=settings,
            dtype=ANALYSIS["dtype"], seed=ANALYSIS["seed"], torch=torch.__version__))
    began = time.perf_counter()
    r = extreme_eigenpairs(op, top=1, bottom=1, tol=settings["tol"],
                           max_steps=settings["max_steps"], seed=ANALYSIS["seed"])
    if journal is not None:
        log(f"journal {journal.name}: {op.replayed} products replayed, {op.computed} computed")
    return {"lambda_max": float(r.top[0]), "lambda_min": float(r.bottom[0]),
            "ratio": saddle_ratio(float(r.bottom[0]), float(r.top[0])),
            "residuals": [float(r.top_residuals[0]), float(r.bottom_residuals[0])],
            "tolerance": float(r.tolerance), "converged": bool(r.converged),
            "steps": int(r.steps), "samples": samples, "seconds": time.perf_counter() - began,
            "vectors": {"top": r.top_vectors[0].float().cpu(),
                        "bottom": r.bottom_vectors[0].float().cpu()}}


def _witness(run, root: Path, name: str, group: str, settings: dict) -> dict:
    """An independent check of a whole-group result: the whole group's curvature ``u^T H u``
    along the final (512-image) bottom and top eigenvectors ``u`` (unit; one product of two
    columns).

    Lanczos's lambda_min is the least ``u^T H u`` over its Krylov space, and the true
    lambda_min is at most every ``u^T H u``. So ``u^T H u`` below the reported lambda_min, or
    above lambda_max, by more than the result's tolerance (its stated precision; a subsample
    that is the whole group gives the same vector to rounding) proves that the search missed
    an eigenvalue (``missed``). Inside them it proves nothing, but the subsample's lambda_min
    is then no evidence against the whole group's either."""
    import torch

    full = json.loads(_result_path(root, "full", name, run.epoch, group).read_text())
    vectors = torch.load(_result_path(root, "final", name, run.epoch, group).with_suffix(".pt"))
    op, samples = _group_hessian(run, group, settings["samples"])
    U = torch.stack([vectors["bottom"], vectors["top"]], dim=1).double()
    U = U / U.norm(dim=0)
    began = time.perf_counter()
    bottom, top = (U * op.matmat(U).double()).sum(dim=0).tolist()
    return {"rayleigh_bottom": bottom, "rayleigh_top": top,
            "lambda_min": full["lambda_min"], "lambda_max": full["lambda_max"],
            "missed": bool(bottom < full["lambda_min"] - full["tolerance"]
                           or top > full["lambda_max"] + full["tolerance"]),
            "samples": samples, "seconds": time.perf_counter() - began}


def _density(run, group: str, settings: dict) -> dict:
    from landscape.slq import slq

    op, samples = _group_hessian(run, group, settings["samples"])
    d = slq(op, probes=settings["probes"], steps=settings["steps"], seed=ANALYSIS["seed"])
    return {"grid": d.grid.tolist(), "density": d.density.tolist(),
            "nodes": np.nan_to_num(d.nodes, nan=0.0).tolist(), "weights": d.weights.tolist(),
            "variance": d.variance, "samples": samples, "hvps": d.hvps}


def _surface(run, root: Path, name: str, settings: dict) -> dict:
    """The tail loss on the plane of the tail Hessian's top and bottom eigenvectors (from the
    ``final`` task's Lanczos run, saved beside its JSON), over the same tail subsample, on a
    ``points x points`` grid of ``[-span, span]^2``. At a saddle the loss rises along the top
    eigenvector and falls on both sides along the bottom one."""
    import torch

    from landscape.evaluator import SurfaceEvaluator

    vectors = torch.load(_result_path(root, "final", name, run.epoch, "tail").with_suffix(".pt"))
    x, y = run.group_data("tail", samples=settings["samples"], seed=ANALYSIS["seed"])
    evaluator = SurfaceEvaluator(run.model, run.loss_fn(), x, y,
                                 torch.ones(1, len(y), dtype=torch.bool),
                                 [vectors["top"], vectors["bottom"]])
    axis = np.linspace(-settings["span"], settings["span"], settings["points"])
    b, a = np.meshgrid(axis, axis, indexing="ij")  # row j: the bottom eigenvector's beta_j
    loss, accuracy = evaluator(np.stack([a.reshape(-1), b.reshape(-1)], axis=1))
    shape = (len(axis), len(axis))
    return {"axis": axis.tolist(), "loss": np.asarray(loss)[:, 0].reshape(shape).tolist(),
            "accuracy": np.asarray(accuracy)[:, 0].reshape(shape).tolist(),
            "samples": int(len(y))}


def run_task(root: Path, task: tuple) -> None:
    kind, name, epoch, group = task
    path = _result_path(root, kind, name, epoch, group)
    checkpoint = root / "runs" / name / f"epoch_{epoch:04d}.pt"
    needs = {"surface": [_result_path(root, "final", name, epoch, "tail").with_suffix(".pt")],
             "witness": [_result_path(root, "full", name, epoch, group),
                         _result_path(root, "final", name, epoch, group).with_suffix(".pt")]}
    if path.exists() and kind == "full":  # killed between the result and its clean-up
        from landscape.journal import remove

        remove(path.with_suffix(".journal"))
    if kind in ("final", "curve", "full") and path.exists() and _before_the_floor(path):
        path.rename(path.with_name(path.name + ".before-floor"))  # kept; _results skips it
        checked = _result_path(root, "witness", name, epoch, group)
        if kind == "full" and checked.exists():  # it checked the result set aside
            checked.rename(checked.with_name(checked.name + ".before-floor"))
        log(f"{path.name} of {name} stopped before {_floor()} steps: computed again")
    if (path.exists() or not checkpoint.exists()
            or not all(p.exists() for p in needs.get(kind, []))):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with _claimed(path.with_suffix(".claim")) as mine:
        if mine:
            _compute(root, task, path)


def _floor() -> int:
    """:data:`landscape.eigen.MIN_STEPS`, imported on use like the bench's other torch-backed
    modules (the data stage needs none)."""
    from landscape.eigen import MIN_STEPS

    return MIN_STEPS


def _before_the_floor(path: Path) -> bool:
    """Whether the extremes in ``path`` stopped before :data:`landscape.eigen.MIN_STEPS` steps
    (computed before that floor existed): a Ritz value in the cluster near 0 may then pass for
    lambda_min (RESULTS.md), so such a result is computed again. Later stops are unchanged."""
    result = json.loads(path.read_text())
    steps, limit = result.get("steps"), result.get("settings", {}).get("max_steps")
    return steps is not None and steps < min(_floor(), limit or steps) and "min_steps" not in result


@contextlib.contextmanager
def _claimed(claim: Path):
    """Whether this process may compute the task: its claim file is new, or the process that
    wrote it is gone. Workers started at different times then never compute one task twice."""
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(claim.read_text() or 0), 0)
            yield False  # a live worker has it
            return
        except (ProcessLookupError, ValueError):
            fd = os.open(claim, os.O_WRONLY | os.O_TRUNC)  # its worker died: take it over
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield True
    finally:
        claim.unlink(missing_ok=True)


def _compute(root: Path, task: tuple, path: Path) -> None:
    import torch

    import landscape
    import landscape.journal
    from train.io import atomic_write_bytes, atomic_write_json

    kind, name, epoch, group = task
    checkpoint = root / "runs" / name / f"epoch_{epoch:04d}.pt"
    run = landscape.load(checkpoint, device="cpu")
    log(f"{kind} {name} epoch {epoch} {group}")
    if kind == "density":
        result = _density(run, group, ANALYSIS["density"])
    elif kind == "surface":
        result = _surface(run, root, name, ANALYSIS["surface"])
    elif kind == "witness":
        result = _witness(run, root, name, group, ANALYSIS["witness"])
    else:
        journal = path.with_suffix(".journal") if kind == "full" else None
        result = _extremes(run, group, ANALYSIS[kind], journal)
        vectors = result.pop("vectors")
        if kind == "final":  # the surface's directions
            buffer = io.BytesIO()
            torch.save(vectors, buffer)
            atomic_write_bytes(path.with_suffix(".pt"), buffer.getvalue())
    result.update(kind=kind, run=name, epoch=epoch, group=group, settings=ANALYSIS[kind],
                  dtype=ANALYSIS["dtype"])
    if "steps" in result:
        result["min_steps"] = _floor()
    atomic_write_json(path, result)
    if kind == "full":  # the result is on disk: its products are no longer needed
        landscape.journal.remove(path.with_suffix(".journal"))
    log(f"done {kind} {name} epoch {epoch} {group}: "
        + ", ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)))


def analyse(root: Path, jobs: int, worker: int | None = None, full: bool = False,
            threads: int = 1) -> None:
    """Runs the pending tasks in ``jobs`` worker processes of ``threads`` CPU threads each; each
    takes the next task no other live worker has claimed."""
    if worker is not None:
        import torch

        torch.set_num_threads(threads)
        for task in _task_list(root, full):
            run_task(root, task)
        return
    extra = ["--full"] if full else []
    procs = [subprocess.Popen([sys.executable, __file__, "--root", str(root), "--stage",
                               "analysis-worker", "--worker", str(k), "--threads", str(threads),
                               *extra], env={**os.environ, "OMP_NUM_THREADS": str(threads)})
             for k in range(jobs)]
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"saddle_cifar10: an analysis worker failed ({codes})")


# --------------------------------------------------------------------------------------------
# 4. Figures and table


def _results(root: Path, kind: str) -> dict:
    """``(run, epoch, group) -> result`` of every finished task of ``kind``."""
    found = {}
    for path in sorted((root / "analysis").glob(f"*/{kind}_e*.json")):
        r = json.loads(path.read_text())
        found[(r["run"], r["epoch"], r["group"])] = r
    return found


def _label(name: str) -> str:
    from train.options import OPTIMIZER_LABELS

    opt, seed = name.rsplit("-s", 1)
    return f"{OPTIMIZER_LABELS[opt]} (seed {seed})"


def _epochs(root: Path, name: str) -> list[dict] | None:
    """The run's metrics.jsonl rows, one an epoch; None when the run has not started."""
    path = root / "runs" / name / "metrics.jsonl"
    return [json.loads(line) for line in path.open()] if path.is_file() else None


def table(root: Path) -> str:
    """One row a run: test accuracy (mean per class, no TTA) and the final extremes."""
    final, full, witness = (_results(root, kind) for kind in ("final", "full", "witness"))
    end = setting_of(root)["epochs"]
    head = ("| run | acc | many | medium | few | head λmax | head λmin | head ratio | tail λmax "
            "| tail λmin | tail ratio | converged | training (h) |")
    lines = [head, "|" + "---|" * 13]
    for name in RUNS:
        rows = _epochs(root, name)
        if rows is None:
            continue
        acc = next((r for r in reversed(rows) if r.get("epoch") == end), {})
        hours = sum(r.get("seconds", 0.0) for r in rows) / 3600  # one thread: >= its CPU time
        cells = [_label(name)] + [f"{acc[k]:.1f}" if k in acc else "-"
                                  for k in ("acc", "acc_many", "acc_medium", "acc_few")]
        ok = []
        for group in GROUPS:
            r = final.get((name, end, group))
            cells += ([f"{r['lambda_max']:.3g}", f"{r['lambda_min']:.3g}", f"{r['ratio']:.3g}"]
                      if r else ["-"] * 3)
            ok.append("yes" if r and r["converged"] else "no" if r else "-")
        lines.append("| " + " | ".join(cells + ["/".join(ok), f"{hours:.2f}"]) + " |")
    if full:
        lines += ["", "Whole groups (every training image of the group). Witness: the whole "
                  "group's u^T H u along the 512-image bottom and top eigenvectors; below λmin "
                  "or above λmax by more than the tolerance would prove an eigenvalue missed.",
                  "",
                  "| run | group | λmax | λmin | ratio | converged | witness (bottom, top) |",
                  "|---|---|---|---|---|---|---|"]
        for key, r in sorted(full.items()):
            w = witness.get(key)
            seen = (f"{w['rayleigh_bottom']:.4g}, {w['rayleigh_top']:.4g}"
                    + (" (missed)" if w["missed"] else "") if w else "-")
            lines.append(f"| {_label(key[0])} | {key[2]} | {r['lambda_max']:.4g} | "
                         f"{r['lambda_min']:.4g} | {r['ratio']:.4g} | {r['converged']} | "
                         f"{seen} |")
    return "\n".join(lines) + "\n"


def _plot_surfaces(surfaces: dict, path: Path, model: str) -> Path:
    """Top row: the tail loss over the plane of the (top, bottom) tail eigenvectors, one panel a
    run. Bottom row: the two cuts through the centre, as the change from the centre's loss: at
    a saddle the loss falls on both sides along the bottom eigenvector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(surfaces.items())
    fig, axes = plt.subplots(2, len(runs), figsize=(3.6 * len(runs), 7.0), squeeze=False,
                             constrained_layout=True)
    every = np.concatenate([np.ravel(r["loss"]) for _, r in runs])
    levels = np.geomspace(every.min(), every.max(), 16)
    for k, ((name, epoch, _), r) in enumerate(runs):
        axis, loss = np.array(r["axis"]), np.array(r["loss"])
        centre = len(axis) // 2
        ax = axes[0][k]
        im = ax.contourf(axis, axis, loss, levels=levels, cmap="viridis",
                         norm=matplotlib.colors.LogNorm())
        ax.contour(axis, axis, loss, levels=levels, colors="k", linewidths=0.3)
        ax.plot(0, 0, "r+", markersize=10)
        ax.set_title(f"{_label(name)}, epoch {epoch}", fontsize=9)
        ax.set_xlabel("along the top tail eigenvector")
        if k == 0:
            ax.set_ylabel("along the bottom tail eigenvector")
        cut = axes[1][k]
        cut.plot(axis, loss[:, centre] - loss[centre, centre], "o-", ms=3, color="#d62728",
                 label="bottom eigenvector")
        cut.plot(axis, loss[centre, :] - loss[centre, centre], "s--", ms=3, color="#1f77b4",
                 label="top eigenvector")
        cut.axhline(0, color="black", linewidth=0.6)
        cut.set_ylim(-0.6, 1.5)
        cut.set_xlabel("step from the checkpoint")
        cut.set_title(f"tail loss at the centre: {loss[centre, centre]:.3f}", fontsize=9)
        if k == 0:
            cut.set_ylabel("tail loss - its value at the centre")
            cut.legend(fontsize=7, loc="upper left")
        cut.grid(alpha=0.3)
    bar = fig.colorbar(im, ax=axes[0].tolist(), label=f"tail loss ({r['samples']} tail images)",
                       shrink=0.9)
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200) if every.min() <= t <= every.max()]
    bar.set_ticks(ticks, labels=[str(t) for t in ticks])
    fig.suptitle("Tail loss around the final checkpoint, on the tail Hessian's extreme "
                 f"eigenvectors (CIFAR-10-LT, {model})", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def figures(root: Path) -> list[Path]:
    from landscape import plots

    out = root / "figures"
    out.mkdir(exist_ok=True)
    setting = setting_of(root)
    model = model_label(setting["model"])
    written = [out / "table.md"]
    (out / "table.md").write_text(table(root))
    curves = _results(root, "curve")
    series: dict = {}
    for (name, epoch, group), r in sorted(curves.items(), key=lambda item: item[0][1]):
        data = series.setdefault(_label(name), {}).setdefault(group, {
            "epoch": [], "lambda_max": [], "lambda_min": [], "ratio": []})
        for key in data:
            data[key].append(epoch if key == "epoch" else r[key])
    switches = {_label(n): config_of(n, root / "data", setting).preset().switch for n in RUNS
                if RUNS[n]["opt"] == "ssesam" and _label(n) in series}
    title = (f"CIFAR-10-LT IF=100, {model}: saddle indicators over training, "
             f"{ANALYSIS['curve']['samples']} images a group (λmin < 0: a saddle)")
    if series:
        written.append(plots.plot_indicators_png(series, out / "indicators.png", switches,
                                                 title=title))
        written.append(plots.plot_indicators_html(series, out / "indicators.html", switches,
                                                  title=title))
    densities = _results(root, "density")
    panels: dict = {}
    for (name, _, group), r in densities.items():
        panels.setdefault(_label(name), {})[group] = (np.array(r["grid"]), np.array(r["density"]))
    if panels:
        title = (f"Hessian spectral densities at epoch {setting['epochs']}, head vs tail "
                 f"(SLQ, {ANALYSIS['density']['samples']} images a group)")
        written.append(plots.plot_density_panels_png(panels, out / "densities.png", title=title))
        written.append(plots.plot_density_panels_html(panels, out / "densities.html",
                                                      title=title))
    surfaces = _results(root, "surface")
    if surfaces:
        written.append(_plot_surfaces(surfaces, out / "surface_tail.png", model))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=ROOT / "checkpoints" / "cifar10-lt")
    p.add_argument("--archive", type=Path, default=ARCHIVE)
    p.add_argument("--stage", choices=["all", "data", "train", "train-one", "analysis",
                                        "analysis-worker", "figures"], default="all")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--full", action="store_true",
                   help="analysis: also the extremes over every image of each group (slow)")
    p.add_argument("--jobs", type=int, default=2, help="training processes at a time")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads of each analysis process (one task's products; the "
                        "numbers change only by rounding) [1]")
    p.add_argument("--model", choices=MODELS, help=f"default {COMMON['model']} (a new root)")
    p.add_argument("--epochs", type=int, help=f"default {COMMON['epochs']} (a new root)")
    p.add_argument("runs", nargs="*", default=list(RUNS), help="which runs (default: all)")
    args = p.parse_args(argv)
    root = args.root.resolve()
    if args.threads < 1:
        print(f"saddle_cifar10: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    try:
        fix_setting(root, model=args.model, epochs=args.epochs)
    except ValueError as e:
        print(f"saddle_cifar10: {e}", file=sys.stderr)
        return 2
    if args.stage == "train-one":
        train_one(args.runs[0], root)
        return 0
    if args.stage in ("all", "data", "train"):
        build_data(args.archive, root)
    if args.stage in ("all", "train"):
        train_all(root, args.jobs, args.runs)
    if args.stage == "analysis-worker":
        analyse(root, args.jobs, args.worker, args.full, args.threads)
    if args.stage in ("all", "analysis"):
        analyse(root, args.jobs, full=args.full, threads=args.threads)
    if args.stage in ("all", "figures"):
        figures(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
