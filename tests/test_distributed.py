"""Data-parallel training on 2 CPU processes (gloo) against one process with the same global batch.

Models without BatchNorm (``mlp``) give the same parameters with 2 ranks as with 1, to float
rounding: the two ranks' partial gradients are summed instead of computed in one sum. The
tolerance is ``1e-6`` absolute on every parameter after 2 epochs (measured: ~1e-8).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _ranks import free_port, run_torchrun, shared_folder, spawn_two_ranks
import torch

from train import checkpoint as ckpt
from train import distributed
from train.cli import main
from train.config import Config
from train.data import load_dataset
from train.loop import Trainer, evaluate, train
from train.models import build_model

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6

# digits-LT, IF 100: 294 training images. Each case has an uneven last global batch; in
# "imbsam_group" it holds a single image, so rank 1's part of it is empty.
CASES = {
    "ssesam_batch": Config(dataset="digits", model="mlp", opt="ssesam", gamma=0.5, epochs=2,
                           batch_size=100, device="cpu"),
    "imbsam_group": Config(dataset="digits", model="mlp", opt="imbsam", group_reduction="group",
                           tail_scale=2.0, epochs=2, batch_size=293, lr=0.1, device="cpu"),
    "sam_cnn_bn": Config(dataset="digits", model="cnn", opt="sam", epochs=2, batch_size=64,
                         device="cpu"),
}


def run_case(config: Config, data) -> dict:
    trainer = Trainer.build(config, data=data)
    losses = [trainer.train_epoch(epoch) for epoch in range(config.epochs)]
    return {"state": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "losses": losses, "acc": evaluate(trainer.model, trainer.data, config.groups)}


def analysis(run_dir: Path, surface_path: Path) -> dict:
    """HVPs (a block of 3), loss, gradient and extreme eigenvalues of the tail group's Hessian,
    and a 5 x 5 surface of the run in ``run_dir``: sharded under torchrun, whole otherwise."""
    from landscape.directions import random_directions
    from landscape.hvp import GroupHessian
    from landscape.lanczos import extreme_eigenpairs
    from landscape.load import load
    from landscape.surface import compute_surface, grid_axis

    run = load(run_dir, device="cpu")
    op = GroupHessian.from_run(run, "tail", batch_size=16)  # 60 samples: 2 batches per rank
    block = torch.randn(op.n_params, 3, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    eigen = extreme_eigenpairs(op, top=1, bottom=1, max_steps=60)
    axis = grid_axis(5)
    surface = compute_surface(run, random_directions(run.model, 2, seed=0), axis, axis,
                              groups=("head", "tail"), path=surface_path, save_every=7)
    return {"hvp": op.matmat(block), "loss": op.loss(), "gradient": op.gradient(),
            "eigen": (eigen.lambda_max, eigen.lambda_min), "samples": op.n_samples,
            "surface": {g: (surface.loss[g], surface.accuracy[g]) for g in surface.groups}}


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert distributed.setup("cpu") == "cpu"
    data = load_dataset("digits", 100)
    results = {name: run_case(config, data) for name, config in CASES.items()}

    # The helpers.
    value = torch.tensor([float(rank + 1), 10.0])
    distributed.all_reduce_mean([value])
    total = torch.tensor([float(rank + 1)], dtype=torch.float64)
    distributed.all_reduce_sum([total])
    module = build_model("mlp", (1, 8, 8), 10, 4, seed=rank)  # different weights per rank
    distributed.broadcast_module(module)
    results["helpers"] = {"mean": value, "sum": total, "broadcast": module.state_dict(),
                          "world": distributed.world(), "main": distributed.is_main()}

    # train(): every rank trains, only rank 0 writes the (shared) run folder.
    saves = []
    real_save = ckpt.save_checkpoint
    ckpt.save_checkpoint = lambda *a, **k: saves.append(rank) or real_save(*a, **k)
    try:
        train(CASES["ssesam_batch"], Path(folder) / "run", progress=False, log=lambda m: None,
              data=data, is_writer=distributed.is_main())
    finally:
        ckpt.save_checkpoint = real_save
    results["saves"] = saves

    # Analysis of the checkpoint rank 0 wrote, shared between the ranks.
    from landscape.surface import Surface

    distributed.barrier()
    writes = []
    real_write = Surface.save
    Surface.save = lambda self, path: writes.append(rank) or real_write(self, path)
    try:
        results["analysis"] = analysis(Path(folder) / "run", Path(folder) / "surface.npz")
    finally:
        Surface.save = real_write
    results["surface_writes"] = writes
    torch.save(results, Path(folder) / f"rank{rank}.pt")
    distributed.cleanup()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    # One 2-process session for the whole module, shared by the pytest-xdist workers (their
    # temporary folders have a common parent): the first to get the lock runs it.
    from filelock import FileLock

    shared = shared_folder(tmp_path_factory)
    folder = shared / "ddp_two_ranks"
    with FileLock(str(shared / "ddp_two_ranks.lock")):
        if not (folder / "done").exists():
            folder.mkdir(exist_ok=True)
            spawn_two_ranks(tmp_path_factory, _worker, str(folder))
            (folder / "done").write_text("")
    return folder, [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def one_rank():
    data = load_dataset("digits", 100)
    return {name: run_case(config, data) for name, config in CASES.items()}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("case", ["ssesam_batch", "imbsam_group"])
@pytest.mark.slow
def test_two_ranks_train_the_same_parameters_as_one_process(two_ranks, one_rank, case):
    _, ranks = two_ranks
    reference = one_rank[case]
    initial = build_model("mlp", (1, 8, 8), 10, seed=CASES[case].seed).state_dict()
    assert max_difference(reference["state"], initial) > 1e-3  # it did train
    for result in ranks:
        assert max_difference(result[case]["state"], reference["state"]) <= TOLERANCE
        assert result[case]["losses"] == pytest.approx(reference["losses"], rel=1e-6)
    assert ranks[0][case]["acc"] == ranks[1][case]["acc"]


@pytest.mark.slow
def test_with_batchnorm_the_ranks_agree_with_each_other(two_ranks):
    # BatchNorm uses per-rank batch statistics (not the one-process numbers); parameters and
    # the running statistics, averaged at each epoch's end, are still the same on both ranks,
    # so evaluation and checkpoints do not depend on the rank.
    _, ranks = two_ranks
    a, b = ranks[0]["sam_cnn_bn"], ranks[1]["sam_cnn_bn"]
    assert max_difference(a["state"], b["state"]) == 0.0
    assert a["acc"] == b["acc"] and a["losses"] == b["losses"]


@pytest.mark.slow
def test_collective_helpers(two_ranks):
    _, ranks = two_ranks
    for result in ranks:
        helpers = result["helpers"]
        assert helpers["world"] == 2
        torch.testing.assert_close(helpers["mean"], torch.tensor([1.5, 10.0]))
        assert helpers["sum"].item() == 3.0
        rank0 = build_model("mlp", (1, 8, 8), 10, 4, seed=0).state_dict()
        assert max_difference(helpers["broadcast"], rank0) == 0.0
    assert [r["helpers"]["main"] for r in ranks] == [True, False]


@pytest.mark.slow
def test_only_rank_zero_writes_the_run_folder(two_ranks, one_rank):
    folder, ranks = two_ranks
    assert ranks[1]["saves"] == [] and len(ranks[0]["saves"]) == 2  # epoch 0 and 2
    rows = ckpt.read_metrics(folder / "run")
    assert [r["epoch"] for r in rows] == [1, 2]
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(folder / "run")[-1][1])["model"]
    assert max_difference(state, one_rank["ssesam_batch"]["state"]) <= TOLERANCE


def test_without_torchrun_nothing_is_initialised(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.setup("cpu") is None
    assert (distributed.world(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    tensor = torch.ones(3)
    distributed.all_reduce_sum([tensor])
    distributed.all_reduce_mean([tensor])
    assert torch.equal(tensor, torch.ones(3))


def test_a_fixed_gpu_under_torchrun_is_bad_input(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    code = main(["--dataset", "digits", "--device", "cuda:1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cuda" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_torchrun_command_line(tmp_path, tmp_path_factory):
    # The real launcher: `torchrun --standalone --nproc_per_node 2 -m train ...` on gloo.
    args = ["--dataset", "digits", "--opt", "ssesam", "--epochs", "2", "--batch_size", "100",
            "--device", "cpu", "--no_progress", "--save_every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = run_torchrun(tmp_path_factory, ["train", *args, "--out", str(tmp_path / "ddp")],
                        tmp_path / "ddp", cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(tmp_path / "ddp")  # printed once, by rank 0
    reference = train(Config(dataset="digits", opt="ssesam", epochs=2, batch_size=100,
                             device="cpu", save_every=1), tmp_path / "one", progress=False,
                      log=lambda m: None)
    got = [e for e, _ in ckpt.list_checkpoints(tmp_path / "ddp")]
    assert got == [0, 1, 2]
    a = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "ddp")[-1][1])
    b = ckpt.load_checkpoint(ckpt.list_checkpoints(reference)[-1][1])
    assert max_difference(a["model"], b["model"]) <= TOLERANCE
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in rows] == [1, 2]


@pytest.mark.slow
def test_analysis_shared_between_two_ranks_gives_the_one_process_numbers(two_ranks, tmp_path):
    # HVPs: each rank sums its half of the samples, then the halves are summed (float64, a
    # different order of the same sum: 1e-12 relative). Surface points: each is computed
    # whole by one rank, so the gathered surface is the one-process surface exactly.
    folder, ranks = two_ranks
    reference = analysis(folder / "run", tmp_path / "surface.npz")
    scale = reference["hvp"].abs().max().item()
    assert scale > 0 and reference["samples"] == 60
    for result in ranks:
        got = result["analysis"]
        assert (got["hvp"] - reference["hvp"]).abs().max().item() <= 1e-12 * scale
        assert (got["gradient"] - reference["gradient"]).abs().max().item() <= 1e-12
        assert got["loss"] == pytest.approx(reference["loss"], rel=1e-12)
        assert got["eigen"] == pytest.approx(reference["eigen"], rel=1e-9)
        for group, (loss, accuracy) in reference["surface"].items():
            assert torch.equal(torch.from_numpy(got["surface"][group][0]), torch.from_numpy(loss))
            assert torch.equal(torch.from_numpy(got["surface"][group][1]),
                               torch.from_numpy(accuracy))
    # The surface file is written by rank 0 alone (saves after 7, 14, 21, 25 points), complete.
    assert ranks[1]["surface_writes"] == [] and len(ranks[0]["surface_writes"]) == 4
    from landscape.surface import Surface

    stored = Surface.load(folder / "surface.npz")
    assert stored.complete
    assert torch.equal(torch.from_numpy(stored.loss["tail"]),
                       torch.from_numpy(reference["surface"]["tail"][0]))


@pytest.mark.slow
def test_torchrun_landscape_hessian_command(two_ranks, tmp_path, tmp_path_factory):
    # `torchrun -m landscape hessian`: the HVPs shared by 2 ranks, the JSON written by rank 0,
    # the same eigenvalues as one process (to 1e-12 relative) after the same number of HVPs.
    from landscape.cli import main as landscape_main

    folder, _ = two_ranks
    args = ["hessian", str(folder / "run"), "--group", "tail", "--max_steps", "40",
            "--device", "cpu", "--no_progress", "--batch_size", "16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = run_torchrun(tmp_path_factory, ["landscape", *args, "--json",
                                           str(tmp_path / "two.json")],
                        tmp_path / "two.json", cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.strip().splitlines()) == 1  # rank 0's summary line only
    assert landscape_main([*args, "--json", str(tmp_path / "one.json")]) == 0
    two = json.loads((tmp_path / "two.json").read_text())
    one = json.loads((tmp_path / "one.json").read_text())
    assert two["hvps"] == one["hvps"] and two["n_samples"] == one["n_samples"] == 60
    for key in ("top", "bottom"):
        assert two[key] == pytest.approx(one[key], rel=1e-12)
    # A journal is not kept under torchrun (every rank would write it): one line, no files.
    journal = tmp_path / "journal"
    done = run_torchrun(tmp_path_factory, ["landscape", *args, "--json", str(tmp_path / "j.json"),
                                           "--journal", str(journal)],
                        tmp_path / "j.json", cwd=ROOT, env=env, timeout=300)
    assert done.returncode != 0 and "a journal is not kept under torchrun" in done.stderr
    assert not (tmp_path / "j.json").exists() and not journal.exists()
