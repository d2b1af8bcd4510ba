"""A fixed-budget check on one GPU: CIFAR-10-LT on ResNet-32, the four optimizers, the report.

    bench/gpu_check.sh ARCHIVE OUT_DIR [--minutes 10]           # the check (thin wrapper)
    python bench/gpu_check.py ARCHIVE OUT_DIR --smoke --minutes 3  # the same stages, tiny, CPU

ARCHIVE is ``cifar10-jpeg.tar.gz`` (see ``../shared/data/README.md``) or a folder already holding
``cifar-10-batches-py/``. Every stage runs as child processes with its own time limit (at the
limit minus a grace the children get SIGINT, at the limit SIGKILL), so the whole never exceeds
``--minutes``. The budget counts from ``$GPU_CHECK_STARTED`` (the wrapper's start, so that
installing wheels is charged too) and is split as :data:`SHARES` says; of 10 minutes:

==========  ======  ===========================================================================
stage       share   what
==========  ======  ===========================================================================
data        75 s    set-up, then ``saddle_cifar10.build_data`` decodes the archive
throughput  105 s   ``bench_train_throughput.py``: ours against the seed-style loop, ResNet-32
                    and the seed's ResNet-34, SGD and SSE-SAM, batch 128 (``throughput.md``)
probe       60 s    the four optimizers, :data:`PROBE_EPOCHS` epochs each, concurrently
train       rest    the four runs of ``E`` epochs concurrently, one process each (about 255 s)
report      90 s    ``python -m landscape report`` on epoch 0 and the last checkpoint: the
                    extremes first, then the densities (each pass is cached, so a stop in the
                    second keeps the first's figures)
reserve     15 s    ``summary.md``, and slack for the caller
==========  ======  ===========================================================================

``E`` (at most ``--max_epochs``, 200) is the largest number of epochs for which every run,
predicted as its probe's wall time plus ``E - PROBE_EPOCHS`` epochs at its probe's last-epoch
time, ends within :data:`SAFETY` of the time left for training (:func:`choose_epochs`). The runs
are saddle_cifar10's (CE, batch 128, lr 0.1 cosine, wd 5e-4, eta 1000, seed 9826; ImbSAM the
ImbSAM authors' code with rho 0.1), on ``--model`` (resnet32). Everything lands in OUT_DIR:
``summary.md`` (command, device, date, E, stage times, throughput, accuracies, the report's
table), ``throughput.md``, ``report/`` (figures), ``runs/OPT/`` (config, metrics, logs). The
decoded data and checkpoints stay in ``--work`` (a temporary folder, removed at the end).

``--smoke`` sizes every stage for a CPU: the decoded data cut to 40 training and 10 test images
a class, written as an image folder (``--dataset folder``, imbalance 10), the ``mlp`` (width 64),
batch 32, one-step throughput rows, 8 Lanczos steps.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import saddle_cifar10 as saddle  # noqa: E402  (it puts ROOT on sys.path)

OPTIMIZERS = ("sgd", "sam", "imbsam", "ssesam")
SHARES = {"data": 0.125, "throughput": 0.175, "probe": 0.10, "report": 0.15}
RESERVE = 0.025  # of the budget, kept for summary.md and the caller
PROBE_EPOCHS = 2  # the first epoch carries the warm-up; the last one is the steady state
SAFETY = 0.85  # the probe ran beside three others that the real runs may outlive
GRACE = 8.0  # seconds between SIGINT and SIGKILL at a stage's limit


@dataclass(frozen=True)
class Sizes:
    """What the stages compute: the check's sizes (:data:`CHECK`) or the smoke's (:data:`SMOKE`).

    ``subset`` is ``(train, test)`` images a class cut from the decoded CIFAR-10 into an image
    folder, or ``None`` for CIFAR-10 itself; ``training`` overrides ``saddle_cifar10.COMMON``.
    """

    subset: tuple[int, int] | None
    training: dict
    throughput: tuple[str, ...]
    report: tuple[str, ...]
    threads: int


CHECK = Sizes(None, {}, ("--models", "resnet32,resnet34", "--opts", "sgd,ssesam",
                         "--batch_sizes", "128", "--rounds", "3", "--steps", "10",
                         "--warmup", "3"),
              ("--steps", "16", "--probes", "2", "--tol", "1e-3"),
              threads=max(1, (os.cpu_count() or 4) // 4))
SMOKE = Sizes((40, 10), {"dataset": "folder", "imb_factor": 10.0, "eta": 8.0, "batch_size": 32},
              ("--models", "resnet32", "--opts", "sgd,ssesam", "--batch_sizes", "4",
               "--rounds", "1", "--steps", "1", "--warmup", "1", "--workers", "0"),
              ("--steps", "8", "--probes", "1", "--tol", "1e-2"), threads=1)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] gpu_check: {message}", flush=True)


# --------------------------------------------------------------------------------------------
# Budget and stages


@dataclass(frozen=True)
class Budget:
    """``total`` seconds from ``started`` (a ``time.time()``), split by :data:`SHARES`."""

    started: float
    total: float

    @property
    def end(self) -> float:
        return self.started + self.total * (1.0 - RESERVE)

    def limit(self, stage: str, now: float | None = None) -> float:
        """Seconds ``stage`` may take from ``now``: its share (data: counted from the start,
        set-up included, but at least half its share), training: up to the report's share
        before the end, the report: up to the end. A stage that ends early leaves its time to
        training, and training pays for a slow set-up."""
        now = time.time() if now is None else now
        share = SHARES.get(stage, 0.0) * self.total
        if stage == "data":
            return min(max(self.started + share - now, share / 2),
                       self.end - SHARES["report"] * self.total - now)
        if stage == "train":
            return self.end - SHARES["report"] * self.total - now
        if stage == "report":
            return self.end - now
        return min(share, self.end - now)


@dataclass(frozen=True)
class StageResult:
    """One stage: its limit and the seconds it took, each process's seconds and exit status,
    and whether the limit stopped it."""

    name: str
    limit: float
    seconds: float
    walls: tuple[float, ...]
    returncodes: tuple[int, ...]
    timed_out: bool
    skipped: str = ""  # why it did not run
    groups: tuple[int, ...] = ()  # the process groups it started (gone when it returns)

    @property
    def ok(self) -> bool:
        return not (self.timed_out or self.skipped) and all(c == 0 for c in self.returncodes)

    @property
    def status(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        if self.timed_out:
            return "stopped at its limit"
        bad = [code for code in self.returncodes if code != 0]
        return f"failed (exit {bad[0]})" if bad else "ok"


def _default_sigint() -> None:
    """In the child: SIGINT back to its default. A script started in the background (``cmd &``
    in a non-interactive shell) inherits SIGINT ignored, and the stage's SIGINT would then never
    let a trainer stop at its last checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group: DataLoader workers and other children too
    except ProcessLookupError:
        pass


def run_processes(name: str, commands, limit: float, logs, env=None) -> StageResult:
    """Runs ``commands`` at once, each in its own process group with stdout and stderr appended
    to its log, and waits for all of them, but no longer than ``limit`` seconds: at ``limit``
    minus a grace the ones still running get SIGINT (a trainer then exits 130 keeping its last
    checkpoint), at ``limit`` SIGKILL. Nothing it started outlives it."""
    if limit <= 1.0:
        return StageResult(name, max(limit, 0.0), 0.0, (), (), False, "no time left")
    grace = min(GRACE, limit / 4)
    began = time.monotonic()
    procs: list[subprocess.Popen] = []
    try:
        for command, path in zip(commands, logs):
            with open(path, "ab") as out:
                procs.append(subprocess.Popen(
                    [str(c) for c in command], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                    env={**os.environ, **(env or {})}, start_new_session=True,
                    preexec_fn=_default_sigint))
        walls: list[float | None] = [None] * len(procs)
        interrupted = False
        while None in walls:
            elapsed = time.monotonic() - began
            for i, proc in enumerate(procs):
                if walls[i] is None and proc.poll() is not None:
                    walls[i] = elapsed
            running = [p for i, p in enumerate(procs) if walls[i] is None]
            if running and elapsed >= limit - grace and not interrupted:
                interrupted = True
                for proc in running:
                    _signal_group(proc, signal.SIGINT)
            if running and elapsed >= limit:
                for proc in running:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
                walls = [limit if w is None else w for w in walls]
                break
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
    return StageResult(name, limit, time.monotonic() - began, tuple(walls),
                       tuple(p.returncode for p in procs), interrupted,
                       groups=tuple(p.pid for p in procs))


# --------------------------------------------------------------------------------------------
# Data


def write_subset_folder(batches: Path, out: Path, train: int, test: int) -> Path:
    """The first ``train`` / ``test`` images of every class of the CIFAR-10 batches in
    ``batches`` as ``out/{train,test}/<class>/NNNN.png`` (the smoke's data)."""
    import numpy as np
    from PIL import Image

    from train.cifar import read_batch  # the restricted unpickler of the CIFAR reader

    splits = {"train": ([f"data_batch_{i}" for i in range(1, 6)], train),
              "test": (["test_batch"], test)}
    for split, (names, keep) in splits.items():
        parts = [read_batch(batches / n, "labels") for n in names]
        x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        for c in range(10):
            folder = out / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for j, i in enumerate(np.flatnonzero(y == c)[:keep]):
                Image.fromarray(x[i].transpose(1, 2, 0)).save(folder / f"{j:04d}.png")
    return out


def _decoded(archive: Path, work: Path) -> Path:
    """Where the CIFAR-10 batches are: the folder ``archive`` if it holds them, else the folder
    ``saddle_cifar10.build_data`` decodes the archive into."""
    return archive if (archive / "cifar-10-batches-py").is_dir() else work / "data"


def prepare_data(archive: Path, work: Path, subset: tuple[int, int] | None) -> Path:
    """The training data folder: CIFAR-10 batches decoded from ``archive`` by
    ``saddle_cifar10.build_data`` (or the folder ``archive`` when it holds them), cut into an
    image folder ``work/subset`` when ``subset`` is given."""
    data = _decoded(archive, work)
    if data != archive:
        saddle.build_data(archive, work)
    if subset is None:
        return data
    return write_subset_folder(data / "cifar-10-batches-py", work / "subset", *subset)


def data_stage(archive: Path, work: Path, sizes: Sizes, limit: float) -> tuple[StageResult, Path]:
    """:func:`prepare_data` in a child process, within ``limit``; the folder it fills."""
    command = [sys.executable, __file__, "--data-stage", archive, work,
               "none" if sizes.subset is None else ",".join(map(str, sizes.subset))]
    result = run_processes("data", [command], limit, [work / "data.log"])
    return result, work / "subset" if sizes.subset else _decoded(archive, work)


# --------------------------------------------------------------------------------------------
# Training


def train_command(opt: str, out: Path, data_dir: Path, epochs: int, args, sizes: Sizes) -> list:
    """``python -m train`` for saddle_cifar10's run of ``opt`` (seed 9826) at ``epochs``."""
    settings = {**saddle.COMMON, **saddle.RUNS[f"{opt}-s9826"], **sizes.training,
                "model": args.model, "epochs": epochs, "device": args.device,
                "save_every": max(1, math.ceil(epochs / 10)), "data_dir": data_dir, "out": out}
    command = [sys.executable, "-m", "train", "--no_progress"]
    for key, value in settings.items():
        command += [f"--{key}", value]
    return command


def train_runs(folder: Path, data_dir: Path, epochs: int, args, sizes: Sizes, limit: float,
               name: str) -> StageResult:
    """The four optimizers' runs into ``folder/OPT``, concurrently, one process each."""
    folder.mkdir(parents=True, exist_ok=True)
    commands = [train_command(o, folder / o, data_dir, epochs, args, sizes) for o in OPTIMIZERS]
    env = {"OMP_NUM_THREADS": str(sizes.threads), "SSE_CACHE_DIR": str(args.work / "cache")}
    return run_processes(name, commands, limit, [folder / f"{o}.log" for o in OPTIMIZERS], env)


def probe_timings(folder: Path, result: StageResult) -> dict[str, tuple[float, list[float]]]:
    """``opt -> (wall seconds of its process, seconds of each epoch it trained)``."""
    from train.checkpoint import read_metrics

    timings = {}
    for opt, wall in zip(OPTIMIZERS, result.walls):
        rows = read_metrics(folder / opt) if (folder / opt / "metrics.jsonl").is_file() else []
        timings[opt] = (wall, [float(r["seconds"]) for r in rows if "seconds" in r])
    return timings


def choose_epochs(timings, available: float, max_epochs: int = 200,
                  safety: float = SAFETY) -> int:
    """The largest ``E <= max_epochs`` such that every run, predicted as its probe's wall time
    plus ``E - k`` more epochs at its probe's last-epoch time (``k`` the epochs the probe
    trained), ends within ``safety * available`` seconds; 0 when no epoch fits or a probe
    trained none.

    >>> choose_epochs({"sgd": (20.0, [3.0, 1.0]), "ssesam": (40.0, [8.0, 4.0])}, 300.0)
    55
    """
    epochs = max_epochs if timings else 0
    for wall, seconds in timings.values():
        if not seconds:
            return 0
        per_epoch = max(seconds[-1], 1e-9)
        epochs = min(epochs, math.floor((safety * available - wall) / per_epoch) + len(seconds))
    return max(0, epochs)


# --------------------------------------------------------------------------------------------
# Report and summary


def report_stage(runs: list[Path], out: Path, every: int, args, sizes: Sizes,
                 budget: Budget) -> StageResult:
    """The saddle report in two passes: extremes only, then with the densities (the first
    pass's results are cached beside the checkpoints, so the second computes only these), on
    the runs that have a checkpoint."""
    runs = [run for run in runs if any(run.glob("epoch_*.pt"))]
    if not runs:
        return StageResult("report", budget.limit("report"), 0.0, (), (), False, "no checkpoints")
    command = [sys.executable, "-m", "landscape", "report", *runs, "--out", out / "report",
               "--every", every, "--device", args.device, "--no_progress", *sizes.report]
    env = {"OMP_NUM_THREADS": str(sizes.threads * 2), "SSE_CACHE_DIR": str(args.work / "cache")}
    first = run_processes("report", [command + ["--no_densities"]], budget.limit("report"),
                          [out / "report.log"], env)
    if not first.ok:
        return first
    second = run_processes("report", [command], budget.limit("report"), [out / "report.log"], env)
    return StageResult("report", first.limit, first.seconds + second.seconds,
                       first.walls + second.walls, first.returncodes + second.returncodes,
                       second.timed_out or bool(second.skipped))


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return (f"{torch.cuda.get_device_name(torch.device(device))} (torch {torch.__version__}, "
                f"CUDA {torch.version.cuda})")
    return f"CPU, {os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__}"


def accuracy_table(runs: list[Path]) -> str:
    from train.checkpoint import read_metrics
    from train.options import OPTIMIZER_LABELS

    lines = ["| optimizer | epochs | acc | many | medium | few | head | tail |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        rows = [r for r in read_metrics(run) if "acc" in r] if (run / "metrics.jsonl").is_file() \
            else []
        last = rows[-1] if rows else {}
        cells = [f"{last[k]:.1f}" if k in last else "-" for k in
                 ("acc", "acc_many", "acc_medium", "acc_few", "acc_head", "acc_tail")]
        lines.append(f"| {OPTIMIZER_LABELS[run.name]} | {last.get('epoch', '-')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(out: Path, facts: dict, stages: list[StageResult], runs: list[Path]) -> Path:
    """``OUT/summary.md``, from what the stages left (a missing part says so)."""
    from train.io import atomic_write_text

    def section(path: Path, missing: str) -> str:
        return path.read_text().strip() if path.is_file() else missing

    lines = [f"# GPU check: {facts['what']}", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items() if key != "what"]
    lines += ["", "## Stages", "", "| stage | limit s | used s | status |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.limit:.0f} | {s.seconds:.1f} | {s.status} |" for s in stages]
    lines += ["", "## Throughput: ours against the seed-style loop", "",
              section(out / "throughput.md", "(not measured)"), "",
              "## Accuracy (last evaluated epoch, mean per class, no TTA)", "",
              accuracy_table(runs) if runs else "(no runs)", "",
              "## Saddle report (report/)", "",
              section(out / "report" / "table.md", "(no report)"), "",
              "Figures: " + (", ".join(sorted(p.name for p in (out / "report").glob("*.png")))
                             if (out / "report").is_dir() else "none")]
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    return out / "summary.md"


def keep_run_files(runs: list[Path], out: Path) -> None:
    """Copies each run's config, metrics and log into ``OUT/runs/OPT/`` (checkpoints stay)."""
    for run in runs:
        target = out / "runs" / run.name
        target.mkdir(parents=True, exist_ok=True)
        for path in (run / "config.json", run / "metrics.jsonl", run / "results.json",
                     run.parent / f"{run.name}.log"):
            if path.is_file():
                shutil.copy2(path, target / path.name)


# --------------------------------------------------------------------------------------------
# The check


def throughput_stage(out: Path, work: Path, args, sizes: Sizes, limit: float) -> StageResult:
    """``bench_train_throughput.py`` on the device; its table (the lines it prints as they are
    measured, so a stop keeps the rows done) goes to ``OUT/throughput.md``."""
    command = [sys.executable, BENCH / "bench_train_throughput.py", "--device", args.device,
               *sizes.throughput]
    result = run_processes("throughput", [command], limit, [work / "throughput.log"])
    printed = (work / "throughput.log").read_text(errors="replace").splitlines()
    table = [line for line in printed if line.startswith(("# ", "|"))]
    if table:
        (out / "throughput.md").write_text("\n".join(table) + "\n")
    return result


def _epochs_fact(epochs: int, timings: dict, available: float, max_epochs: int) -> str:
    probes = "; ".join(f"{opt} {len(s)} epoch(s) in {wall:.1f} s, last {s[-1]:.2f} s"
                       if s else f"{opt} no epoch" for opt, (wall, s) in timings.items())
    return (f"E = {epochs} of {max_epochs} epochs, for {available:.0f} s of training "
            f"(safety {SAFETY}; probes, concurrently: {probes})")


def run_check(args, budget: Budget) -> int:
    sizes = SMOKE if args.smoke else CHECK
    out, work = args.out, args.work
    out.mkdir(parents=True, exist_ok=True)
    facts = {"what": f"CIFAR-10-LT IF=100 on {args.model}, four optimizers, saddle report"
                     + (" (CPU smoke sizes)" if args.smoke else ""),
             "command": f"`{os.environ.get('GPU_CHECK_COMMAND') or ' '.join(sys.argv)}`",
             "device": device_name(args.device),
             "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
             "budget": f"{args.minutes:g} min", "epochs": "not chosen (the check stopped early)"}
    stages: list[StageResult] = []
    runs: list[Path] = []
    try:
        log(f"data ({budget.limit('data'):.0f} s)")
        result, data_dir = data_stage(args.archive, work, sizes, budget.limit("data"))
        stages.append(result)
        if not result.ok:
            return 1
        log(f"throughput ({budget.limit('throughput'):.0f} s)")
        stages.append(throughput_stage(out, work, args, sizes, budget.limit("throughput")))
        log(f"probe ({budget.limit('probe'):.0f} s)")
        probe = train_runs(work / "probe", data_dir, PROBE_EPOCHS, args, sizes,
                           budget.limit("probe"), "probe")
        stages.append(probe)
        if not probe.ok and not probe.timed_out:
            return 1
        available = budget.limit("train")
        timings = probe_timings(work / "probe", probe)
        epochs = choose_epochs(timings, available, args.max_epochs)
        facts["epochs"] = _epochs_fact(epochs, timings, available, args.max_epochs)
        log(facts["epochs"])
        folder = work / "runs" if epochs else work / "probe"
        if epochs:
            stages.append(train_runs(folder, data_dir, epochs, args, sizes,
                                     budget.limit("train"), "train"))
        runs = [folder / opt for opt in OPTIMIZERS]
        log(f"report ({budget.limit('report'):.0f} s)")
        stages.append(report_stage(runs, out, max(epochs, PROBE_EPOCHS), args, sizes, budget))
    finally:
        keep_run_files(runs, out)
        log(f"wrote {summary(out, facts, stages, runs)}")
    return 0 if all(s.ok for s in stages) else 1


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("archive", type=Path, help="cifar10-jpeg.tar.gz, or a folder holding "
                                              "cifar-10-batches-py/")
    p.add_argument("out", type=Path, help="output folder (new or empty)")
    p.add_argument("--minutes", type=float, default=10.0, help="the whole budget [10]")
    p.add_argument("--device", help="[cuda; cpu with --smoke]")
    p.add_argument("--model", help="[resnet32; mlp with --smoke]")
    p.add_argument("--max_epochs", type=int, default=200, help="E at most [200]")
    p.add_argument("--work", type=Path, help="data and checkpoints [a temporary folder, removed]")
    p.add_argument("--smoke", action="store_true", help="every stage tiny, for a CPU")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.model = args.model or ("mlp" if args.smoke else "resnet32")
    return args


def check(args) -> str | None:
    """The first problem with ``args``, in one line, or ``None``."""
    from train.options import MODELS

    if not (args.archive.is_file() or (args.archive / "cifar-10-batches-py").is_dir()):
        return f"{args.archive}: no such archive, nor a folder holding cifar-10-batches-py/"
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        return f"{args.out}: exists and is not an empty folder (give a new one)"
    if not (math.isfinite(args.minutes) and args.minutes > 0):
        return f"--minutes must be > 0, got {args.minutes}"
    if args.max_epochs < 1:
        return f"--max_epochs must be >= 1, got {args.max_epochs}"
    if args.model not in MODELS:
        return f"--model {args.model!r}: one of {', '.join(MODELS)}"
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return (f"--device {args.device}: CUDA is not available to this python "
                    f"({sys.executable}; set WHEELS= for gpu_check.sh, or use --smoke)")
    elif args.device != "cpu":
        return f"--device must be cpu, cuda or cuda:N, got {args.device!r}"
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--data-stage"]:  # the data stage's child process
        _, archive, work, subset = argv
        size = None if subset == "none" else tuple(int(n) for n in subset.split(","))
        prepare_data(Path(archive), Path(work), size)
        return 0
    budget = Budget(float(os.environ.get("GPU_CHECK_STARTED") or time.time()), 0.0)
    args = parse(argv)
    problem = check(args)
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    budget = Budget(budget.started, args.minutes * 60.0)
    made = args.work is None
    args.work = Path(tempfile.mkdtemp(prefix="gpu_check-")) if made else args.work
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        return run_check(args, budget)
    finally:
        if made:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
