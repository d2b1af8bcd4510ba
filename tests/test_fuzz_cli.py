"""Bad input never shows a traceback: property-based fuzzing of both command lines.

Random and malformed arguments, config files and checkpoint bytes are thrown at
``train.cli.main`` and ``landscape.cli.main`` in-process (for speed), and a few cases at real
``python -m train`` / ``python -m landscape`` processes. Every call must end with exit status
0 or 2, and with status 2 print exactly one line on stderr. The epochs themselves are stubbed
out in the in-process fuzzing (everything before them runs: parsing, config validation, data,
model, run folder, checkpoint 0); one fuzz runs real epochs on random valid settings.

The number of cases of each fuzz is in the test's name and printed (``pytest -s``). The
examples are derandomized: every run of the suite tries the same inputs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

import landscape  # noqa: E402
from landscape import cli as landscape_cli  # noqa: E402
from train import checkpoint as ckpt  # noqa: E402
from train import cifar as train_cifar  # noqa: E402
from train import loop  # noqa: E402
from train.cli import build_parser as train_parser, main as train_main  # noqa: E402
from train.config import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
RUN_ARGS = ["--dataset", "digits", "--imb_factor", "20", "--epochs", "2", "--model", "mlp",
            "--width", "8", "--save_every", "1", "--no_progress"]


class Reached(BaseException):
    """Raised by a stubbed analysis or training: every check before it passed."""


def _call(main, argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit status, stdout, stderr); ``SystemExit`` is a status."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as stop:  # argparse's --help
            rc = stop.code if isinstance(stop.code, int) else 2
        except Reached:
            rc = 0
    return rc, out.getvalue(), err.getvalue()


def _check(rc: int, err: str, argv) -> None:
    assert rc in (0, 2), f"exit {rc} for {argv!r}: {err[-500:]}"
    if rc == 2:
        assert err.count("\n") == 1 and err.startswith("error: "), f"{argv!r}: {err!r}"


class Tally:
    """Counts the examples tried and the exit statuses of the calls made for them."""

    def __init__(self, name: str):
        self.name, self.counts, self.examples = name, {}, 0

    def add(self, rc: int) -> None:
        self.counts[rc] = self.counts.get(rc, 0) + 1

    def report(self, minimum: int) -> None:
        calls = sum(self.counts.values())
        examples = self.examples or calls
        print(f"{self.name}: {examples} examples, {calls} calls: " + ", ".join(
            f"{n} exit {rc}" for rc, n in sorted(self.counts.items())))
        assert examples >= minimum


@pytest.fixture
def quick_training(monkeypatch, tmp_path):
    """Epochs and analyses stubbed out, no CIFAR download attempt, a scratch current folder.

    Everything before an analysis's computation runs (parsing, checks, loading the run).
    """
    monkeypatch.setattr(loop, "_run_epochs", lambda *args, **kwargs: None)
    monkeypatch.setattr(train_cifar, "download", lambda *args, **kwargs: None)

    def reached(*args, **kwargs):
        raise Reached()

    import landscape.hessian
    import landscape.report
    import landscape.surface

    for module, name in ((landscape.hessian, "hessian_summary"),
                         (landscape.hessian, "spectral_densities"),
                         (landscape.surface, "compute_surface"),
                         (landscape.report, "build_report")):
        monkeypatch.setattr(module, name, reached, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# Strategies

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=10)  # what argv can hold: no NUL, no lone surrogates
NUMBER_WORDS = st.sampled_from(["", "nan", "inf", "-inf", "1e309", "-0", "1_0", "0x1f", "٣",
                                " 7", "1e-400", "3.", ".5", "+2", "--", "-1", "0", "1e30"])
PATHS = ["run_existing", "run_new", "missing/deeper", "a_file", ".", "run_existing/config.json",
         "run_existing/epoch_0000.pt", "run with space", "r\nn", "ünï/çødé", "-dash"]


def _relative(text: str) -> str:
    """Fuzzed text as a path that stays inside the scratch folder."""
    return "fz_" + text.replace("..", "_").replace("\x00", "_")


def _valid_value(action) -> st.SearchStrategy:
    """A value the option accepts (small models only: resnets would make the fuzz slow)."""
    if action.dest == "dataset":  # CIFAR is not on disk: that is a (checked) error
        return st.just("digits")
    if action.choices:
        return st.sampled_from([str(c) for c in action.choices if not str(c).startswith("resnet")])
    if action.type is int:
        return st.integers(1, 30).map(str)
    if action.dest in ("imb_factor", "eta"):
        return st.floats(1, 200).map(repr)
    if action.type is float:
        return st.floats(0, 0.99).map(repr)
    if action.dest == "out":
        return st.integers(0, 10**9).map(lambda n: f"v{n}")
    if action.dest in ("resume", "data_dir", "checkpoint", "to", "run_dirs", "json"):
        return st.sampled_from(PATHS)
    if action.dest == "device":
        return st.sampled_from(["cpu", "auto"])
    return st.sampled_from(["true", "false"])


def _value(action) -> st.SearchStrategy:
    if action.choices:
        return st.one_of(st.sampled_from([str(c) for c in action.choices]), TEXT)
    if action.type is int:
        return st.one_of(st.integers(-3, 40).map(str), st.integers(-10**40, 10**40).map(str),
                         NUMBER_WORDS, TEXT)
    if action.type is float:
        return st.one_of(st.floats(-1e3, 1e3).map(repr), st.floats().map(repr), NUMBER_WORDS,
                         TEXT)
    if action.dest in ("out", "resume", "data_dir", "checkpoint", "to", "run_dirs", "json"):
        return st.one_of(st.sampled_from(PATHS), TEXT.map(_relative))
    if action.dest == "device":
        return st.one_of(st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:x", "mps", "CPU"]), TEXT)
    return st.one_of(st.sampled_from(["true", "false", "yes", "maybe", ""]), TEXT)


def _tokens(action, wild: bool) -> st.SearchStrategy:
    """One option with a value: valid, or (``wild``) maybe abbreviated, malformed or missing."""
    if not wild:
        name, value = st.just(action.option_strings[-1]), _valid_value(action)
        return (name.map(lambda n: [n]) if action.nargs == 0 else
                st.tuples(name, value).map(list))
    name = st.sampled_from(action.option_strings).flatmap(
        lambda o: st.sampled_from([o, o[:max(3, len(o) - 2)]]) if o.startswith("--") else
        st.just(o))
    if action.nargs == 0:
        return name.map(lambda n: [n])
    if action.nargs == "?":
        return st.one_of(name.map(lambda n: [n]), st.tuples(name, _value(action)).map(list))
    return st.one_of(st.tuples(name, _value(action)).map(list), name.map(lambda n: [n]),
                     st.tuples(name, _value(action), _value(action)).map(list))


def _argv(parser, positional: st.SearchStrategy | None = None,
          fresh_out: bool = False) -> st.SearchStrategy:
    """Options in any order: about half the lists use only valid values, the rest anything.

    With ``fresh_out``, valid lists end with ``--out vN`` (a new folder, mostly).
    """
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    valid = st.lists(st.one_of(*[_tokens(a, wild=False) for a in options]), max_size=6)
    if fresh_out:
        valid = st.tuples(valid, st.integers(0, 10**9)).map(
            lambda p: [*p[0], ["--out", f"v{p[1]}"]])
    wild = st.lists(st.one_of(*[_tokens(a, wild=True) for a in options], TEXT.map(lambda t: [t]),
                              st.sampled_from([["--"], ["-"], ["--=x"], ["---out"]])),
                    max_size=7)
    parts = st.one_of(valid, wild).map(lambda groups: [t for g in groups for t in g])
    if positional is None:
        return parts
    return st.tuples(positional, parts).map(lambda p: [*p[0], *p[1]])


def _subparsers(parser) -> dict:
    return next((a.choices for a in parser._actions if isinstance(a.choices, dict)), {})


# ---------------------------------------------------------------------------------------------
# train: arguments


@pytest.mark.slow
def test_train_argv_fuzz_250_examples(quick_training):
    (quick_training / "a_file").write_text("not a folder")
    assert _call(train_main, RUN_ARGS + ["--out", "run_existing"])[0] == 0
    tally = Tally("python -m train, random arguments")

    @settings(FUZZ, max_examples=250)
    @given(argv=_argv(train_parser(), fresh_out=True))
    def fuzz(argv):
        rc, _, err = _call(train_main, argv)
        _check(rc, err, argv)
        tally.add(rc)

    fuzz()
    tally.report(250)


def test_train_help_and_one_line_errors():
    rc, out, err = _call(train_main, ["--help"])
    assert rc == 0 and "--resume RUN_DIR" in out and err == ""
    for argv, words in ((["--epochs", "x"], "invalid int value"),
                        (["--epochs", "0"], "epochs must be an integer in [1, "),
                        (["--device", "cuda:x"], "device must be auto, cpu or cuda[:N]"),
                        (["--seed", str(2**64)], "seed must be an integer in"),
                        (["--imb_factor", "1e309"], "imb_factor must be a finite number"),
                        (["--out", "a\nb", "--dataset", "cifar10", "--data_dir", "nowhere"],
                         "cifar10"),
                        (["--bogus"], "unrecognized arguments")):
        rc, _, err = _call(train_main, argv)
        assert rc == 2 and err.count("\n") == 1 and words in err, (argv, err)


VALID_RANDOM_SETTINGS = st.fixed_dictionaries({
    "opt": st.sampled_from(["sgd", "sam", "imbsam", "ssesam"]),
    "loss": st.sampled_from(["CE", "LDAM", "VS", "LA"]),
    "model": st.sampled_from(["mlp", "cnn"]),
    "width": st.integers(1, 6),
    "imb_factor": st.floats(1, 120),
    "eta": st.floats(0.5, 500),
    "batch_size": st.integers(8, 700),
    "epochs": st.integers(1, 2),
    "save_every": st.integers(1, 5),
    "gamma": st.floats(0, 0.99),
    "rho": st.floats(0, 2), "head_rho": st.floats(0, 2), "tail_rho": st.floats(0, 2),
    "tail_scale": st.floats(0, 3), "momentum": st.floats(0, 0.99), "wd": st.floats(0, 0.1),
    "lr": st.floats(0, 0.2), "gamma_vs": st.floats(-1, 1), "tau": st.floats(-2, 2),
    "group_reduction": st.sampled_from(["batch", "group"]),
    "bn_update": st.sampled_from(["w", "all"]),
    "selection": st.sampled_from(["first", "shuffled"]),
    "tta": st.booleans(), "seed": st.integers(0, 2**63 - 1),
})


def test_train_real_epochs_fuzz_20_valid_settings(tmp_path):
    """Random valid settings (tiny models, 1-2 epochs) train to the end: exit status 0."""
    tally, made = Tally("python -m train, real epochs on random valid settings"), [0]

    @settings(FUZZ, max_examples=20)
    @given(values=VALID_RANDOM_SETTINGS)
    def fuzz(values):
        made[0] += 1
        out = tmp_path / f"run{made[0]}"
        argv = ["--dataset", "digits", "--no_progress", "--out", str(out)]
        for key, value in values.items():
            argv += [f"--{key}", str(value)]
        rc, _, err = _call(train_main, argv)
        assert rc in (0, 3), (argv, err)  # 3: a (legitimate) divergence, said in one line
        if rc == 3:
            assert err.count("\n") == 1 and "non-finite training loss" in err
        else:
            assert ckpt.list_checkpoints(out)[-1][0] == values["epochs"]
        tally.add(rc)
        shutil.rmtree(out)

    fuzz()
    tally.report(20)


# ---------------------------------------------------------------------------------------------
# train and landscape: config files and checkpoint bytes

JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats() |
                    st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) |
                    st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A real 2-epoch run whose files are fuzzed."""
    run = tmp_path_factory.mktemp("template") / "run"
    rc, _, err = _call(train_main, RUN_ARGS + ["--out", str(run)])
    assert rc == 0, err
    return run


def _config_text(template: Path) -> st.SearchStrategy:
    valid = json.loads((template / "config.json").read_text())
    fields = sorted(k for k in valid if k != "derived")

    def mutated(change):
        replaced, dropped, extra = change
        doc = {k: v for k, v in valid.items() if k not in dropped}
        doc.update(replaced)
        doc.update(extra)
        return json.dumps(doc, allow_nan=True).encode()

    change = st.tuples(st.dictionaries(st.sampled_from(fields), JSON, max_size=3),
                       st.sets(st.sampled_from(fields), max_size=2),
                       st.dictionaries(st.sampled_from(["derived", "extra", "epoch"]), JSON,
                                       max_size=1))
    return st.one_of(
        change.map(mutated),
        JSON.map(lambda v: json.dumps(v, allow_nan=True).encode()),
        st.binary(max_size=40),
        st.sampled_from([b"[" * 100000, b'{"epochs": 1' + b"0" * 5000 + b"}", b"\xff\xfe{}",
                         b'{"epochs": NaN}', b'{"lr": 1e999}', b"", b"null"]),
    )


def _landscape_argvs(run: Path) -> list[list[str]]:
    commands = _subparsers(landscape_cli.build_parser())
    argvs = []
    if "hessian" in commands:
        argvs.append(["hessian", str(run), "--top", "1", "--bottom", "0"])
    if "surface" in commands:
        argvs.append(["surface", str(run), "--grid", "2", "--out", str(run / "s"),
                      "--no_progress"])
    return argvs


def _all_ways_in(run: Path, tally: Tally) -> None:
    rc, _, err = _call(train_main, ["--resume", str(run), "--no_progress"])
    _check(rc, err, ["--resume", run])
    tally.add(rc)
    try:
        landscape.load(run, device="cpu")
    except (ckpt.CheckpointError, ConfigError) as error:
        assert "\n" not in str(error)
    for argv in _landscape_argvs(run):
        rc, _, err = _call(landscape_cli.main, argv)
        _check(rc, err, argv)
        tally.add(rc)


@pytest.mark.slow
def test_config_file_fuzz_200_examples(template, quick_training):
    tally = Tally("config.json fuzzed, train --resume / landscape.load / landscape")

    @settings(FUZZ, max_examples=200)
    @given(text=_config_text(template), with_checkpoint=st.booleans())
    def fuzz(text, with_checkpoint):
        run = Path(tempfile.mkdtemp(dir=quick_training))
        if with_checkpoint:
            for name in ("epoch_0000.pt", ckpt.MANIFEST):
                shutil.copy(template / name, run / name)
        (run / "config.json").write_bytes(text)
        tally.examples += 1
        _all_ways_in(run, tally)
        shutil.rmtree(run)

    fuzz()
    tally.report(200)


class Payload:
    def __reduce__(self):
        return (open, ("marker", "w"))


TENSORS = st.builds(lambda shape, fill: torch.full(shape, fill, dtype=torch.float64),
                    st.lists(st.integers(0, 4), max_size=3).map(tuple),
                    st.floats(allow_nan=True, allow_infinity=True))
LEAF = st.one_of(TENSORS, JSON)


def _checkpoint_bytes(template: Path) -> st.SearchStrategy:
    real = ckpt.checkpoint_path(template, 2).read_bytes()
    state = ckpt.load_checkpoint(ckpt.checkpoint_path(template, 2))

    def saved(parts):
        obj = {**state, **parts}
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()

    def flipped(flips):
        data = bytearray(real)
        for at, mask in flips:
            data[at % len(data)] ^= mask
        return bytes(data)

    structured = st.dictionaries(
        st.sampled_from(["model", "optimizer", "config", "epoch", "format"]),
        st.one_of(LEAF, st.dictionaries(st.text(max_size=12) | st.sampled_from(list(
            state["model"])), st.one_of(TENSORS, LEAF), max_size=4),
            st.just({"state": {}, "param_groups": []}), st.just(Payload())), max_size=3)
    return st.one_of(
        st.integers(0, len(real) - 1).map(lambda k: real[:k]),
        st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1,
                 max_size=4).map(flipped),
        st.binary(max_size=300),
        st.binary(max_size=300).map(lambda b: b"PK\x03\x04" + b),
        structured.map(saved),
    )


@pytest.mark.slow
def test_checkpoint_bytes_fuzz_150_examples(template, quick_training):
    tally = Tally("checkpoint bytes fuzzed, train --resume / landscape.load / landscape")

    @settings(FUZZ, max_examples=150)
    @given(data=_checkpoint_bytes(template), recorded=st.booleans() | st.just(True))
    def fuzz(data, recorded):
        run = Path(tempfile.mkdtemp(dir=quick_training))
        for name in ("config.json", ckpt.MANIFEST, "epoch_0001.pt", "metrics.jsonl"):
            shutil.copy(template / name, run / name)
        path = ckpt.checkpoint_path(run, 2)
        path.write_bytes(data)
        if recorded:
            manifest = json.loads((run / ckpt.MANIFEST).read_text())
            manifest[path.name] = {"sha256": ckpt._sha256(data), "bytes": len(data), "epoch": 2}
            (run / ckpt.MANIFEST).write_text(json.dumps(manifest))
        tally.examples += 1
        _all_ways_in(run, tally)
        assert not (quick_training / "marker").exists(), "a checkpoint ran code"
        shutil.rmtree(run)

    fuzz()
    tally.report(150)


# ---------------------------------------------------------------------------------------------
# landscape: arguments


def test_landscape_argv_fuzz_200_examples(template, quick_training, monkeypatch):
    """Random subcommands, options and paths (good, damaged, hostile, missing)."""
    (quick_training / "a_file").write_text("not a run")
    shutil.copytree(template, quick_training / "good")
    hostile = quick_training / "run_existing"  # a run whose newest checkpoint is hostile
    shutil.copytree(template, hostile)
    data = pickle.dumps({"format": ckpt.FORMAT, "epoch": 2, "model": Payload()})
    ckpt.checkpoint_path(hostile, 2).write_bytes(data)
    manifest = json.loads((hostile / ckpt.MANIFEST).read_text())
    manifest["epoch_0002.pt"] = {"sha256": ckpt._sha256(data), "bytes": len(data), "epoch": 2}
    (hostile / ckpt.MANIFEST).write_text(json.dumps(manifest))

    def no_training(*args, **kwargs):  # ``demo`` with valid options would train: stop there
        raise SystemExit(0)

    monkeypatch.setattr(loop, "train", no_training)
    parser = landscape_cli.build_parser()
    commands = _subparsers(parser)
    paths = st.sampled_from(["missing", "a_file", "run_existing", "run_existing/epoch_0002.pt",
                             ".", "", "-", "r\nn", "good", "good/epoch_0001.pt",
                             "good/config.json"]) | TEXT.map(_relative)
    per_command = [st.just([]), TEXT.map(lambda t: [t]), st.just(["--help"])]
    for name, sub in commands.items():
        positional = st.lists(paths, min_size=0 if name == "demo" else 1, max_size=2)
        per_command.append(_argv(sub, positional.map(lambda p, n=name: [n, *p])))
    tally = Tally(f"python -m landscape ({', '.join(commands) or 'no subcommands yet'}), "
                  "random arguments")

    @settings(FUZZ, max_examples=200)
    @given(argv=st.one_of(*per_command))
    def fuzz(argv):
        rc, _, err = _call(landscape_cli.main, argv)
        _check(rc, err, argv)
        tally.add(rc)
        assert not (quick_training / "marker").exists()

    fuzz()
    tally.report(200)


# ---------------------------------------------------------------------------------------------
# Real processes: exit statuses and stderr exactly as a user sees them (warnings included)


@pytest.mark.slow
def test_real_processes_exit_0_or_2_with_one_line(template, tmp_path):
    """Five real processes (each start costs seconds): what the in-process calls cannot show."""
    hostile = tmp_path / "hostile"  # protocol 4: torch.load would warn on stderr if let
    shutil.copytree(template, hostile)
    data = pickle.dumps({"format": ckpt.FORMAT, "epoch": 2, "model": Payload()}, protocol=4)
    ckpt.checkpoint_path(hostile, 2).write_bytes(data)
    manifest = json.loads((hostile / ckpt.MANIFEST).read_text())
    manifest["epoch_0002.pt"] = {"sha256": ckpt._sha256(data), "bytes": len(data), "epoch": 2}
    (hostile / ckpt.MANIFEST).write_text(json.dumps(manifest))
    commands = _subparsers(landscape_cli.build_parser())
    analysis = "hessian" if "hessian" in commands else "surface"

    cases = [  # (argv, expected exit status, words in stdout (0) or in the one stderr line)
        (["train", "--help"], 0, "--resume RUN_DIR"),
        (["train", "--resume", str(hostile)], 2, "refused to unpickle"),
        (["train", *RUN_ARGS, "--lr", "1e30", "--out", str(tmp_path / "nan")], 3,
         "non-finite training loss at epoch 1"),
        (["landscape", "frobnicate"], 2, "invalid choice"),
        (["landscape", analysis, str(hostile)], 2, "refused to unpickle"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, "-m", *argv], cwd=tmp_path, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for argv, _, _ in cases]
    for (argv, expected, words), process in zip(cases, processes):
        out, err = process.communicate(timeout=300)
        assert process.returncode == expected, (argv, err)
        if expected == 0:
            assert words in out and err == "", (argv, err)
        else:
            assert err.count("\n") == 1 and err.startswith("error: ") and words in err, (argv,
                                                                                         err)
    assert not (tmp_path / "marker").exists()
    print(f"{len(cases)} real processes: exit statuses and stderr as expected")
