#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite on the CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The pytest script (not `python -m pytest`) keeps the repository root off sys.path: vLLM imports any top-level module
# named triton_kernels, and the project's triton_kernels/ folder is only meant as sparse_attn.triton_kernels.
exec .venv/bin/pytest tests "$@"
