#!/usr/bin/env bash
# The GPU check in a fixed budget (default 10 minutes on one GPU): decode CIFAR-10 from the JPEG
# archive, measure our training loop against the seed-style loop, train CIFAR-10-LT IF=100 on
# ResNet-32 with SGD, SAM, ImbSAM and SSE-SAM for as many epochs as fit, write the saddle
# report. Everything is in bench/gpu_check.py (its docstring gives the budget's split); this
# wrapper only starts the clock and, when asked, installs the packages.
#
#   bench/gpu_check.sh ARCHIVE OUT_DIR [--minutes 10] [gpu_check.py options]
#   WHEELS=/path/to/wheels bench/gpu_check.sh ARCHIVE OUT_DIR
#
# PYTHON (default: python) must import torch with CUDA and the project's dependencies. With
# WHEELS= set to a folder of wheel files, they are installed first, offline (pip --no-index),
# into a throw-away virtual environment that sees the system's packages; the time this takes
# counts against the budget, and nothing installed outlives the command.
set -euo pipefail

GPU_CHECK_STARTED=$(date +%s.%N)
GPU_CHECK_COMMAND="bench/gpu_check.sh $*"
export GPU_CHECK_STARTED GPU_CHECK_COMMAND

if [[ $# -lt 2 ]]; then
    echo "usage: bench/gpu_check.sh ARCHIVE OUT_DIR [--minutes 10] [gpu_check.py options]" >&2
    exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python}

if [[ -n "${WHEELS:-}" ]]; then
    if [[ ! -d "$WHEELS" ]]; then
        echo "gpu_check.sh: WHEELS=$WHEELS is not a folder" >&2
        exit 2
    fi
    venv=$(mktemp -d -t gpu_check-venv.XXXXXXXX)
    trap 'rm -rf "$venv"' EXIT
    "$python" -m venv --system-site-packages "$venv"
    "$venv/bin/python" -m pip install --quiet --no-index --find-links "$WHEELS" \
        torch numpy scipy matplotlib plotly scikit-learn tqdm pillow
    python="$venv/bin/python"
fi

"$python" "$here/gpu_check.py" "$@"
