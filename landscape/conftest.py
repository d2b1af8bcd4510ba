"""The doctests' set-up (pytest only): the examples in ``landscape/`` analyse ``run_dir``, a tiny
digits-LT run trained here once (an MLP of width 8, SSE-SAM, 3 epochs, a checkpoint each epoch:
a few seconds on a CPU). With a run of your own, pass its folder instead."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def run_dir(doctest_namespace, tmp_path_factory) -> str:
    import torch

    from train.config import Config
    from train.loop import train

    torch.set_num_threads(1)  # tiny operations: threads only add synchronisation
    config = Config(dataset="digits", imb_factor=20.0, lr=0.1, epochs=3, save_every=1,
                    model="mlp", width=8, opt="ssesam", device="cpu")
    folder = train(config, tmp_path_factory.mktemp("doctest") / "ssesam", progress=False,
                   log=lambda _: None)
    doctest_namespace["run_dir"] = str(folder)
    return str(folder)
