"""Integrity and safe loading of checkpoints (and of CIFAR batch files).

Every damaged, foreign or hostile file is refused by each way in: ``landscape.load``,
``python -m train --resume`` and the ``python -m landscape`` subcommands that read checkpoints,
with one line that names the file and what is wrong, nothing written, and no code run.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import landscape  # noqa: E402
from _cifar import write_cifar  # noqa: E402
from _kill_helpers import check_run_folder  # noqa: E402
from landscape.cli import build_parser as landscape_parser, main as landscape_main  # noqa: E402
from train import checkpoint as ckpt  # noqa: E402
from train.checkpoint import CheckpointError  # noqa: E402
from train.cli import main as train_main  # noqa: E402
from train.data import DataError, load_dataset  # noqa: E402

BASE = ["--dataset", "digits", "--imb_factor", "20", "--epochs", "2", "--save_every", "1",
        "--lr", "0.05", "--no_progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """``a``: the run under test; ``cnn``: another model; ``lr``: same model, other settings."""
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, extra in (("a", ["--model", "mlp", "--width", "8"]),
                        ("cnn", ["--model", "cnn", "--width", "4"]),
                        ("lr", ["--model", "mlp", "--width", "8", "--lr", "0.07"])):
        assert train_main(BASE + extra + ["--out", str(root / name)]) == 0
        made[name] = root / name
    return made


def _record(run: Path, path: Path) -> None:
    """Records ``path``'s current digest in the manifest, as if the toolkit had written it."""
    manifest = json.loads((run / ckpt.MANIFEST).read_text())
    data = path.read_bytes()
    manifest[path.name] = {"sha256": ckpt._sha256(data), "bytes": len(data), "epoch": 2}
    (run / ckpt.MANIFEST).write_text(json.dumps(manifest))


def _landscape_commands(path: Path, tmp: Path) -> list[list[str]]:
    """The landscape subcommands present now that read a checkpoint, with minimal arguments."""
    parser = landscape_parser()
    commands = next((a.choices for a in parser._actions if hasattr(a, "choices") and
                     isinstance(a.choices, dict)), {})
    argvs = []
    if "hessian" in commands:
        argvs.append(["hessian", str(path), "--json", str(tmp / "h.json")])
    if "surface" in commands:
        argvs.append(["surface", str(path), "--grid", "2", "--out", str(tmp / "out"),
                      "--no_progress"])
    if "spectrum" in commands:
        argvs.append(["spectrum", str(path), "--out", str(tmp / "out")])
    if "classes" in commands:
        argvs.append(["classes", str(path), "--classes", "0", "--steps", "5", "--trace_hvps", "3",
                      "--out", str(tmp / "out"), "--no_progress"])
    return argvs


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _refused_everywhere(run: Path, named: Path, words: list[str], tmp: Path, capsys) -> int:
    """Asserts every way in fails with one line naming ``named`` and all ``words``."""
    before = _snapshot(run)
    with pytest.raises(CheckpointError) as caught:
        landscape.load(run, device="cpu")
    message = str(caught.value)
    assert "\n" not in message and str(named) in message, message
    assert all(w in message for w in words), message
    ways = [("train", ["--resume", str(run), "--no_progress"])] + [
        ("landscape", argv) for argv in _landscape_commands(run, tmp)]
    for program, argv in ways:
        rc = (train_main if program == "train" else landscape_main)(argv)
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith("error: "), err
        assert str(named) in err and all(w in err for w in words[:1]), err
    assert _snapshot(run) == before  # nothing written, nothing half-written
    assert not (tmp / "out").exists() and not (tmp / "h.json").exists()
    return len(ways)


def _checkpoint_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _cases(runs):
    """``name -> damage(run) -> (file named, words)``, each applied to a copy of run ``a``."""

    def newest(run):
        return ckpt.checkpoint_path(run, 2)

    def truncated(run):
        data = newest(run).read_bytes()
        newest(run).write_bytes(data[:len(data) // 2])
        return newest(run), ["truncated", f"{len(data) // 2} bytes, {len(data)} recorded"]

    def altered(run):
        data = bytearray(newest(run).read_bytes())
        data[len(data) // 2] ^= 0x01
        newest(run).write_bytes(bytes(data))
        return newest(run), ["SHA-256 differs", "altered"]

    def unrecorded(run):
        manifest = json.loads((run / ckpt.MANIFEST).read_text())
        del manifest[newest(run).name]
        (run / ckpt.MANIFEST).write_text(json.dumps(manifest))
        return newest(run), ["no digest recorded"]

    def garbage_recorded(run):
        newest(run).write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
        _record(run, newest(run))
        return newest(run), ["not a loadable checkpoint"]

    def renamed(run):
        shutil.copy(ckpt.checkpoint_path(run, 1), newest(run))
        _record(run, newest(run))
        return newest(run), ["holds the checkpoint of epoch 1, not of epoch 2"]

    def other_models_weights(run):
        state = ckpt.load_checkpoint(ckpt.checkpoint_path(runs["cnn"], 2))
        state["config"] = ckpt.load_checkpoint(newest(run))["config"]
        newest(run).write_bytes(_checkpoint_bytes(state))
        _record(run, newest(run))
        return newest(run), ["fit", "mlp"]

    def other_runs_checkpoint(run):
        shutil.copy(ckpt.checkpoint_path(runs["lr"], 2), newest(run))
        _record(run, newest(run))
        return newest(run), ["lr", "another run"]

    def other_runs_config(run):
        shutil.copy(runs["lr"] / "config.json", run / "config.json")
        return newest(run), ["lr", "another run"]

    def not_a_checkpoint(run):
        newest(run).write_bytes(_checkpoint_bytes({"weights": torch.zeros(3)}))
        _record(run, newest(run))
        return newest(run), ["not a checkpoint of this toolkit"]

    def manifest_unreadable(run):
        (run / ckpt.MANIFEST).write_text('{"epoch_0002.pt": {"sha256": ')
        return run / ckpt.MANIFEST, ["unreadable manifest"]

    def manifest_entry_not_an_object(run):
        (run / ckpt.MANIFEST).write_text('{"epoch_0002.pt": [1, 2]}')
        return newest(run), ["not a JSON object"]

    def epoch_past_the_run(run):  # digest-valid, name and content agree: 2 epochs cannot
        state = ckpt.load_checkpoint(newest(run))
        del state["format"], state["epoch"]
        path = ckpt.save_checkpoint(run, 99999999, state)
        return path, ["holds epoch 99999999", "its run has 2 epochs"]

    def manifest_epoch_differs(run):
        manifest = json.loads((run / ckpt.MANIFEST).read_text())
        manifest[newest(run).name]["epoch"] = 1
        (run / ckpt.MANIFEST).write_text(json.dumps(manifest))
        return newest(run), ["holds epoch 2, 1 recorded"]

    def derived_groups_edited(run):  # the report would show these groups, the numbers not
        config = json.loads((run / "config.json").read_text())
        groups = config["derived"]["groups"]
        groups["head"], groups["tail"] = groups["head"][:-1], [groups["head"][-1]] + groups["tail"]
        (run / "config.json").write_text(json.dumps(config))
        return run / "config.json", ["derived groups differ", "edited"]

    def derived_not_an_object(run):
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, "derived": "x"}))
        return run / "config.json", ['"derived" is "x"']

    def derived_missing(run):
        config = json.loads((run / "config.json").read_text())
        del config["derived"]
        (run / "config.json").write_text(json.dumps(config))
        return run / "config.json", ['"derived" is null']

    return {f.__name__: f for f in (truncated, altered, unrecorded, garbage_recorded, renamed,
                                    other_models_weights, other_runs_checkpoint,
                                    other_runs_config, not_a_checkpoint, manifest_unreadable,
                                    manifest_entry_not_an_object, epoch_past_the_run,
                                    manifest_epoch_differs, derived_groups_edited,
                                    derived_not_an_object, derived_missing)}


CASES = ["truncated", "altered", "unrecorded", "garbage_recorded", "renamed",
         "other_models_weights", "other_runs_checkpoint", "other_runs_config",
         "not_a_checkpoint", "manifest_unreadable", "manifest_entry_not_an_object",
         "epoch_past_the_run", "manifest_epoch_differs", "derived_groups_edited",
         "derived_not_an_object", "derived_missing"]


@pytest.mark.parametrize("case", CASES)
def test_damaged_or_foreign_checkpoint_is_refused_in_one_line(tmp_path, runs, capsys, case):
    run = tmp_path / "run"
    shutil.copytree(runs["a"], run)
    assert landscape.load(run, device="cpu").epoch == 2  # intact before the damage
    named, words = _cases(runs)[case](run)
    ways = _refused_everywhere(run, named, words, tmp_path, capsys)
    print(f"{case}: refused by landscape.load and {ways} command line(s)")


class Payload:
    """Unpickling this calls ``open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("form", ["torch zip, payload as the weights",
                                  "torch zip, payload as the whole state",
                                  "plain pickle (legacy format)"])
def test_hostile_checkpoint_with_matching_digest_runs_no_code(tmp_path, runs, capsys, form):
    run = tmp_path / "run"
    shutil.copytree(runs["a"], run)
    marker = tmp_path / "marker"
    config = ckpt.load_checkpoint(ckpt.checkpoint_path(run, 2))["config"]
    if form.startswith("torch zip, payload as the weights"):
        data = _checkpoint_bytes({"format": ckpt.FORMAT, "epoch": 2, "config": config,
                                  "model": Payload(marker)})
    elif form.startswith("torch zip"):
        data = _checkpoint_bytes(Payload(marker))
    else:
        data = pickle.dumps({"format": ckpt.FORMAT, "epoch": 2, "model": Payload(marker)})
    path = ckpt.checkpoint_path(run, 2)
    path.write_bytes(data)
    _record(run, path)  # the digest matches: only the loader stands in the way

    with pytest.raises(CheckpointError) as caught:
        ckpt.load_checkpoint(path)
    assert "refused to unpickle" in str(caught.value) and "nothing was run" in str(caught.value)
    _refused_everywhere(run, path, ["refused to unpickle"], tmp_path, capsys)
    assert not marker.exists(), "loading ran the checkpoint's code"

    # The payload is live: an unsafe load would have created the marker.
    if form.startswith("torch zip"):
        opened = torch.load(io.BytesIO(data), weights_only=False)
    else:
        opened = pickle.loads(data)
    assert marker.exists()
    (opened["model"] if isinstance(opened, dict) else opened).close()


def test_hostile_cifar_batch_runs_no_code(tmp_path, capsys):
    write_cifar(tmp_path / "data", "cifar10", train_per_class=2, test_per_class=1)
    marker = tmp_path / "marker"
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({"data": Payload(marker), "labels": [0]}, protocol=2))
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10", 10, data_dir=tmp_path / "data", download=False)
    assert "refusing to unpickle" in str(caught.value) and "open" in str(caught.value)
    assert str(caught.value).startswith(f"{batch}: "), caught.value  # names the file
    out = tmp_path / "run"
    assert train_main(["--dataset", "cifar10", "--data_dir", str(tmp_path / "data"),
                       "--out", str(out), "--epochs", "1", "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to unpickle" in err and str(batch) in err, err
    assert not out.exists() and not marker.exists()
    with open(batch, "rb") as f:
        pickle.load(f)["data"].close()  # the payload is live
    assert marker.exists()


def test_checkpoints_hold_only_tensors_and_plain_data(runs, tmp_path):
    for _, path in ckpt.list_checkpoints(runs["cnn"]):
        state = torch.load(path, weights_only=True)  # what any user can do, safely
        assert state["format"] == ckpt.FORMAT and set(state) >= {"model", "optimizer", "config"}
    check_run_folder(runs["cnn"])
    # The toolkit refuses to write a checkpoint it could not read back safely.
    with pytest.raises(TypeError, match="would not load back"):
        ckpt.save_checkpoint(tmp_path, 1, {"model": {}, "config": {}, "note": Payload("x")})
    assert list(tmp_path.iterdir()) == []


def test_recorded_sha256_is_the_digest_the_loader_checks(tmp_path):
    import hashlib

    path = ckpt.save_checkpoint(tmp_path, 1, {"model": {}, "config": {}})
    assert ckpt.recorded_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    other = tmp_path / "epoch_0002.pt"
    other.write_bytes(path.read_bytes())  # copied in, never recorded
    assert ckpt.recorded_sha256(other) is None
    assert ckpt.recorded_sha256(tmp_path / "elsewhere" / "epoch_0001.pt") is None
    # contents_sha256: the record where there is one, else the file's own digest.
    assert ckpt.contents_sha256(path) == ckpt.recorded_sha256(path)
    other.write_bytes(path.read_bytes() + b"x")
    assert ckpt.contents_sha256(other) == hashlib.sha256(other.read_bytes()).hexdigest()
    assert ckpt.contents_sha256(other) != ckpt.contents_sha256(path)
