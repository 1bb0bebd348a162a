#!/usr/bin/env bash
# Compile-check the CUDA sources without a GPU (CI runs this): every csrc/**/*.cu with nvcc for sm_90a, and the
# C++ files that only CUDA builds compile (code under SPARSE_ATTN_WITH_CUDA) with the host compiler against the
# CUDA and torch headers. Nothing is linked or run. Override the interpreter with PYTHON=..., the arch with ARCH=...
#
# The .cu files include only the CUDA toolkit's headers, so any torch install works for them. The CUDA-only C++
# glue includes c10/cuda headers; a CPU torch ships those without the generated c10/cuda/impl/cuda_cmake_macros.h,
# so a one-line stand-in is put on the include path when (and only when) the file is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
ARCH=${ARCH:-sm_90a}
NVCC=${NVCC:-nvcc}
CXX=${CXX:-c++}
command -v "$NVCC" >/dev/null || { echo "nvcc_check: $NVCC not found" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mapfile -t torch_includes < <("$PYTHON" -c 'from torch.utils.cpp_extension import include_paths
for p in include_paths(): print(p)')
python_include=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
cuda_include=
for home in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")" /usr/local/cuda; do
    if [ -n "$home" ] && [ -f "$home/include/cuda_runtime.h" ]; then cuda_include=$home/include; break; fi
done
[ -n "$cuda_include" ] || { echo "nvcc_check: CUDA headers not found; set CUDA_HOME" >&2; exit 1; }
includes=(-Icsrc -I"$python_include")
for p in "${torch_includes[@]}"; do includes+=(-I"$p"); done
if [ ! -f "${torch_includes[0]}/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    mkdir -p "$tmp/shim/c10/cuda/impl"
    echo '#pragma once' > "$tmp/shim/c10/cuda/impl/cuda_cmake_macros.h"
    includes+=(-I"$tmp/shim")
fi

mapfile -t cu_files < <(find csrc -name '*.cu' | sort)
# Host files with CUDA-only code: the bindings and the CUDA glue.
mapfile -t host_files < <(grep -rl --include='*.cpp' 'SPARSE_ATTN_WITH_CUDA' csrc | sort)

pids=() names=()
for f in "${cu_files[@]}"; do
    out="$tmp/$(echo "$f" | tr / _).o"
    "$NVCC" -arch="$ARCH" -std=c++17 -O3 --use_fast_math -DSPARSE_ATTN_WITH_CUDA "${includes[@]}" -c "$f" -o "$out" \
        > "$tmp/$(basename "$out").log" 2>&1 &
    pids+=($!) names+=("$f (nvcc $ARCH)")
done
for f in "${host_files[@]}"; do
    "$CXX" -std=c++17 -fsyntax-only -w -DSPARSE_ATTN_WITH_CUDA -DTORCH_EXTENSION_NAME=_C "${includes[@]}" \
        -I"$cuda_include" "$f" > "$tmp/$(echo "$f" | tr / _).log" 2>&1 &
    pids+=($!) names+=("$f ($CXX, CUDA build)")
done

failed=0
for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then
        echo "ok      ${names[$i]}"
    else
        echo "FAILED  ${names[$i]}"
        failed=1
    fi
done
if [ "$failed" = 1 ]; then
    for log in "$tmp"/*.log; do [ -s "$log" ] && { echo "--- $log"; cat "$log"; }; done
    exit 1
fi
echo "nvcc_check: ${#cu_files[@]} CUDA and ${#host_files[@]} host files compile"
