"""The Triton kernels compiled ahead of time for sm_80 (A100) and sm_90 (H100/H200), without a GPU, with the
resources of every configuration the dispatch can choose checked against each architecture's limits.

Configurations come from the kernels' own wrappers, so they follow the wrappers as those change: each wrapper is
called on small CPU tensors over the grid the dispatch reaches (head sizes 64, 96, 128, 256; fp16, bf16, fp32; the
block sizes plans use, 16 to 128; per kernel its selection modes, label bits, row counts, split counts), with every
``@triton.jit`` kernel of its module replaced by a recorder of the launch (arguments, constexprs, num_warps,
num_stages). A worker process with the interpreter off compiles each recorded launch with ``triton.compile`` for
``GPUTarget("cuda", 80 / 90, 32)``, specialising the arguments as the JIT does, and reads the cubin's registers and
stack and local memory with cuobjdump (Triton's bundled copy). A configuration fits when:

- its shared memory (Triton's total per block) is at most the per-block opt-in limit: 163 KiB on sm_80 (of the
  SM's 164 KiB), 227 KiB on sm_90;
- its registers are at most 255 per thread, and a block of num_warps warps (allocated per warp in units of 256
  registers) fits the SM's 64K registers.
A configuration that does not fit is a failure that names it. One whose shared memory is already over the limit once
lowered to LLVM IR stops there (a Triton stages hook): ptxas can take minutes on such kernels. Stack and local memory
(register spills) are printed (``pytest -s``), not checked.

The full grid compiles every distinct launch (about 1,500 per architecture, some of them a minute each: too slow for
CI). CI compiles the grid's upper corners: for each kernel, the launches are grouped by what changes the code
(argument element sizes, padded head size, the kernel's code variants, num_warps, num_stages; fp16 and bf16 share a
group, and so do head sizes padded to the same tile) and, per group, only the launches with the largest tiles are
compiled (those no other launch of the group matches or exceeds in every tile dimension).
Shared memory and registers grow with the tiles at fixed warps and stages, so these bound their group. Set
``SPARSE_ATTN_AOT_FULL=1`` for the full grid; a kernel missing from ``KERNEL_SHAPES`` is always compiled in full.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ARCHS = {80: {"smem": 163 * 1024}, 90: {"smem": 227 * 1024}}
REGISTERS_PER_SM = 64 * 1024
MAX_REGISTERS_PER_THREAD = 255
HEAD_DIMS = (64, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCKS = (16, 32, 64, 128)

# Per kernel: the constexprs that size its on-chip tiles, and those that change its code. The others only enter index
# arithmetic or masks (Q_BLOCK, CAUSAL, MEAN, NUM_SPLITS, ...) and do not separate configurations in the CI selection,
# where the first launch recorded with given tiles stands for the others (the enumerations below record the variant
# with the most code first, e.g. decode over a selection before dense decode, which reads no selection).
KERNEL_SHAPES = {
    "_block_sparse_attn_fwd": (("BLOCK_M", "BLOCK_N"), ("HEAD_DIM", "BLOCK_D")),
    "_decode_split_kernel": (("BLOCK_G", "BLOCK_N"), ("HEAD_DIM", "BLOCK_D")),
    "_merge_splits": (("BLOCK_S",), ("HEAD_DIM", "BLOCK_D")),
    "_label_scores_kernel": (("BLOCK_G", "BLOCK_N", "BLOCK_R"), ("BITS",)),
    "_pooled_block_probs": (("ROWS", "BLOCK_N"), ("HEAD_DIM", "BLOCK_D")),
}


# ---------------------------------------------------------------------------------------------- recording launches
def encode(value):
    """A launch argument as JSON: tensors by dtype (a fresh CPU tensor stands in, aligned as the JIT expects)."""
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot record a launch argument of type {type(value).__name__}")


def record_launches(monkeypatch, module, calls) -> list[dict]:
    """Run ``calls()`` (wrapper calls on CPU tensors) with every jitted kernel of ``module`` replaced by a recorder."""
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append({"module": module.__name__, "kernel": self.name, "args": [encode(a) for a in args],
                                 "kwargs": {k: encode(v) for k, v in kwargs.items()}})
            return launch

    import triton

    jit_types = tuple(t for t in (getattr(triton.runtime.jit, "JITFunction", None),
                                  getattr(triton.runtime.interpreter, "InterpretedFunction", None)) if t)
    kernels = [name for name, obj in vars(module).items() if isinstance(obj, jit_types)]
    assert kernels, f"{module.__name__} holds no jitted kernel"
    for name in kernels:
        monkeypatch.setattr(module, name, Recorder(name))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the wrappers' CPU-tensor check; nothing runs
    calls()
    return launches


def block_sparse_calls(tk):
    fwd = tk.block_sparse_attention.block_sparse_attention_fwd
    for dim, dtype, qb, kb, causal in itertools.product(HEAD_DIMS, DTYPES, BLOCKS, BLOCKS, (True, False)):
        tokens, heads, kv_heads = 256, 4, 2
        q = torch.zeros(tokens, heads, dim, dtype=dtype)
        k = torch.zeros(tokens, kv_heads, dim, dtype=dtype)
        cu = torch.tensor([0, tokens], dtype=torch.int32)
        nq, nk = tokens // qb, tokens // kb
        fwd(q, k, k, cu, cu, tokens, torch.ones(1, heads, nq, dtype=torch.int32),
            torch.zeros(1, heads, nq, nk, dtype=torch.int32), qb, kb, causal, dim ** -0.5)


def decode_calls(tk):
    fwd = tk.decode_attention.decode_attention_fwd
    batch, pages, page_size = 2, 8, 16
    for dim, dtype, group, splits in itertools.product(HEAD_DIMS, DTYPES, (1, 8), (1, 64)):
        kv_heads = 2
        q = torch.zeros(batch, kv_heads * group, dim, dtype=dtype)
        cache = torch.zeros(pages, page_size, kv_heads, dim, dtype=dtype)
        table = torch.zeros(batch, 4, dtype=torch.int32)
        seq_lens = torch.full((batch,), 60, dtype=torch.int32)
        selections = []
        for sel_block in (1, *BLOCKS):  # token ids (top-k) or block ids (block patterns), per KV group
            selections.append((torch.zeros(batch, kv_heads, 4, dtype=torch.int32),
                               torch.ones(batch, kv_heads, dtype=torch.int32), sel_block))
        selections.append((torch.zeros(batch, kv_heads * group, 4, dtype=torch.int32),  # per query head
                           torch.ones(batch, kv_heads * group, dtype=torch.int32), 1))
        selections.append((None, None, 1))  # dense
        for indices, counts, sel_block in selections:
            fwd(q, cache, cache, table, seq_lens, indices, counts, sel_block, dim ** -0.5, num_splits=splits)


def label_scores_calls(tk):
    fwd = tk.label_scores.label_scores_fwd
    batch, pages, page_size, kv_heads = 2, 8, 16, 2
    for r, bits, group, share, reduce_max in itertools.product((16, 32), (16, 8, 4), (1, 8), (True, False),
                                                               (True, False)):
        width, dtype = {16: (r, torch.float16), 8: (r, torch.int8), 4: (r // 2, torch.uint8)}[bits]
        labels = torch.zeros(pages, page_size, kv_heads, width, dtype=dtype)
        scales = None if bits == 16 else torch.zeros(pages, page_size, kv_heads, dtype=torch.float16)
        fwd(torch.zeros(batch, kv_heads * group, r), labels, scales, bits, torch.zeros(batch, 4, dtype=torch.int32),
            torch.full((batch,), 60, dtype=torch.int32), 64, 4, 4, share, reduce_max)


def pooled_probs_calls(tk):
    fwd = tk.proxy_scores.pooled_block_probs_fwd
    for dim, dtype, kb, rows, causal, mean in itertools.product(HEAD_DIMS, DTYPES, BLOCKS, BLOCKS, (True, False),
                                                                (True, False)):
        heads, kv_heads, nq, tokens = 4, 2, 2, 256
        q = torch.zeros(heads, nq, rows, dim, dtype=dtype)
        k = torch.zeros(tokens, kv_heads, dim, dtype=dtype)
        pos = torch.zeros(nq, rows, dtype=torch.int32)
        fwd(q, k, pos, kb, dim ** -0.5, causal, mean)


WRAPPERS = {
    "block_sparse_attention": block_sparse_calls,
    "decode_attention": decode_calls,
    "label_scores": label_scores_calls,
    "proxy_scores": pooled_probs_calls,
}


# ---------------------------------------------------------------------------------------------- selection
def constexprs(launch) -> dict:
    return {k: v["value"] for k, v in launch["kwargs"].items() if "value" in v}


def compile_key(launch) -> str:
    return json.dumps([launch["kernel"], launch["args"], launch["kwargs"]], sort_keys=True)


SAME_SIZE = {"float16": "16-bit float", "bfloat16": "16-bit float"}


def corners(launches: list[dict]) -> list[dict]:
    """The CI selection (module docstring): per group, the launches with maximal tiles."""
    chosen, groups = [], {}
    for launch in {compile_key(x): x for x in launches}.values():
        shape = KERNEL_SHAPES.get(launch["kernel"])
        if shape is None:
            chosen.append(launch)
            continue
        tiles, variant = shape
        c = constexprs(launch)
        # fp16 and bf16 tiles take the same registers and shared memory, and a head size padded to the same BLOCK_D
        # (96 -> 128) the same tiles: one launch stands for each such family.
        dtypes = tuple(SAME_SIZE.get(a.get("tensor"), a.get("tensor")) for a in launch["args"])
        group = (launch["kernel"], dtypes, tuple(c.get(n) for n in variant if n != "HEAD_DIM"),
                 c.get("num_warps"), c.get("num_stages"))
        groups.setdefault(group, []).append((tuple(c.get(n) or 0 for n in tiles), launch))
    for members in groups.values():
        sizes = {size for size, _ in members}
        for size in sorted(s for s in sizes if not any(t != s and all(a >= b for a, b in zip(t, s)) for t in sizes)):
            chosen.append(next(launch for s, launch in members if s == size))
    return chosen


# ---------------------------------------------------------------------------------------------- worker (no interpreter)
def describe(launch) -> str:
    c = constexprs(launch)
    dtypes = sorted({a["tensor"] for a in launch["args"] if "tensor" in a} - {"int32", "int64", "int8", "uint8"})
    keys = ", ".join(f"{k}={v}" for k, v in sorted(c.items()) if k not in ("debug",))
    return f"{launch['kernel']}[{'/'.join(dtypes) or '-'}; {keys}]"


class SharedMemoryExceeded(Exception):
    """Raised before PTX generation when the kernel's shared memory (known once lowered to LLVM IR) exceeds the
    architecture's limit: the configuration does not fit whatever its registers, and ptxas on such kernels is slow."""

    def __init__(self, shared: int):
        super().__init__(f"shared memory {shared} B")
        self.shared = shared


def shared_memory_gate(backend=None, stages=None, options=None, language=None, capability=None):
    """A Triton stages hook (knobs.runtime.add_stages_inspection_hook): called without arguments for its cache key,
    and with the pipeline to wrap its PTX stage in the shared-memory check."""
    if stages is None:
        return "aot-shared-memory-gate", "1"
    make_ptx = stages["ptx"]

    def ptx(src, metadata):
        if metadata["shared"] > ARCHS[capability]["smem"]:
            raise SharedMemoryExceeded(metadata["shared"])
        return make_ptx(src, metadata)

    stages["ptx"] = ptx


def compile_one(task: tuple[dict, int]) -> dict:
    """Compile one launch for one arch (in a worker, TRITON_INTERPRET=0); returns its resource row."""
    import importlib
    import re
    import shutil
    import tempfile

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    launch, arch = task
    knobs.runtime.add_stages_inspection_hook = shared_memory_gate
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    cuobjdump = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    assert cuobjdump, "cuobjdump not found (neither Triton's bundled copy nor on the PATH)"

    jit = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    args = [torch.empty(16, dtype=getattr(torch, a["tensor"])) if "tensor" in a else a["value"]
            for a in launch["args"]]
    kwargs = {k: v["value"] for k, v in launch["kwargs"].items()}
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    # The JIT's own specialisation (value 1 and divisibility by 16 of ints, pointer alignment) and option parsing.
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, consts, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    row = {"config": describe(launch), "arch": arch, "num_warps": options.num_warps}
    start = time.monotonic()
    try:
        kernel = triton.compile(ASTSource(jit, signature, consts, attrs), target=target, options=options.__dict__)
    except SharedMemoryExceeded as exc:
        return {**row, "shared": exc.shared, "registers": None}
    except Exception as exc:  # a configuration that does not compile is reported like one that does not fit
        return {**row, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    assert match, f"unexpected cuobjdump output: {usage}"
    regs, stack, static_smem, local = map(int, match.groups())
    return {**row, "registers": regs, "stack": stack, "local": local, "seconds": round(time.monotonic() - start, 1),
            "shared": max(kernel.metadata.shared, static_smem), "num_warps": kernel.metadata.num_warps}


def worker_main() -> None:
    """Compile the (launch, arch) pairs read from stdin on a pool of processes (each takes the next pair, so slow
    compilations do not hold up a fixed share); writes the rows to stdout."""
    import concurrent.futures
    import multiprocessing

    request = json.load(sys.stdin)
    tasks = [(launch, arch) for launch in request["launches"] for arch in request["archs"]]
    with concurrent.futures.ProcessPoolExecutor(request["workers"], mp_context=multiprocessing.get_context("spawn")) \
            as pool:
        json.dump(list(pool.map(compile_one, tasks)), sys.stdout)


# ---------------------------------------------------------------------------------------------- the test
def misfit(row) -> str | None:
    """Why a compiled configuration does not fit its architecture, or None."""
    if "error" in row:
        return f"does not compile: {row['error']}"
    limit = ARCHS[row["arch"]]["smem"]
    problems = []
    if row["shared"] > limit:
        problems.append(f"shared memory {row['shared']} B > {limit} B")
    if row.get("registers") is None:  # stopped before register allocation (shared memory already too large)
        return "; ".join(problems)
    if row["registers"] > MAX_REGISTERS_PER_THREAD:
        problems.append(f"{row['registers']} registers per thread > {MAX_REGISTERS_PER_THREAD}")
    per_warp = -(-row["registers"] * 32 // 256) * 256  # registers are allocated per warp in units of 256
    if per_warp * row["num_warps"] > REGISTERS_PER_SM:
        problems.append(f"{row['num_warps']} warps x {per_warp} registers > {REGISTERS_PER_SM} per SM")
    return "; ".join(problems) or None


def run_workers(launches: list[dict], archs: list[int], workers: int) -> list[dict]:
    """Compile in a worker process with the interpreter off (Triton decides at import), ``workers`` at a time."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, stated (silences Triton's warning)
    run = subprocess.run([sys.executable, __file__, "--worker"], input=json.dumps(
        {"launches": launches, "archs": archs, "workers": workers}), capture_output=True, text=True, env=env)
    assert run.returncode == 0, f"compile worker failed:\n{run.stderr[-4000:]}"
    return json.loads(run.stdout)


@pytest.mark.parametrize("module_name", list(WRAPPERS))
def test_triton_kernels_fit_sm80_and_sm90(module_name, monkeypatch):
    import sparse_attn.triton_kernels as tk

    module = getattr(tk, module_name, None) or __import__(f"sparse_attn.triton_kernels.{module_name}",
                                                          fromlist=["_"])
    launches = record_launches(monkeypatch, module, lambda: WRAPPERS[module_name](tk))
    full = os.environ.get("SPARSE_ATTN_AOT_FULL", "0") == "1"
    selected = list({compile_key(x): x for x in launches}.values()) if full else corners(launches)
    assert selected, f"the {module_name} wrapper launched nothing"
    rows = run_workers(selected, sorted(ARCHS), workers=min(2, os.cpu_count() or 1))
    assert len(rows) == len(selected) * len(ARCHS)
    for row in sorted(rows, key=lambda r: (r["arch"], r["config"])):  # shown with -s or on failure
        if "error" in row or row.get("registers") is None:
            usage = row.get("error") or f"{row['shared']} B shared (stopped before PTX)"
        else:
            spilled = row["stack"] + row["local"]
            usage = (f"{row['registers']} regs, {row['shared']} B shared, {spilled} B stack and local"
                     + (" (spills)" if spilled else "") + f", compiled in {row['seconds']} s")
        print(f"sm_{row['arch']} {row['config']}: {usage}")
    bad = [f"sm_{r['arch']} {r['config']}: {misfit(r)}" for r in rows if misfit(r)]
    assert not bad, f"{len(bad)} of {len(rows)} configurations do not fit:\n" + "\n".join(bad)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker_main()
