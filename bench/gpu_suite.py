"""One command for a GPU machine: build, check, benchmark, in under ``--budget`` seconds (default 9 minutes).

    python -m bench.gpu_suite --out DIR [--quick] [--budget 540] [--estimation-share 0.1] [--e2e-hf-share 0.2]
                              [--decode-share 0.3]

1. install: (re)install the package (editable, with its extension) when the checkout is not installed or csrc/
   changed since the last build; no network is needed (``--no-index --no-build-isolation --no-deps``);
2. correctness at real sizes: our kernel against a float32 PyTorch reference on query blocks sampled from a 64k
   problem (Dense, 10% and 30% masks, and a length that is not a multiple of the block), and against
   FlexAttention with the same mask;
3. decode correctness at real sizes: our decode ops on a ragged batch over shuffled pages against the float32
   oracle (dense decode, attention over a Double Sparsity selection, decode on a 70%-pruned compressed cache);
   then the CUDA kernels of csrc/cuda against the same kernels under the CPU emulation that CI tests
   (``sparse_attn._cuda_emu``, same inputs); then the vLLM backend's CUDA path, driven without vLLM
   (tests/test_vllm_core.py on the GPU);
4. the prefill benchmark (bench.prefill) with the machine's defaults, in its share of the time left;
5. the estimation overhead (bench.estimation: head-proxy and vertical-slash mask building vs dense attention), in
   its share;
6. end-to-end prefill in transformers (bench.e2e_hf: TTFT of an 8B-shaped model, sparse patterns vs SDPA), in its
   share;
7. the decode benchmark (bench.decode) with the machine's defaults, in the rest.

Shares divide the time left after the checks; a step that finishes early leaves its time to the later ones (each
step gets its share of what remains among the steps still to run). Writes ``DIR/suite.json`` and ``DIR/suite.md``
(steps, correctness), and each benchmark's ``DIR/<name>.json``/``.md``.
Without a GPU every step runs at the CPU sizes, so the suite itself is testable anywhere. Exit status 1 when a
correctness check fails or a step errors.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import common

NAME = "gpu_suite"
STAMP = common.REPO_ROOT / "build" / "bench_suite_csrc.sha256"  # hash of csrc/ at the last suite build
RESUME_ENV = "BENCH_SUITE_INSTALL_RECORD"

# Max abs error allowed against the float32 reference and FlexAttention, by input dtype (outputs are rounded
# to it; bf16 keeps 8 bits of mantissa, outputs of random inputs are mostly |x| < 4).
TOLERANCE = {"bf16": 2e-2, "fp16": 1e-2, "fp32": 2e-3}

CHECK_INSTALLED = r"""
import importlib.util, json
problems = []
try:
    import sparse_attn
    if importlib.util.find_spec("sparse_attn.triton_kernels") is None:
        problems.append("sparse_attn.triton_kernels is not mapped: the package is not installed")
except Exception as exc:
    problems.append(f"import sparse_attn failed: {exc}")
print(json.dumps(problems))
"""


# ---------------------------------------------------------------------------------------------------- install


def csrc_hash() -> str | None:
    sources = sorted(p for p in (common.REPO_ROOT / "csrc").rglob("*") if p.is_file())
    if not sources:
        return None
    digest = hashlib.sha256()
    for path in sources:
        digest.update(str(path.relative_to(common.REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def install_problems() -> list[str]:
    """Why the checkout needs a (re)install, asked of a fresh interpreter (this one may hold stale imports)."""
    run = subprocess.run([sys.executable, "-c", CHECK_INSTALLED], cwd=common.REPO_ROOT, capture_output=True, text=True)
    problems = json.loads(run.stdout) if run.returncode == 0 else [f"install check failed: {run.stderr[-500:]}"]
    digest = csrc_hash()
    if digest is not None and (not STAMP.exists() or STAMP.read_text().strip() != digest):
        problems.append("csrc/ changed since the last build (or was never built here)")
    return problems


def ensure_installed() -> dict:
    """Install when needed; returns the step record (what was wrong, the pip command, its tail, seconds)."""
    t0 = time.monotonic()
    problems = install_problems()
    record = {"name": "install", "problems": problems, "installed": False, "status": "ok"}
    if problems:
        command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps", "-e", "."]
        env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 4))
        run = subprocess.run(command, cwd=common.REPO_ROOT, capture_output=True, text=True, env=env)
        record.update(command=" ".join(command[1:]), installed=run.returncode == 0,
                      log_tail=(run.stdout + run.stderr)[-3000:])
        if run.returncode == 0:
            digest = csrc_hash()
            if digest is not None:
                STAMP.parent.mkdir(parents=True, exist_ok=True)
                STAMP.write_text(digest)
        else:
            record["status"] = "error"
    record["seconds"] = time.monotonic() - t0
    return record


def map_triton_kernels() -> str | None:
    """Where the package could not be installed, map triton_kernels/ to sparse_attn.triton_kernels in this
    process (what setup.py's package_dir does), so the GPU kernels still run. Returns a note, or None."""
    import sparse_attn

    name = "sparse_attn.triton_kernels"
    if importlib.util.find_spec(name) is not None:
        return None
    folder = common.REPO_ROOT / "triton_kernels"
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    sparse_attn.triton_kernels = module
    from sparse_attn.ops import attention

    attention.triton_kernels.cache_clear()
    return "package not installed: triton_kernels/ mapped into sparse_attn in this process"


# ---------------------------------------------------------------------------------------------------- correctness


def correctness(settings, *, context: int, cases: tuple[tuple[int, float], ...], q_blocks: int = 4) -> dict:
    """Our kernel against the float32 reference on sampled query blocks, and against FlexAttention (same mask),
    for each (context, density) case; records errors, the tolerance and whether both are within it."""
    from sparse_attn import block_sparse_attention

    from . import prefill

    device, dtype = torch.device(settings.device), common.parse_dtype(settings.dtype)
    tol = TOLERANCE[settings.dtype]
    scale = settings.head_dim ** -0.5
    checks, t0 = [], time.monotonic()
    for length, density in cases:
        g = torch.Generator(device=device).manual_seed(settings.seed + length)
        q, k, v = (torch.randn(1, length, h, settings.head_dim, generator=g, device=device, dtype=dtype).transpose(1, 2)
                   for h in (settings.heads, settings.kv_heads, settings.kv_heads))
        mask, pattern = prefill.mask_at_density(density, context=length, heads=settings.heads, block=settings.block,
                                                device=device, seed=settings.seed + length)
        row = dict(context=length, density_target=density, density=mask.density(), pattern=pattern, tolerance=tol)
        try:
            out = block_sparse_attention(q, k, v, mask, causal=True, scale=scale, backend=settings.backend)
            blocks = prefill.sample_q_blocks(mask.num_q_blocks, q_blocks, settings.seed)
            row["reference_q_blocks"] = blocks
            row["max_abs_err_vs_reference"] = prefill.reference_rows_error(out, q, k, v, mask, blocks, scale)
            if length == context and settings.flex != "off":  # one flex compile: the benchmark's 64k reuses it
                block_mask = prefill.flex_block_mask(mask, settings.heads, blocks_in_mask_mod=settings.flex == "eager")
                flex_out = prefill.flex_function(settings.flex)(q, k, v, block_mask=block_mask, scale=scale,
                                                                enable_gqa=settings.heads != settings.kv_heads)
                row["max_abs_err_vs_flex"] = float((out.float() - flex_out.float()).abs().max())
            errors = [row[key] for key in ("max_abs_err_vs_reference", "max_abs_err_vs_flex") if key in row]
            row["ok"] = all(e <= tol for e in errors)
        except Exception as exc:
            row.update(ok=False, error=common.error_reason(exc, limit=1000))
        checks.append(row)
        del q, k, v
        common.release_memory(device)
    return {"name": "correctness", "status": "ok" if all(c["ok"] for c in checks) else "failed",
            "checks": checks, "seconds": time.monotonic() - t0}


def decode_correctness(settings, *, context: int) -> dict:
    """Our decode ops against the float32 oracle on a ragged batch (``context``, ``context - 37``, about half, and
    a few pages) over shuffled pages: dense decode with the kernel's own split count and with one split, attention
    over a Double Sparsity selection (oracle on the same selection; the selection must hold each row's budget), and
    decode on a 70%-pruned compressed cache (oracle on its decompressed tokens). Output and lse errors are checked."""
    from sparse_attn.decode import decode_attention_reference, select_tokens, sparse_decode_attention
    from sparse_attn.decode.kv_pruning import KVPruningConfig, pruned_decode_attention

    from . import decode

    device, dtype = torch.device(settings.device), common.parse_dtype(settings.dtype)
    tol, scale, backend = TOLERANCE[settings.dtype], settings.head_dim ** -0.5, settings.backend
    lengths = [max(1, n) for n in (context, context - 37, context // 2 + 5, 3 * settings.page_size + 1)]
    checks, t0 = [], time.monotonic()

    def check(name: str, ours, oracle, **extra) -> None:
        """One row: ``ours()`` and ``oracle()`` return (out, lse); ``extra`` adds facts (``counts_ok`` must hold)."""
        row = dict(check=name, seq_lens=lengths, tolerance=tol, **extra)
        try:
            (out, lse), (ref_out, ref_lse) = ours(), oracle()
            finite = torch.isfinite(ref_lse)  # rows that read no token have lse -inf
            errors = (decode.max_abs_err(out, ref_out), decode.max_abs_err(lse[finite], ref_lse[finite]))
            row["max_abs_err_vs_reference"], row["max_abs_err_lse"] = errors
            row["ok"] = all(e is not None and e <= tol for e in errors) and row.get("counts_ok", True)
        except Exception as exc:
            row.update(ok=False, error=common.error_reason(exc, limit=1000))
        checks.append(row)

    try:
        inputs = decode.make_inputs(lengths, heads=settings.heads, kv_heads=settings.kv_heads,
                                    head_dim=settings.head_dim, dtype=dtype, device=device,
                                    page_size=settings.page_size, planted=settings.planted_channels,
                                    gain=settings.channel_gain, seed=settings.seed, shuffle_pages=True)
        dense = decode.dense_reference(inputs, scale)
        args = (inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_table, inputs.seq_lens)
        check("dense", lambda: sparse_decode_attention(*args, None, scale=scale, backend=backend), lambda: dense)
        check("dense, one split", lambda: sparse_decode_attention(*args, None, scale=scale, backend=backend,
                                                                  num_splits=1), lambda: dense)

        config = decode.ds_config(settings)
        channels = decode.calibrate(inputs, settings.r, settings.calibration_tokens, settings.seed)
        labels = decode.label_cache_for(inputs, channels, config)
        selection = select_tokens(inputs.q, labels, channels, inputs.block_table, inputs.seq_lens, config,
                                  backend=backend)
        counts = selection.kv_num_blocks[:, :, 0].long()
        budgets = config.token_budgets(inputs.seq_lens)
        check("Double Sparsity selection",
              lambda: sparse_decode_attention(*args, selection, scale=scale, backend=backend),
              lambda: decode_attention_reference(*args, selection, scale=scale, compute_dtype=torch.float32),
              tokens_read=counts[:, 0].tolist(), counts_ok=bool((counts == budgets[:, None]).all()))
        del labels, selection

        pruned = decode.pruned_cache_for(inputs, KVPruningConfig(sparsity=0.7))
        check("KV pruning 70%",
              lambda: pruned_decode_attention(inputs.q, pruned, scale=scale, backend=backend, return_lse=True),
              lambda: pruned_decode_attention(inputs.q, pruned, scale=scale, backend="reference", return_lse=True))
    except Exception as exc:  # inputs, calibration, labels or the pruned cache could not be built
        checks.append(dict(check="setup", seq_lens=lengths, tolerance=tol, ok=False,
                           error=common.error_reason(exc, limit=1000)))
    common.release_memory(device)
    return {"name": "decode correctness", "status": "ok" if all(c["ok"] for c in checks) else "failed",
            "impls": decode.DecodeRun(settings).impls, "checks": checks, "seconds": time.monotonic() - t0}


# ---------------------------------------------------------------------------------------------------- suite


def markdown(payload: dict) -> str:
    """Steps and correctness checks of one suite run."""
    steps = payload["steps"]
    lines = ["### GPU suite", "", common.environment_line(payload), "",
             common.markdown_table(["step", "status", "seconds"],
                                   [[s["name"], s["status"], common.fmt(s.get("seconds"))] for s in steps])]
    for step in steps:
        if step["name"] == "correctness":
            rows = [[c["context"], f"{c['density_target']:.0%} → {c['density']:.1%}", c["pattern"],
                     common.fmt(c.get("max_abs_err_vs_reference"), 2), common.fmt(c.get("max_abs_err_vs_flex"), 2),
                     common.fmt(c["tolerance"]), "yes" if c["ok"] else f"**no** {c.get('error', '')}"] for c in step["checks"]]
            lines += ["", "Correctness: sparse-attn vs float32 reference (sampled query blocks) and FlexAttention:", "",
                      common.markdown_table(["context", "density", "mask", "err vs ref", "err vs Flex", "tolerance", "ok"], rows)]
        if step["name"] == "decode correctness":
            rows = [[c["check"], ", ".join(map(str, c["seq_lens"])), common.fmt(c.get("max_abs_err_vs_reference"), 2),
                     common.fmt(c.get("max_abs_err_lse"), 2), common.fmt(c["tolerance"]),
                     "yes" if c["ok"] else f"**no** {c.get('error', '')}"] for c in step["checks"]]
            impls = ", ".join(f"{k}: {v}" for k, v in step.get("impls", {}).items())
            lines += ["", f"Decode correctness vs float32 reference, shuffled pages ({impls}):", "",
                      common.markdown_table(["check", "seq_lens", "err out", "err lse", "tolerance", "ok"], rows)]
        if step["name"] == EMULATION_STEP and step.get("checks"):
            rows = [[c["check"], common.fmt(c.get("max_abs_diff"), 2), common.fmt(c.get("tolerance")),
                     "yes" if c["ok"] else f"**no** {c.get('error', '')}"] for c in step["checks"]]
            lines += ["", "CUDA kernels on the GPU vs the same kernels under the CPU emulation (same inputs):", "",
                      common.markdown_table(["check", "max abs diff", "tolerance", "ok"], rows)]
    return "\n".join(lines)


EMULATION_STEP = "CUDA kernels vs CPU emulation"
# Max abs difference between the GPU's results and the emulation's: the same algorithm in the same order, apart from
# the GPU's approximate __expf and nvcc's fused multiply-adds; outputs are rounded to their dtype.
EMULATION_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def emulation_check(gpu: bool) -> dict:
    """The CUDA kernels of csrc/cuda on the GPU against the same kernels run by the CPU emulation harness
    (``sparse_attn._cuda_emu``, what CI tests) on the same inputs: top-k must select the same tokens (with ties and
    rows longer than a block), compressed decode must agree to rounding in every dtype (GQA, partial tiles, split
    merges, the GPU's own split count)."""
    start = time.monotonic()

    def done(status: str, **extra) -> dict:
        return {"name": EMULATION_STEP, "status": status, "seconds": time.monotonic() - start, **extra}

    if not gpu:
        return done("skipped", note="no GPU (CI runs the emulation against references)")
    try:
        emu = importlib.import_module("sparse_attn._cuda_emu")
        ext = importlib.import_module("sparse_attn._C")
    except ImportError as exc:
        return done("skipped", note=f"extension missing: {exc}")
    if not getattr(ext, "with_cuda", False):
        return done("skipped", note="sparse_attn._C was built without CUDA kernels")
    from sparse_attn.decode.compressed import compress_kv, keep_count

    checks = []
    g = torch.Generator().manual_seed(0)
    try:
        scores = torch.randint(-40, 40, (2, 4, 3000), generator=g).float() / 8  # many ties at the threshold
        lengths = torch.tensor([3000, 1777], dtype=torch.int32)
        gpu_out = ext.topk_tokens(scores.cuda(), lengths.cuda(), 256, 16, 64, None)
        emu_out = emu.topk_tokens(scores, lengths, 256, 16, 64, None)
        same = all(torch.equal(a.cpu(), b) for a, b in zip(gpu_out, emu_out))
        checks.append({"check": "topk_tokens", "max_abs_diff": 0.0 if same else None, "tolerance": 0.0, "ok": same})
    except Exception as exc:
        checks.append({"check": "topk_tokens", "ok": False, "error": common.error_reason(exc, limit=1000)})

    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        name = f"compressed decode {str(dtype).removeprefix('torch.')}"
        try:
            batch, kv_heads, group, dim, window = 2, 2, 4, 100, 16
            comp, recent = [300, 170], [9, 16]
            k = torch.randn(batch, kv_heads, max(comp), dim, generator=g).to(dtype)
            v = torch.randn(batch, kv_heads, max(comp), dim, generator=g).to(dtype)
            c = compress_kv(k, v, torch.tensor(comp, dtype=torch.int32), k_keep=keep_count(dim, 0.7),
                            v_keep=keep_count(dim, 0.5))
            q = torch.randn(batch, kv_heads * group, dim, generator=g).to(dtype)
            k_rec = torch.randn(batch, kv_heads, window, dim, generator=g).to(dtype)
            v_rec = torch.randn(batch, kv_heads, window, dim, generator=g).to(dtype)
            args = [q, c.k_bitmaps, c.k_values, c.k_keep, c.v_bitmaps, c.v_values, c.v_keep, c.offsets, c.lengths,
                    k_rec, v_rec, torch.tensor(recent, dtype=torch.int32), dim ** -0.5, max(comp) + window]
            on_gpu = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
            gpu_o, gpu_lse = ext.compressed_decode_attention(*on_gpu)
            emu_o, emu_lse, splits = emu.compressed_decode_attention(*args, sms)
            diff = max(float((gpu_o.cpu().float() - emu_o.float()).abs().max()),
                       float((gpu_lse.cpu() - emu_lse).abs().max()))
            checks.append({"check": name, "splits": splits, "max_abs_diff": diff,
                           "tolerance": EMULATION_TOLERANCE[dtype], "ok": diff <= EMULATION_TOLERANCE[dtype]})
        except Exception as exc:
            checks.append({"check": name, "ok": False, "error": common.error_reason(exc, limit=1000)})
    return done("ok" if all(c["ok"] for c in checks) else "failed", checks=checks)


def vllm_core_check(gpu: bool) -> dict:
    """The vLLM backend's CUDA path without vLLM: tests/test_vllm_core.py drives the backend's vLLM-free core with
    vLLM-shaped pages, block tables and slot mappings (mixed decode / prefill / chunked rows) on the GPU, Triton
    compiled, against the float64 reference. Without a GPU the test suite runs the same file on the CPU."""
    start = time.monotonic()
    if not gpu:
        return {"name": "vllm core on the GPU", "status": "skipped", "note": "no GPU (CI runs it on the CPU)",
                "seconds": 0.0}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_vllm_core.py", "-q", "-p", "no:cacheprovider"],
        cwd=common.REPO_ROOT, env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True,
    )
    tail = (run.stdout + run.stderr).strip().splitlines()[-15:]
    return {"name": "vllm core on the GPU", "status": "ok" if run.returncode == 0 else "failed",
            "note": tail[-1] if tail else "", "output_tail": tail, "seconds": time.monotonic() - start}


def benchmark_step(bench, settings, out: Path, command: str) -> dict:
    """Run a benchmark module (bench.prefill, bench.decode, ...) into ``out``; the step record with its targets."""
    t0 = time.monotonic()
    try:
        payload = bench.run(settings, out, command)
    except Exception as exc:
        return {"name": bench.NAME, "status": "error", "error": common.error_reason(exc, 2000),
                "seconds": time.monotonic() - t0, "time_budget_s": settings.time_budget_s}
    skipped = sum(r["status"] == "skipped" and r.get("reason") == "time budget exhausted" for r in payload["results"])
    return {"name": bench.NAME, "status": "ok", "seconds": time.monotonic() - t0, "cells_skipped_for_time": skipped,
            "time_budget_s": settings.time_budget_s, "targets": payload.get("targets", [])}


def share_of_rest(budget: float, start: float, shares: list[float], reserve: float = 60.0) -> float:
    """Seconds for the next step: its share (``shares[0]``) of the time left, among the steps still to run
    (``shares``); ``reserve`` seconds stay for the cell in flight and the writing."""
    left = budget - (time.monotonic() - start) - reserve
    total = sum(shares)
    return max(0.0, left * shares[0] / total) if total > 0 else max(0.0, left)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="fewer timed calls in the benchmark")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole suite")
    parser.add_argument("--skip-install", action="store_true")
    parser.add_argument("--prefill-args", default="", help='extra bench.prefill options, e.g. "--contexts 65536"')
    parser.add_argument("--decode-args", default="", help='extra bench.decode options, e.g. "--batches 8"')
    parser.add_argument("--estimation-args", default="", help='extra bench.estimation options')
    parser.add_argument("--e2e-hf-args", default="", help='extra bench.e2e_hf options, e.g. "--layers 2"')
    parser.add_argument("--estimation-share", type=float, default=0.1,
                        help="fraction of the benchmark time (after the checks) for the estimation overhead")
    parser.add_argument("--e2e-hf-share", type=float, default=0.2,
                        help="fraction of the benchmark time (after the checks) for end-to-end transformers TTFT")
    parser.add_argument("--decode-share", type=float, default=0.3,
                        help="fraction of the benchmark time (after the checks) for the decode benchmark; the "
                             "prefill benchmark gets what the other shares leave")
    args = parser.parse_args(argv)
    shares = {"estimation": args.estimation_share, "e2e_hf": args.e2e_hf_share, "decode": args.decode_share}
    if any(not 0 <= v < 1 for v in shares.values()) or sum(shares.values()) >= 1:
        parser.error(f"shares must lie in [0, 1) and leave some time to prefill, got {shares}")
    shares = {"prefill": 1.0 - sum(shares.values()), **shares}
    start = time.monotonic()
    command = common.command_line("bench.gpu_suite", argv)
    args.out.mkdir(parents=True, exist_ok=True)

    steps = []
    if os.environ.get(RESUME_ENV):  # this process was re-executed after installing
        record_path = Path(os.environ.pop(RESUME_ENV))
        record = json.loads(record_path.read_text())
        record_path.unlink()
        start -= record["seconds"]
        steps.append(record)
    elif not args.skip_install:
        record = ensure_installed()
        steps.append(record)
        if record["installed"]:
            # A fresh interpreter sees the new install (its path hooks load at start-up): continue there.
            path = args.out / "install_record.json"
            path.write_text(json.dumps(record))
            os.environ[RESUME_ENV] = str(path)
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, [sys.executable, "-m", "bench.gpu_suite", *argv])
    note = map_triton_kernels()
    if note:
        steps.append({"name": "map triton_kernels", "status": "ok", "note": note, "seconds": 0.0})

    from . import decode, e2e_hf, estimation, prefill  # import sparse_attn: after the install

    # Pages of 16 tokens (vLLM's block size on GPUs): the paged read is timed beside the contiguous one.
    prefill_argv = (["--out", str(args.out), "--page-size", "16"] + (["--quick"] if args.quick else [])
                    + shlex.split(args.prefill_args))
    settings, _ = prefill.settings_from_args(prefill_argv)
    gpu = settings.device == "cuda"
    context = 65536 if gpu else settings.contexts[-1]
    ragged = context - 37  # a length that is not a multiple of the block: a partial last block
    cases = ((context, 1.0), (context, 0.1), (context, 0.3), (ragged, 0.1))
    steps.append(correctness(settings, context=context, cases=cases))
    decode_argv = ["--out", str(args.out)] + (["--quick"] if args.quick else []) + shlex.split(args.decode_args)
    decode_settings, _ = decode.settings_from_args(decode_argv)
    steps.append(decode_correctness(decode_settings, context=min(max(decode_settings.contexts), 32768)))
    steps.append(emulation_check(gpu))
    steps.append(vllm_core_check(gpu))

    quick = ["--quick"] if args.quick else []
    estimation_settings, _ = estimation.settings_from_args(["--out", str(args.out)] + quick
                                                           + shlex.split(args.estimation_args))
    # Without a GPU the tiny CPU model runs (the benchmark alone would record a skip), so the suite tests anywhere.
    hf_argv = ["--out", str(args.out)] + ([] if gpu else ["--device", "cpu"]) + quick + shlex.split(args.e2e_hf_args)
    hf_settings, _, _ = e2e_hf.settings_from_args(hf_argv)
    order = [("prefill", prefill, settings), ("estimation", estimation, estimation_settings),
             ("e2e_hf", e2e_hf, hf_settings), ("decode", decode, decode_settings)]
    for i, (name, bench, bench_settings) in enumerate(order):
        bench_settings.time_budget_s = share_of_rest(args.budget, start, [shares[n] for n, _, _ in order[i:]])
        steps.append(benchmark_step(bench, bench_settings, args.out, command))

    payload = {"benchmark": NAME, **common.environment(torch.device(settings.device), command), "steps": steps,
               "seconds": time.monotonic() - start}
    payload["ok"] = all(s["status"] in ("ok", "skipped") for s in steps)
    common.write_json(args.out / "suite.json", payload)
    (args.out / "suite.md").write_text(markdown(payload) + "\n")
    print(markdown(payload))
    for name in ("prefill", "estimation", "e2e_hf", "decode"):
        if (args.out / f"{name}.md").exists():
            print("\n" + (args.out / f"{name}.md").read_text())
    print(f"suite {'passed' if payload['ok'] else 'FAILED'} in {payload['seconds']:.0f} s; results in {args.out}")
    return 0 if payload["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
