"""The C++ CPU ops choose their vector paths at run time (AVX-512 register tiles, expand-loads and bf16 / int16
products; AVX2 permutes; plain loops). SPARSE_ATTN_CPU_ISA caps the choice, so the paths of older CPUs run, and are
checked against the float64 references, on whatever x86 machine runs the suite: the op tests whose paths differ by
instruction set run again in a process with each cap."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_attn.ops.extension import cpu_kernel_available

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_cpu_attention.py", "tests/test_double_sparsity.py", "tests/test_vllm_core.py",
         "tests/test_head_proxy.py"]
# The kernels' tests (attention on varlen and paged inputs, pruned slots, decode selection, block scoring); the
# differentiable wrapper's and engine-facing tests do not depend on the instruction set.
SELECT = "not grad and (cpu or cpp or prun or slot or pages or reference or tall or gqa)"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the caps name x86 extensions")
@pytest.mark.skipif(not cpu_kernel_available(), reason="the C++ extension is not built")
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_op_tests_pass_on_the_paths_of_older_cpus(isa):
    # The pytest script, not `python -m pytest`: the repository root stays off sys.path (see scripts/test.sh).
    pytest_script = Path(sys.executable).with_name("pytest")
    command = [str(pytest_script)] if pytest_script.exists() else [sys.executable, "-m", "pytest"]
    env = dict(os.environ, SPARSE_ATTN_CPU_ISA=isa, OMP_NUM_THREADS="1")
    run = subprocess.run([*command, "-q", "-p", "no:cacheprovider", *TESTS, "-k", SELECT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    tail = run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) > 200, summary  # the selection still holds the op tests
