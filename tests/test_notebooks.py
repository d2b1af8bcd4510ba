"""The notebooks run top to bottom, headless, with tiny settings (NB_SMALL=1), are stored
without outputs, and their outputs show the analysis came out.

What "came out" means, for any notebook here (so that the notebooks may change freely):

* no cell raised, and every cell ran;
* every cell that shows a figure (``.show()``) has one among its outputs: a PNG from matplotlib
  in which data was drawn (coloured pixels: axes, ticks and text are grey), or a plotly figure
  whose every trace has data, all finite;
* every number printed or shown as text (stdout, Markdown tables) is finite, with no ``nan`` or
  ``inf`` anywhere, and the notebook shows numbers at all;
* every cell that shows an interactive (plotly) figure also shows a static PNG, so that an
  exported notebook (nbconvert HTML, GitHub) has a figure there.

A product bug that breaks the analysis (NaN eigenvalues, an empty density, a failed surface)
fails one of these; ``test_the_output_checks_can_fail`` shows that each check can.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
from pathlib import Path

import matplotlib.image
import nbformat
import numpy as np
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["explore_checkpoint.ipynb", "compare_optimizers.ipynb"]
PLOTLY = "application/vnd.plotly.v1+json"
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
NOT_FINITE = re.compile(r"\b(?:nan|inf|infinity)\b", re.IGNORECASE)


def _code_cells(notebook):
    return [c for c in notebook.cells if c.cell_type == "code"]


def _array(value) -> np.ndarray:
    """A plotly trace's data: a (nested) list, or plotly's typed array ``{dtype, bdata}``."""
    if isinstance(value, dict) and "bdata" in value:
        # flat: the finiteness checks need no shape
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
    return np.asarray(value, dtype=float)


def _plotly_problems(figure: dict) -> list[str]:
    traces = figure.get("data", [])
    if not traces:
        return ["a plotly figure without traces"]
    problems = []
    for k, trace in enumerate(traces):
        arrays = [_array(trace[axis]) for axis in ("x", "y", "z") if axis in trace]
        if not arrays or any(a.size == 0 for a in arrays):
            problems.append(f"plotly trace {k} has no data")
        elif not all(np.isfinite(a.astype(float)).all() for a in arrays):
            problems.append(f"plotly trace {k} has non-finite data")
    return problems


def _png_problems(encoded: str) -> list[str]:
    image = matplotlib.image.imread(io.BytesIO(base64.b64decode(encoded)), format="png")
    rgb = image[..., :3]
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.2
    return [] if coloured.mean() > 1e-4 else ["a matplotlib figure with no data drawn"]


def _text_problems(text: str) -> list[str]:
    problems = [f"non-finite value {m.group()!r} in {text[:80]!r}"
                for m in NOT_FINITE.finditer(text)]
    problems += [f"non-finite number {m.group()!r}" for m in NUMBER.finditer(text)
                 if not math.isfinite(float(m.group()))]
    return problems


def output_problems(notebook) -> list[str]:
    """Everything that says the executed ``notebook``'s analysis did not come out (see the
    module docstring); empty when it did."""
    problems, numbers = [], 0
    for index, cell in enumerate(_code_cells(notebook)):
        where = f"code cell {index}"
        if cell.execution_count is None:
            problems.append(f"{where} did not run")
        figures = 0
        for output in cell.outputs:
            if output.output_type == "error":
                problems.append(f"{where} raised {output.ename}: {output.evalue}")
                continue
            data = output.get("data", {})
            texts = [output.text] if output.output_type == "stream" and output.name == "stdout" \
                else [data[k] for k in ("text/markdown",) if k in data]
            for text in texts:
                numbers += len(NUMBER.findall(text))
                problems += [f"{where}: {p}" for p in _text_problems(text)]
            if PLOTLY in data:
                figures += 1
                problems += [f"{where}: {p}" for p in _plotly_problems(data[PLOTLY])]
            if "image/png" in data:
                figures += 1
                problems += [f"{where}: {p}" for p in _png_problems(data["image/png"])]
        if ".show()" in cell.source and not figures:
            problems.append(f"{where} shows a figure but has none among its outputs")
        outputs = [o.get("data", {}) for o in cell.outputs]
        if any(PLOTLY in d for d in outputs) and not any("image/png" in d for d in outputs):
            problems.append(f"{where} shows an interactive figure without a static PNG")
    if not numbers:
        problems.append("the notebook shows no numbers")
    return problems


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = _code_cells(notebook)
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "NB_SMALL" in code[0].source  # the parameters cell comes first


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom_and_its_analysis_comes_out(name, monkeypatch, tmp_path):
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    monkeypatch.setenv("NB_SMALL", "1")
    for variable in ("NB_RUN_DIR", "NB_RUNS_DIR"):
        monkeypatch.delenv(variable, raising=False)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))  # nothing may be left here
    monkeypatch.setenv("NB_DEMO_DIR", str(tmp_path / "no-demo"))  # no demo runs: train briefly
    monkeypatch.setenv("NB_OUT_DIR", str(tmp_path / "out"))  # the notebooks' own runs
    # One intra-op thread in the kernel: the suite runs two workers on two cores.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError, with the failing cell, on any error
    assert output_problems(notebook) == []
    assert os.environ["NB_SMALL"] == "1"
    left = [p for p in temporary.iterdir() if p.is_dir()
            and not p.name.startswith("torchinductor_")]  # torch's own compile cache
    assert not left  # the notebooks leave no folder in the temporary directory
    assert list((tmp_path / "out").glob("*.png"))  # the static figures, saved beside
    said = "".join(o.get("text", "") for c in _code_cells(notebook) for o in c.outputs)
    assert "took" in said and " s here" in said  # how long the short training took, measured


def _png(drawn: bool) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1] if drawn else [float("nan")] * 2)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _executed(source: str, *outputs) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(source, execution_count=1, outputs=list(outputs))
    return nbformat.v4.new_notebook(cells=[cell])


def test_the_output_checks_can_fail():
    stdout = nbformat.v4.new_output("stream", name="stdout", text="lambda_max 5.12 -0.903\n")
    good = _executed("plt.show()", stdout, nbformat.v4.new_output(
        "display_data", data={"image/png": _png(drawn=True)}))
    assert output_problems(good) == []
    bdata = base64.b64encode(np.array([1.0, np.nan]).tobytes()).decode()
    bad = {
        "a NaN printed": _executed("print(x)", nbformat.v4.new_output(
            "stream", name="stdout", text="lambda_max nan -0.903\n")),
        "an empty matplotlib figure": _executed("plt.show()", stdout, nbformat.v4.new_output(
            "display_data", data={"image/png": _png(drawn=False)})),
        "a NaN in a plotly trace": _executed("fig.show()", stdout, nbformat.v4.new_output(
            "display_data", data={PLOTLY: {"data": [{"x": [0, 1],
                                                     "y": {"dtype": "f8", "bdata": bdata}}]}})),
        "no figure": _executed("fig.show()", stdout),
        "an interactive figure alone": _executed("fig.show()", stdout, nbformat.v4.new_output(
            "display_data", data={PLOTLY: {"data": [{"x": [0, 1], "y": [1, 2]}]}})),
        "an error": _executed("1/0", stdout, nbformat.v4.new_output(
            "error", ename="ZeroDivisionError", evalue="division by zero", traceback=[])),
        "no numbers": _executed("print('done')", nbformat.v4.new_output(
            "stream", name="stdout", text="done\n")),
    }
    for case, notebook in bad.items():
        assert output_problems(notebook), case
