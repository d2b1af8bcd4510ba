"""bench/gpu_check.py: the budget, the stage runner's limits, the epoch choice, the data stage,
the runs it trains, the summary, bad input, and (slow) the whole check in its CPU smoke sizes."""

from __future__ import annotations

import dataclasses
import doctest
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests._cifar import write_cifar

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = sys.modules.setdefault("gpu_check", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(gpu_check)

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def _gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --------------------------------------------------------------------------------------------
# Budget and epochs


def test_budget_limits_add_up_to_the_budget_at_most():
    budget = gpu_check.Budget(started=1000.0, total=600.0)
    now = 1000.0 + 10.0  # 10 s of set-up before the data stage
    data = budget.limit("data", now)
    assert data == pytest.approx(75.0 - 10.0)  # set-up is charged to the data share
    now += data
    spent = {"data": data}
    for stage in ("throughput", "probe", "train", "report"):
        spent[stage] = budget.limit(stage, now)
        now += spent[stage]
    assert now <= 1000.0 + 600.0 * (1 - gpu_check.RESERVE) + 1e-9
    assert spent["train"] == pytest.approx(600 * (1 - gpu_check.RESERVE) - 75 - 105 - 60 - 90)
    assert spent["report"] == pytest.approx(90.0)
    # A stage that ends early leaves its time to training, never to itself later.
    early = budget.limit("train", 1000.0 + 100.0)
    assert early == pytest.approx(600 * (1 - gpu_check.RESERVE) - 90 - 100)
    # A slow set-up (installing wheels) leaves the data stage half its share; training pays.
    assert budget.limit("data", 1000.0 + 70.0) == pytest.approx(37.5)
    assert budget.limit("data", 1000.0 + 490.0) == pytest.approx(585 - 90 - 490)


def _predicted(wall: float, seconds: list[float], epochs: int) -> float:
    return wall + (epochs - len(seconds)) * seconds[-1]


@pytest.mark.parametrize("available", [30.0, 120.0, 255.0, 4000.0])
def test_choose_epochs_is_the_largest_that_fits(available):
    rng = np.random.default_rng(int(available))
    timings = {opt: (float(rng.uniform(5, 20)), [float(rng.uniform(1, 6)),
                                                 float(rng.uniform(0.5, 4))])
               for opt in gpu_check.OPTIMIZERS}
    epochs = gpu_check.choose_epochs(timings, available, max_epochs=200, safety=0.85)
    assert 0 <= epochs <= 200
    ends = [_predicted(w, s, epochs) for w, s in timings.values()]
    if epochs:
        assert max(ends) <= 0.85 * available + 1e-9
    if epochs < 200:  # one more epoch would not fit
        assert max(_predicted(w, s, epochs + 1) for w, s in timings.values()) > 0.85 * available


def test_choose_epochs_caps_and_refuses():
    fast = {"sgd": (1.0, [0.1, 0.01])}
    assert gpu_check.choose_epochs(fast, 1000.0, max_epochs=200) == 200
    assert gpu_check.choose_epochs(fast, 1000.0, max_epochs=7) == 7
    assert gpu_check.choose_epochs({"sgd": (9.0, [1.0]), "sam": (9.0, [])}, 1000.0) == 0
    assert gpu_check.choose_epochs({"sgd": (90.0, [5.0, 5.0])}, 60.0) == 0
    assert gpu_check.choose_epochs({}, 1000.0) == 0  # a skipped probe: nothing to go by


def test_docstring_examples():
    found = doctest.testmod(gpu_check)
    assert found.attempted >= 1 and found.failed == 0


# --------------------------------------------------------------------------------------------
# The stage runner


def test_stage_past_its_limit_stops_cleanly(tmp_path):
    """A child that sleeps, one that ignores SIGINT and a grandchild: all gone by the limit."""
    sleeper = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
    stubborn = [sys.executable, "-c",
                "import signal, subprocess, sys, time; signal.signal(signal.SIGINT, "
                "signal.SIG_IGN); subprocess.Popen([sys.executable, '-c', "
                "'import time; time.sleep(60)']); print('up', flush=True); time.sleep(60)"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    began = time.monotonic()
    limit = 16.0  # its SIGINT comes limit / 4 = 4 s early: time to exit even on a loaded CPU
    result = gpu_check.run_processes("sleep", [sleeper, stubborn], limit, logs)
    took = time.monotonic() - began
    assert result.timed_out and not result.ok and result.status == "stopped at its limit"
    assert took < limit + 1.0 and result.seconds < limit + 1.0
    assert result.returncodes == (-2, -9)  # the first stopped by SIGINT, the second SIGKILLed
    assert logs[0].read_text().startswith("up\n") and "KeyboardInterrupt" in logs[0].read_text()
    assert logs[1].read_text() == "up\n"
    waited = time.monotonic() + 3.0  # a SIGKILLed grandchild is reaped by init, not by us
    while not all(_gone(g) for g in result.groups) and time.monotonic() < waited:
        time.sleep(0.05)
    assert len(result.groups) == 2 and all(_gone(g) for g in result.groups)  # grandchild too


def test_stage_within_its_limit(tmp_path):
    ok = [sys.executable, "-c", "print('done')"]
    bad = [sys.executable, "-c", "import sys; sys.exit(3)"]
    result = gpu_check.run_processes("quick", [ok, bad], 30.0, [tmp_path / "a", tmp_path / "b"])
    assert not result.timed_out and result.returncodes == (0, 3)
    assert result.status == "failed (exit 3)" and len(result.walls) == 2
    assert all(0 < w < 30 for w in result.walls)
    skipped = gpu_check.run_processes("none", [ok], 0.5, [tmp_path / "c"])
    assert skipped.status == "skipped: no time left" and not (tmp_path / "c").exists()


# --------------------------------------------------------------------------------------------
# Data


def _write_archive(path: Path, train: int, test: int) -> dict:
    """A CIFAR-10 archive in the real one's layout (``cifar10/{train,test}/<class>/NNNN.jpg``),
    ``train`` / ``test`` random images a class; returns ``(split, class) -> first image``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    first = {}
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", train), ("test", test)):
            for c, name in enumerate(CLASSES):
                for j in range(count):
                    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
                    if j == 0:
                        first[split, c] = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
                    info = tarfile.TarInfo(f"cifar10/{split}/{name}/{j:04d}.jpg")
                    info.size = len(buffer.getvalue())
                    tar.addfile(info, io.BytesIO(buffer.getvalue()))
    return first


def test_data_stage_decodes_the_archive(tmp_path):
    """Through ``saddle_cifar10.build_data``: the images in class-then-file order. (The subset
    is cut from a CIFAR folder below: a tiny archive leaves data_batch_2..5 empty, and the CIFAR
    reader's restricted unpickler refuses an empty array's pickle.)"""
    from train.cifar import read_batch

    archive = tmp_path / "cifar10-jpeg.tar.gz"
    first = _write_archive(archive, train=6, test=3)
    data = gpu_check.prepare_data(archive, tmp_path / "work", subset=None)
    assert data == tmp_path / "work" / "data"
    x, y = read_batch(data / "cifar-10-batches-py" / "data_batch_1", "labels")
    assert y.tolist() == np.repeat(np.arange(10), 6).tolist()  # 60 images, all in batch 1
    np.testing.assert_array_equal(x[6].transpose(1, 2, 0), first["train", 1])
    x, y = read_batch(data / "cifar-10-batches-py" / "test_batch", "labels")
    np.testing.assert_array_equal(x[27].transpose(1, 2, 0), first["test", 9])


def test_data_stage_accepts_a_cifar_folder(tmp_path):
    written = write_cifar(tmp_path / "cifar", "cifar10", train_per_class=5, test_per_class=2)
    work = tmp_path / "work"
    work.mkdir()
    result, folder = gpu_check.data_stage(tmp_path / "cifar", work, gpu_check.SMOKE, 60.0)
    assert result.ok, (work / "data.log").read_text()
    assert folder == work / "subset" and not (work / "data").exists()  # nothing decoded
    # the subset takes the first images of each class, in file order
    first = written.train_data[np.flatnonzero(written.train_labels == 3)[0]]
    from PIL import Image

    image = np.asarray(Image.open(folder / "train" / "class3" / "0000.png"))
    np.testing.assert_array_equal(image.transpose(2, 0, 1).reshape(-1), first)
    assert len(list((folder / "train" / "class3").iterdir())) == 5  # fewer than 40: all


# --------------------------------------------------------------------------------------------
# The runs


@pytest.mark.parametrize("opt", gpu_check.OPTIMIZERS)
def test_runs_are_saddle_cifar10s_on_the_check_model(opt, tmp_path):
    from train.cli import parse

    args = gpu_check.parse([str(tmp_path / "a.tar.gz"), str(tmp_path / "out")])
    command = gpu_check.train_command(opt, tmp_path / "runs" / opt, tmp_path / "data", 37, args,
                                      gpu_check.CHECK)
    assert command[:3] == [sys.executable, "-m", "train"]
    config, out, *_ = parse([str(c) for c in command[3:]])
    expected = dataclasses.replace(gpu_check.saddle.config_of(f"{opt}-s9826", tmp_path / "data"),
                                   model="resnet32", epochs=37, save_every=4, device="cuda")
    assert config == expected and out == tmp_path / "runs" / opt
    assert (config.dataset, config.imb_factor, config.batch_size, config.lr, config.wd,
            config.eta, config.loss) == ("cifar10", 100.0, 128, 0.1, 5e-4, 1000.0, "CE")


def test_summary_says_what_ran(tmp_path):
    run = tmp_path / "runs" / "ssesam"
    run.mkdir(parents=True)
    rows = [{"epoch": 1, "acc": 20.0, "seconds": 1.0},
            {"epoch": 2, "acc": 31.25, "acc_many": 50.0, "acc_few": 7.5, "seconds": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "throughput.md").write_text("| resnet32 | sgd | 128 | 100.0 | 500.0 | 5.00x |\n")
    stages = [gpu_check.StageResult("probe", 60.0, 61.5, (60.0,), (-9,), True),
              gpu_check.StageResult("train", 200.0, 12.0, (12.0,), (0,), False)]
    facts = {"what": "test", "epochs": "E = 2 of 200", "device": "NVIDIA H200"}
    text = gpu_check.summary(tmp_path, facts, stages, [run]).read_text()
    assert "- epochs: E = 2 of 200" in text and "- device: NVIDIA H200" in text
    assert "| probe | 60 | 61.5 | stopped at its limit |" in text
    assert "| train | 200 | 12.0 | ok |" in text and "5.00x" in text
    assert "| SSE-SAM | 2 | 31.2 | 50.0 | - | 7.5 | - | - |" in text
    assert "(no report)" in text


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("case", ["no archive", "full out", "minutes", "model", "device"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    write_cifar(tmp_path / "cifar", "cifar10", train_per_class=1, test_per_class=1)
    out = tmp_path / "out"
    argv = [str(tmp_path / "cifar"), str(out), "--smoke"]
    if case == "no archive":
        argv[0] = str(tmp_path / "missing.tar.gz")
    elif case == "full out":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    elif case == "minutes":
        argv += ["--minutes", "0"]
    elif case == "model":
        argv += ["--model", "resnet99"]
    else:
        argv += ["--device", "tpu"]
    assert gpu_check.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu_check: ") and err.count("\n") == 1
    assert (sorted(p.name for p in out.iterdir()) == ["mine.txt"] if case == "full out"
            else not out.exists())


@pytest.mark.parametrize("case", ["arguments", "wheels", "archive"])
def test_wrapper_bad_input(case, tmp_path):
    argv = [str(tmp_path / "missing.tar.gz"), str(tmp_path / "out")]
    env = {**os.environ, "PYTHON": sys.executable}
    if case == "arguments":
        argv = argv[:1]
    elif case == "wheels":
        env["WHEELS"] = str(tmp_path / "no-wheels")
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *argv], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# The README's paper-scale command


def test_readme_paper_scale_command_parses():
    """Every ``python -m train`` line of the README's "Paper scale" section is accepted by the
    training CLI with ``$opt`` set to each optimizer, and gives the seed protocol's run."""
    from train.cli import parse

    text = (ROOT / "README.md").read_text()
    section = text.split("## Paper scale", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    line = next(ln for ln in block.splitlines() if "python -m train" in ln)
    words = shlex.split(line[line.index("python -m train"):].split(";")[0])
    for opt in gpu_check.OPTIMIZERS:
        argv = [w.replace("$opt", opt) for w in words[3:]]
        config, out, *_ = parse(argv)
        assert (config.dataset, config.imb_factor, config.protocol, config.model, config.opt,
                config.epochs) == ("cifar100", 100.0, "seed", "resnet34", opt, 200)
        assert out == Path("checkpoints/c100-seed") / opt
    assert re.search(r"python -m landscape report checkpoints/c100-seed/\S* ", block)


# --------------------------------------------------------------------------------------------
# The whole check, CPU smoke sizes


@pytest.mark.slow
def test_smoke_check_end_to_end(tmp_path):
    write_cifar(tmp_path / "cifar", "cifar10", train_per_class=40, test_per_class=10)
    out = tmp_path / "out"
    began = time.time()
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"),
                           str(tmp_path / "cifar"), str(out), "--smoke", "--minutes", "6",
                           "--max_epochs", "2", "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert time.time() - began < 6 * 60
    text = (out / "summary.md").read_text()
    assert done.returncode == 0, done.stdout + done.stderr + text
    epochs = int(re.search(r"E = (\d+) of 2 epochs", text).group(1))
    assert epochs == 2
    for opt in gpu_check.OPTIMIZERS:
        rows = [json.loads(line) for line in (out / "runs" / opt / "metrics.jsonl").open()]
        assert rows[-1]["epoch"] == epochs
    assert "| resnet32 | ssesam | 4 |" in (out / "throughput.md").read_text()
    for name in ("indicators.png", "densities.png", "table.md"):
        assert (out / "report" / name).is_file(), name
    assert "| report |" in text and "ok |" in text
