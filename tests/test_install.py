"""Installing the project keeps the user's torch (README: "keep the torch you have").

One real resolve, no download of anything big: ``pip install --dry-run --report`` of README's
command ``pip install -e ".[notebooks]"`` into an empty virtual environment that holds only the
metadata of the test environment's torch (2.13.0 under ``.ci/setup``), so that pip sees that
torch installed and no torchvision. The plan must contain no torch, torchvision or CUDA wheel.
(An unpinned ``torchvision`` among the requirements plans torch 2.14.1 and 15 ``nvidia-*``
wheels here.)
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What pip says when it cannot reach an index (or the index lacks what the project needs).
OFFLINE = re.compile(r"No matching distribution|Could not find a version|NewConnectionError|"
                     r"Network is unreachable|Temporary failure in name resolution|"
                     r"Max retries exceeded|ConnectTimeout|ProxyError", re.IGNORECASE)


def _env_with_only_torch(folder: Path) -> Path:
    """A virtual environment (no pip) whose site-packages holds only torch's metadata."""
    venv.create(folder, with_pip=False)
    python = folder / "bin" / "python"
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([python, "-c", where], capture_output=True, text=True,
                          check=True).stdout.strip()
    torch = importlib.metadata.distribution("torch")
    shutil.copytree(torch._path, Path(site) / Path(torch._path).name)
    return python


@pytest.mark.slow
def test_installing_the_project_plans_no_other_torch(tmp_path):
    python = _env_with_only_torch(tmp_path / "env")
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run",
               "--quiet", "--report", str(report), "-e", f"{ROOT}[notebooks]"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and ("no such option: --python" in done.stderr):
        pytest.skip("this pip cannot resolve for another interpreter (--python needs pip 22.3)")
    if done.returncode != 0 and OFFLINE.search(done.stderr):
        pytest.skip(f"pip cannot reach a package index: {OFFLINE.search(done.stderr).group()}")
    assert done.returncode == 0, done.stderr
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert "sse-sam-landscape" in planned and "numpy" in planned  # a real resolve happened
    heavy = {name: version for name, version in planned.items()
             if name in ("torch", "torchvision") or name.startswith("nvidia-")}
    assert heavy == {}, f"installing the project would replace torch: {heavy}"
