#!/usr/bin/env bash
# Creates .venv (if missing) and installs moco_hf with its dependencies. Safe to run again.
# torch 2.14.1 + torchvision 0.29.1 are pinned together: timm needs torchvision, and a torchvision
# built for another torch fails to import ("operator torchvision::nms does not exist").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import moco_hf, timm, transformers, datasets, accelerate, pytest" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q -e ".[dev]"
fi
