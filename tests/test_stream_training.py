"""Training and analysing a run with ``--decode stream`` (train.stream wired into train and
landscape), on a generated folder of 64x64 JPEGs decoded at ``SIZE`` pixels.

* the CLI trains a streamed run; ``--decode stream`` without ``--dataset folder`` is bad input;
* ``auto`` streams exactly above the cache limit (the limit lowered for the test);
* an interrupted streamed run resumes bitwise (1 process; workers 0 then 1);
* 2 gloo ranks train the parameters of 1 process to ``TOLERANCE`` (an MLP: no BatchNorm);
* the Hessian of a streamed group, read in batches, equals the one of the same test-view
  images decoded in memory, to 1e-6 relative (float64).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _kill_helpers import digests, metrics_without_time  # noqa: E402
from train import checkpoint as ckpt  # noqa: E402
from train import distributed  # noqa: E402
from train.cli import main as train_main  # noqa: E402
from train.config import Config  # noqa: E402
from train.data import normalize  # noqa: E402
from train.loop import Trainer, train  # noqa: E402
from train.optim import GroupSAM  # noqa: E402
from train.stream import IMAGENET_MEAN, FolderImages, StreamData, cache_bytes  # noqa: E402
from train.stream import loader as stream_loader  # noqa: E402

SIZE = 16  # image_size: an epoch of 205 images decodes in a fraction of a second
NAMES = ("ant", "bee", "cow")
TRAIN_PER_CLASS, TEST_PER_CLASS, IMB = 100, 10, 4  # kept: 100, 50, 25
TOLERANCE = 1e-6  # 2 ranks against 1 process, every parameter, absolute


class Interrupted(BaseException):
    """Stands for a Ctrl-C at one chosen optimizer step."""


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    from test_stream import write_jpegs

    return write_jpegs(tmp_path_factory.mktemp("stream_jpegs"), NAMES, TRAIN_PER_CLASS,
                       TEST_PER_CLASS)


def _config(jpegs: Path, **changes) -> Config:
    settings = dict(dataset="folder", data_dir=str(jpegs), imb_factor=IMB, decode="stream",
                    image_size=SIZE, workers=0, model="cnn", width=4, epochs=3, batch_size=40,
                    lr=0.05, save_every=1, seed=5, device="cpu", opt="sam", eta=60.0)
    return Config(**{**settings, **changes})


# -- configuration ----------------------------------------------------------------------------


def test_cli_trains_a_streamed_run(jpegs, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--dataset", "folder", "--data_dir", str(jpegs), "--imb_factor", str(IMB),
                       "--decode", "stream", "--workers", "1", "--image_size", str(SIZE),
                       "--model", "cnn", "--width", "4", "--epochs", "2", "--batch_size", "50",
                       "--device", "cpu", "--no_progress", "--out", str(out)]) == 0
    stored = json.loads((out / "config.json").read_text())
    assert (stored["decode"], stored["image_size"], stored["workers"]) == ("stream", SIZE, 1)
    assert stored["derived"]["class_counts"] == [100, 50, 25]
    assert stored["derived"]["mean"] == list(IMAGENET_MEAN)
    rows = ckpt.read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2] and all(0 <= r["acc"] <= 100 for r in rows)
    first, last = (ckpt.load_checkpoint(ckpt.checkpoint_path(out, e))["model"] for e in (0, 2))
    assert any(not torch.equal(first[k], last[k]) for k in first)  # it trained
    config = Config.from_json(stored)
    assert isinstance(config.load_data(), StreamData) and config.spec.image_shape == (3, SIZE,
                                                                                       SIZE)


def test_stream_needs_a_folder_and_workers_are_no_identity(jpegs, tmp_path, capsys):
    assert train_main(["--dataset", "digits", "--decode", "stream",
                       "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err == "error: --decode stream needs --dataset folder\n"
    assert not (tmp_path / "x").exists()
    assert Config(dataset="digits").decode == "cache"  # auto, resolved
    with pytest.raises(ValueError, match=r"workers must be an integer in \[0, 1024\], got -1"):
        _config(jpegs, workers=-1)
    a, b = _config(jpegs), _config(jpegs, workers=3)
    assert a.identity() == b.identity() and "decode" in a.identity()


def test_auto_streams_exactly_above_the_cache_limit(jpegs, monkeypatch):
    n = 3 * (TRAIN_PER_CLASS + TEST_PER_CLASS)  # every file of both splits
    auto = dict(dataset="folder", data_dir=str(jpegs), imb_factor=IMB)
    assert Config(**auto, image_size=SIZE).decode == "cache"  # 330 x 3 x 16 x 16 << 4 GiB
    monkeypatch.setattr(stream_loader, "CACHE_LIMIT_BYTES", cache_bytes(n, (3, SIZE, SIZE)))
    assert Config(**auto, image_size=SIZE).decode == "cache"  # at the limit: it fits
    monkeypatch.setattr(stream_loader, "CACHE_LIMIT_BYTES", cache_bytes(n, (3, SIZE, SIZE)) - 1)
    assert Config(**auto, image_size=SIZE).decode == "stream"
    # Without image_size the cache would hold the images' own 64 x 64; streaming gets 224.
    monkeypatch.setattr(stream_loader, "CACHE_LIMIT_BYTES", cache_bytes(n, (3, 64, 64)))
    assert (Config(**auto).decode, Config(**auto).image_size) == ("cache", None)
    monkeypatch.setattr(stream_loader, "CACHE_LIMIT_BYTES", cache_bytes(n, (3, 64, 64)) - 1)
    assert (Config(**auto).decode, Config(**auto).image_size) == ("stream", 224)
    assert Config(**auto, decode="cache").decode == "cache"  # asked for: kept


# -- resume ---------------------------------------------------------------------------------


def _interrupt(monkeypatch, config: Config, run: Path, at_step: int) -> None:
    """Trains ``config`` into ``run`` until optimizer step ``at_step`` has changed the weights."""
    real, calls = GroupSAM.step, {"n": 0}

    def step(self, *args, **kwargs):
        loss = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == at_step:
            raise Interrupted
        return loss

    monkeypatch.setattr(GroupSAM, "step", step)
    with pytest.raises(Interrupted):
        train(config, run, progress=False, log=lambda m: None)
    monkeypatch.undo()


@pytest.mark.parametrize("resume_workers", [0, 1])
def test_interrupted_streamed_run_resumes_bitwise(jpegs, tmp_path, monkeypatch, resume_workers):
    config = _config(jpegs)
    steps = math.ceil(sum(config.counts) / config.batch_size)
    reference = train(config, tmp_path / "reference", progress=False, log=lambda m: None)
    run = tmp_path / "run"
    _interrupt(monkeypatch, config, run, steps + 2)  # mid-epoch 2
    assert [e for e, _ in ckpt.list_checkpoints(run)] == [0, 1]
    torch.manual_seed(123)  # nothing may depend on the global generators
    train(config.replace(workers=resume_workers), run, resume=True, progress=False,
          log=lambda m: None)
    assert metrics_without_time(run) == metrics_without_time(reference)
    if resume_workers == 0:
        assert digests(run) == digests(reference)  # every checkpoint, byte for byte
        return
    # The checkpoints hold the config (workers 1 here): compare what was trained.
    for epoch in range(config.epochs + 1):
        ours, theirs = (ckpt.load_checkpoint(ckpt.checkpoint_path(folder, epoch))
                        for folder in (run, reference))
        for key, tensor in theirs["model"].items():
            assert torch.equal(ours["model"][key], tensor), (epoch, key)
        for i, state in theirs["optimizer"]["state"].items():
            assert torch.equal(ours["optimizer"]["state"][i]["momentum_buffer"],
                               state["momentum_buffer"]), (epoch, i)


# -- two ranks ------------------------------------------------------------------------------


def _final_state(config: Config) -> dict:
    trainer = Trainer.build(config)
    losses = [trainer.train_epoch(epoch) for epoch in range(config.epochs)]
    return {"state": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "losses": losses}


def _rank(rank: int, world: int, port: int, folder: str, jpegs: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert distributed.setup("cpu") == "cpu"
    # 175 images in batches of 60: the last global batch of 55 splits 28 + 27.
    result = _final_state(_config(Path(jpegs), model="mlp", epochs=2, batch_size=60))
    torch.save(result, Path(folder) / f"rank{rank}.pt")
    distributed.cleanup()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(jpegs, tmp_path, tmp_path_factory):
    from _ranks import spawn_two_ranks

    spawn_two_ranks(tmp_path_factory, _rank, str(tmp_path), str(jpegs))
    one = _final_state(_config(jpegs, model="mlp", epochs=2, batch_size=60))
    initial = Trainer.build(_config(jpegs, model="mlp", epochs=2)).model.state_dict()
    assert max((one["state"][k] - initial[k]).abs().max().item() for k in initial) > 1e-3
    for rank in range(2):
        theirs = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        gap = max((theirs["state"][k].double() - one["state"][k].double()).abs().max().item()
                  for k in one["state"])
        assert gap < TOLERANCE, (rank, gap)
        assert theirs["losses"] == pytest.approx(one["losses"], rel=1e-6)


# -- analysis ---------------------------------------------------------------------------------


def test_streamed_group_hessian_equals_the_one_of_the_decoded_images(jpegs, tmp_path):
    from landscape.hvp import GroupHessian
    from landscape.load import load

    run_dir = train(_config(jpegs, epochs=1), tmp_path / "run", progress=False,
                    log=lambda m: None)
    run = load(run_dir, device="cpu")
    assert run.streamed and run.group_size("tail") == 75  # bee 50 + cow 25 (eta 60)
    streamed = GroupHessian.from_run(run, "tail", batch_size=16)  # 5 batches, lazily decoded
    assert streamed.source is not None and streamed.n_samples == 75
    # The reference: the same files decoded in memory by the test view, one tensor.
    data = run.data
    tail = [i for i, y in enumerate(data.train.labels) if y in run.classes("tail")]
    images = FolderImages(data.train, False, SIZE, seed=0)
    x = normalize(torch.stack([images[(0, i)][0] for i in tail]), data.spec)
    y = torch.tensor([data.train.labels[i] for i in tail])
    decoded = GroupHessian(run.model, run.loss_fn(), x, y)
    V = torch.randn(decoded.n_params, 3, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    ours, theirs = streamed.matmat(V), decoded.matmat(V)
    assert theirs.norm() > 0
    assert (ours - theirs).norm() <= 1e-6 * theirs.norm()
    assert streamed.loss() == pytest.approx(decoded.loss(), rel=1e-10)
    gx, gy = run.group_data("tail")  # the whole group decoded: the same samples
    assert torch.equal(gy, y) and torch.allclose(gx, x)


def test_hessian_cli_streams_a_group_without_decoding_it_whole(jpegs, tmp_path, monkeypatch):
    from landscape.cli import main as landscape_main
    from landscape.load import Run

    run_dir = train(_config(jpegs, epochs=1), tmp_path / "run", progress=False,
                    log=lambda m: None)

    def whole(*args, **kwargs):
        raise AssertionError("a streamed group was decoded whole")

    monkeypatch.setattr(Run, "group_data", whole)
    out = tmp_path / "tail.json"
    assert landscape_main(["hessian", str(run_dir), "--group", "tail", "--top", "1",
                           "--bottom", "1", "--batch_size", "32", "--device", "cpu",
                           "--no_progress", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_samples"] == 75 and len(result["top"]) == 1 and len(result["bottom"]) == 1


def test_report_on_a_streamed_run_evaluates_from_the_folder(jpegs, tmp_path):
    """Epoch 0 has no metrics row: the report evaluates it, reading the test folder through a
    loader (it crashed on streamed data before)."""
    import landscape
    from landscape.report.build import _final_accuracy

    run_dir = train(_config(jpegs, epochs=1), tmp_path / "run", progress=False,
                    log=lambda m: None)
    run = landscape.load(run_dir / "epoch_0000.pt", device="cpu")
    accuracy = _final_accuracy(run)
    assert set(accuracy) >= {"acc", "acc_head", "acc_tail"}
    assert all(0 <= v <= 100 for v in accuracy.values() if v == v)
