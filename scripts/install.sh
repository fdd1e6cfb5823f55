#!/usr/bin/env bash
# Create .venv and install kandinsky5-tuner's dependencies.
# torch first, pinned: on a machine without CUDA `torch==2.13.0` resolves to the CPU wheel.  GPU users who want a
# specific CUDA build install it first (see README), and this script then leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q 'torch==2.13.0'
.venv/bin/python -m pip install -q -r requirements-dev.txt
.venv/bin/python -c "import torch; print(f'torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}')"
