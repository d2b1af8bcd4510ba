"""Parameter subsets (``params=`` / ``--params``) and the per-block sweep (``--per_layer``).

The reference is the dense float64 Hessian of the whole network (``_reference.dense_hessian``,
``torch.func``, no ``landscape`` code) with the selected parameters' rows and columns taken
out: the block :math:`H_{SS}`, every other parameter fixed. Products agree with it to ``1e-10``
relative, extreme eigenvalues to ``1e-6`` relative (the Lanczos tolerance), and the blocks'
exact traces add up to the whole trace (to ``1e-10``).
"""

from __future__ import annotations

import fnmatch
import json

import numpy as np
import pytest
import torch

import landscape
from _reference import CNN_GROUP, dense_eigh, dense_group_hessian
from landscape.cli import main
from landscape.errors import AnalysisError
from landscape.hessian import hessian_summary
from landscape.hvp import GroupHessian
from landscape.layout import ParamLayout, parse_patterns
from landscape.per_layer import per_layer_sweep, write_per_layer_figures


@pytest.fixture(scope="module")
def runs(tiny_mlp_path, tiny_cnn_path):
    """The tiny MLP and BatchNorm-CNN runs of conftest.py, loaded once for the module."""
    return {"mlp": landscape.load(tiny_mlp_path, device="cpu"),
            "cnn": landscape.load(tiny_cnn_path, device="cpu")}


@pytest.fixture(scope="module")
def mlp(runs):
    return runs["mlp"]


@pytest.fixture(scope="module")
def cnn(runs):
    return runs["cnn"]


@pytest.fixture(scope="module")
def dense(mlp, cnn):
    return {"mlp": dense_group_hessian(mlp, "tail"), "cnn": dense_group_hessian(cnn, CNN_GROUP)}


def _block(run, H, patterns):
    """The dense sub-Hessian of ``patterns``, built from names and sizes by hand."""
    names = [name for name, _ in run.model.named_parameters()]
    sizes = [p.numel() for p in run.model.parameters()]
    starts = np.cumsum([0] + sizes)
    keep = [i for i, name in enumerate(names)
            if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    index = torch.cat([torch.arange(starts[i], starts[i] + sizes[i]) for i in keep])
    return H[index][:, index], sum(sizes[i] for i in keep)


def _relative(a, b):
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------
# The layout's selection


def test_select_positions_embed_and_blocks(mlp):
    layout = ParamLayout.of(mlp.model)
    assert list(layout.blocks()) == ["1", "3", "5"]  # an nn.Sequential MLP
    sub = layout.select("3.*,5.bias")
    assert sub.names == ("3.weight", "3.bias", "5.bias")
    index = layout.positions(sub)
    w = layout.flatten(layout.parameters(mlp.model))
    assert torch.equal(w[index], sub.flatten(sub.parameters(mlp.model)))
    embedded = layout.embed(sub, w[index])
    assert torch.equal(embedded[index], w[index]) and embedded.count_nonzero() <= sub.n
    assert layout.select(["5.*", "1.*"]).names == layout.select("1.*,5.*").names  # model order
    assert parse_patterns(" fc.* , layer4.* ") == ("fc.*", "layer4.*")


@pytest.mark.parametrize("patterns", ["layer9.*", "fc.*,", "", "3.WEIGHT"])
def test_bad_or_empty_selections_raise(mlp, patterns):
    with pytest.raises(AnalysisError, match="params"):
        ParamLayout.of(mlp.model).select(patterns)


def test_root_parameters_are_blocks_of_their_own():
    model = torch.nn.Linear(3, 2)
    assert ParamLayout.of(model).blocks() == {"weight": ("weight",), "bias": ("bias",)}


# --------------------------------------------------------------------------------------------
# The operator against the dense sub-Hessian


@pytest.mark.parametrize("case,group,patterns", [
    ("mlp", "tail", ("3.*",)), ("mlp", "tail", ("1.bias", "5.*")),
    ("cnn", CNN_GROUP, ("4.*",)), ("cnn", CNN_GROUP, ("0.*", "8.weight"))])
@pytest.mark.parametrize("method", ["double-backward", "forward-over-reverse"])
def test_products_are_the_dense_sub_hessian(case, group, patterns, method, mlp, cnn, dense):
    run = mlp if case == "mlp" else cnn
    block, size = _block(run, dense[case], patterns)
    op = GroupHessian.from_run(run, group, method=method, params=",".join(patterns))
    assert op.n_params == size == op.layout.n < op.full_layout.n
    V = torch.randn(size, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert _relative(op.matmat(V), block @ V) < 1e-10
    whole = GroupHessian.from_run(run, group)  # the gradient: the whole one's entries
    index = whole.layout.positions(op.layout)
    torch.testing.assert_close(op.gradient(), whole.gradient()[index], rtol=0, atol=1e-12)
    assert op.loss() == pytest.approx(whole.loss(), rel=1e-12)
    assert all(p.requires_grad for p in run.model.parameters())  # the caller's model untouched


def test_hessian_summary_of_a_block(mlp, dense):
    block, size = _block(mlp, dense["mlp"], ("3.*",))
    exact = dense_eigh(block)
    s = hessian_summary(mlp, "tail", top=2, bottom=1, params="3.*", tol=1e-8)
    assert s.provenance.n_params == size and s.provenance.params == ("3.*",)
    assert s.top == pytest.approx(exact[::-1][:2], rel=1e-6)
    assert s.bottom[0] == pytest.approx(exact[0], rel=1e-6, abs=1e-8)
    assert s.to_json()["params"] == ["3.*"]
    assert hessian_summary(mlp, "tail", top=1, bottom=0).to_json()["params"] is None


def test_per_layer_sweep_against_the_dense_blocks(mlp, dense, tmp_path):
    sweep = per_layer_sweep(mlp, "tail", tol=1e-8, trace_hvps=99)
    H = dense["mlp"]
    traces = []
    for b in sweep.blocks:
        block, size = _block(mlp, H, b.params)
        exact = dense_eigh(block)
        assert b.n_params == size
        assert b.lambda_max == pytest.approx(exact[-1], rel=1e-6)
        assert b.lambda_min == pytest.approx(exact[0], rel=1e-6, abs=1e-8)
        assert b.lambda_max <= dense_eigh(H)[-1] + 1e-9  # interlacing (Cauchy)
        exact_trace = float(torch.trace(block))
        # Hutch++ with 99 HVPs: within 4 of its own standard errors, or exact on a small block
        assert abs(b.trace - exact_trace) <= 4 * b.trace_stderr + 1e-8 * abs(exact_trace)
        traces.append(exact_trace)
    assert sum(traces) == pytest.approx(float(torch.trace(H)), rel=1e-10)
    written = write_per_layer_figures(sweep, tmp_path / "fig")
    assert [p.name for p in written] == ["per_layer.png", "per_layer.html"]
    assert written[0].read_bytes()[:4] == b"\x89PNG"
    html = written[1].read_text()
    assert len(html) > 1_000_000 and "<script src=" not in html  # plotly.js inline: offline
    data = sweep.to_json()
    assert [b["block"] for b in data["blocks"]] == ["1", "3", "5"] and data["group"] == "tail"


# --------------------------------------------------------------------------------------------
# The commands


def test_hessian_command_with_params_and_an_empty_match(tiny_mlp_path, mlp, dense, tmp_path,
                                                        capsys):
    out = tmp_path / "h.json"
    assert main(["hessian", tiny_mlp_path, "--group", "tail", "--params", "5.*", "--tol", "1e-8",
                 "--json", str(out), "--no_progress"]) == 0
    data = json.loads(out.read_text())
    block, size = _block(mlp, dense["mlp"], ("5.*",))
    assert data["n_params"] == size and data["params"] == ["5.*"]
    assert data["top"][0] == pytest.approx(dense_eigh(block)[-1], rel=1e-6)
    capsys.readouterr()
    for argv in (["hessian", tiny_mlp_path, "--params", "fc.*", "--json", str(tmp_path / "x")],
                 ["spectrum", tiny_mlp_path, "--params", "fc.*", "--out", str(tmp_path / "s")],
                 ["classes", tiny_mlp_path, "--params", "fc.*", "--json", str(tmp_path / "c")],
                 ["surface", tiny_mlp_path, "--params", "fc.*", "--grid", "3",
                  "--out", str(tmp_path / "f")]):
        assert main(argv + ["--no_progress"]) == 2, argv[0]
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no parameter matches" in err, err
        assert "blocks: 1, 3, 5" in err
    assert not [p.name for p in tmp_path.iterdir() if p.name != "h.json"]  # nothing written


def test_per_layer_command(tiny_mlp_path, tmp_path, capsys):
    out = tmp_path / "pl.json"
    assert main(["hessian", tiny_mlp_path, "--group", "tail", "--per_layer", "--max_steps",
                 "60", "--trace_hvps", "9", "--json", str(out), "--out", str(tmp_path / "fig"),
                 "--no_progress"]) == 0
    data = json.loads(out.read_text())
    assert [b["block"] for b in data["blocks"]] == ["1", "3", "5"]
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["per_layer.html",
                                                                    "per_layer.png"]
    capsys.readouterr()
    assert main(["hessian", tiny_mlp_path, "--per_layer", "--params", "1.*"]) == 2
    assert main(["hessian", tiny_mlp_path, "--out", str(tmp_path / "o")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_spectrum_and_classes_commands_with_params(tiny_mlp_path, mlp, tmp_path):
    assert main(["spectrum", tiny_mlp_path, "--groups", "tail", "--params", "3.*", "--probes",
                 "1", "--steps", "8", "--out", str(tmp_path / "s"), "--no_progress"]) == 0
    meta = json.loads((tmp_path / "s" / "spectrum.json").read_text())
    assert meta["params"] == "3.*"
    out = tmp_path / "c.json"
    assert main(["classes", tiny_mlp_path, "--classes", "9", "--params", "3.*", "--steps", "60",
                 "--trace_hvps", "9", "--no_cache", "--json", str(out), "--no_progress"]) == 0
    data = json.loads(out.read_text())
    assert data["settings"]["params"] == ["3.*"]
    x, y = mlp.group_data([9])
    from _reference import dense_hessian

    block, _ = _block(mlp, dense_hessian(mlp.model, mlp.loss_fn(), x, y), ("3.*",))
    assert data["classes"][0]["lambda_max"] == pytest.approx(dense_eigh(block)[-1], rel=1e-4)


@pytest.mark.parametrize("kind", ["random", "eigen"])
def test_surface_directions_move_only_the_selection(kind, tiny_mlp_path, mlp, dense, tmp_path):
    from landscape.surface import Surface

    out = tmp_path / kind
    assert main(["surface", tiny_mlp_path, "--directions", kind, "--eigen_group", "tail",
                 "--params", "3.*", "--grid", "3", "--out", str(out), "--no_progress"]) == 0
    layout = ParamLayout.of(mlp.model)
    outside = torch.ones(layout.n, dtype=torch.bool)
    outside[layout.positions(layout.select("3.*"))] = False
    directions = Surface.load(out / "surface.npz").direction_objects()
    assert len(directions) == 2
    for d in directions:
        assert d.vector[outside].abs().max() == 0 and d.vector[~outside].abs().max() > 0
        assert d.recipe["params"] == ["3.*"]
    if kind == "eigen":
        block, _ = _block(mlp, dense["mlp"], ("3.*",))
        assert directions[0].recipe["eigenvalue"] == pytest.approx(dense_eigh(block)[-1],
                                                                   rel=1e-4)
