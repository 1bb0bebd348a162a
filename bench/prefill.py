"""Prefill kernel benchmark: sparse-attn's block-sparse attention against dense torch SDPA (every backend that runs)
and FlexAttention with the same block mask, measured side by side in one run.

    python -m bench.prefill --out DIR [--contexts 4096,16384,65536,131072] [--densities 0.05,0.1,0.3,1.0]
                            [--heads 32 --kv-heads 8 --head-dim 128 --dtype bf16 --block 128] [--quick]
                            [--compare-blocks 32,64] [--page-size 16]

writes ``DIR/prefill.json`` and ``DIR/prefill.md``. Without a GPU the defaults shrink to seconds-long CPU sizes.

Masks at a target density come from the project's patterns (random-score TopKBlocks, or AShape) with the integer
parameter searched so the causal block density (``BlockSparseMask.density()``) is closest to the target; 100% is the
Dense() pattern through the same kernel. FlexAttention gets that very mask, converted to a BlockMask whose blocks
below the diagonal are "full" (no mask_mod call) and whose diagonal blocks apply causality, as FlexAttention's own
create_block_mask would make them. Every cell also records our output's max abs error against FlexAttention and
against a float32 reference on sampled query blocks.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from sparse_attn import AShape, BlockSparseMask, Dense, TopKBlocks, block_sparse_attention
from sparse_attn.masks import num_blocks
from sparse_attn.ops import resolve_backend
from sparse_attn.ops.dense import flash_attn_func
from sparse_attn.ops.reference import attention_reference_varlen

from . import common

NAME = "prefill"

GPU_DEFAULTS = dict(contexts=[4096, 16384, 65536, 131072], densities=[0.05, 0.1, 0.3, 1.0],
                    heads=32, kv_heads=8, head_dim=128, dtype="bf16", block=128)
CPU_DEFAULTS = dict(contexts=[256, 512], densities=[0.05, 0.1, 0.3, 1.0],
                    heads=4, kv_heads=2, head_dim=64, dtype="fp32", block=32)

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
PATTERNS = ("topk", "ashape")

# The METHODS.md bars, checked at 64k when the run matches their configuration (one GPU, bf16, d=128, 32/8 heads).
TARGET_CONFIG = dict(dtype="bf16", heads=32, kv_heads=8, head_dim=128)
TARGET_CONTEXT = 65536
TARGETS = (
    ("dense: sparse-attn vs fastest SDPA", 1.0, "speedup_vs_sdpa", 0.9),
    ("10% density: speedup vs dense SDPA", 0.1, "speedup_vs_sdpa", 8.5),
    ("10% density: speedup vs FlexAttention, same mask", 0.1, "speedup_vs_flex", 1.3),
)


@dataclass
class Settings:
    contexts: list[int]
    densities: list[float]
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    block: int
    device: str
    pattern: str = "topk"
    flex: str = "compile"  # compile | eager | off
    backend: str | None = None  # sparse-attn backend; None = auto
    quick: bool = False
    seed: int = 0
    batch: int = 1
    time_budget_s: float | None = None
    reference_blocks: int = 2
    page_size: int = 0  # > 0: also time our kernel reading K/V from shuffled pages of this size (a paged KV cache)
    compare_blocks: list[int] = field(default_factory=list)  # also time our kernel at these block sizes, same density
    table: str | None = None  # the README table the result fills (default: "prefill")
    timing: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if self.flex not in ("compile", "eager", "off"):
            raise ValueError(f"flex must be compile, eager or off, got {self.flex!r}")
        if any(not 0 < d <= 1 for d in self.densities):
            raise ValueError(f"densities must lie in (0, 1], got {self.densities}")
        if self.compare_blocks and (len(set(self.compare_blocks)) < 2 or any(b < 1 for b in self.compare_blocks)):
            raise ValueError(f"compare_blocks needs at least two distinct positive block sizes, got "
                             f"{self.compare_blocks}")
        common.parse_dtype(self.dtype)
        if not self.timing:
            # Warmup covers compilation and autotuning; the timed calls fill about target_s each.
            if self.quick:
                self.timing = dict(warmup=1, min_iters=2, max_iters=3, target_s=0.05)
            elif self.device == "cpu":  # CPU numbers only show the code runs; keep them seconds-long
                self.timing = dict(warmup=1, min_iters=3, max_iters=10, target_s=0.2)
            else:
                self.timing = dict(warmup=2, min_iters=3, max_iters=20, target_s=0.5)


# ---------------------------------------------------------------------------------------------------- masks


def _closest_param(density_of, target: float, lo: int, hi: int) -> int:
    """The integer in [lo, hi] whose density is closest to ``target``, for a density non-decreasing in it."""
    first = lo
    while lo < hi:  # smallest parameter reaching the target
        mid = (lo + hi) // 2
        if density_of(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    candidates = [lo] + ([lo - 1] if lo > first else [])
    return min(candidates, key=lambda p: abs(density_of(p) - target))


def mask_at_density(target: float, *, context: int, heads: int, block: int, pattern: str = "topk",
                    device: torch.device | str = "cpu", seed: int = 0) -> tuple[BlockSparseMask, str]:
    """A causal ``context x context`` mask whose density is as close to ``target`` as the pattern allows, and a
    description of the pattern. Density 1 is Dense(); TopKBlocks draws random per-head block scores (scattered
    blocks, what a content-aware estimator produces); AShape keeps one sink block and a local window."""
    shape = dict(q_lens=context, kv_lens=context, q_block_size=block, kv_block_size=block, causal=True, device=device)
    if target >= 1.0:
        return Dense().build_mask(num_heads=1, **shape), "Dense()"
    n = num_blocks(context, block)
    if pattern == "topk":
        generator = torch.Generator(device=device).manual_seed(seed)
        scores = torch.rand(heads, n, n, generator=generator, device=device)
        make = lambda p, h: TopKBlocks(k=p, scores=scores[:h])  # noqa: E731
        describe = lambda p: f"TopKBlocks(k={p}, random scores per head)"  # noqa: E731
    else:
        make = lambda p, h: AShape(sink_tokens=block, local_tokens=p * block)  # noqa: E731
        describe = lambda p: f"AShape(sink_tokens={block}, local_tokens={p * block})"  # noqa: E731
    # The density of both patterns depends on the parameter only (not on scores or head), so search one head.
    cache: dict[int, float] = {}

    def density_of(p: int) -> float:
        if p not in cache:
            cache[p] = make(p, 1).build_mask(num_heads=1, **shape).density()
        return cache[p]

    param = _closest_param(density_of, target, 1, n)
    return make(param, heads).build_mask(num_heads=heads, **shape), describe(param)


def attended_pairs(mask: BlockSparseMask, heads: int, causal: bool = True) -> tuple[int, int]:
    """(kept, dense) (query, key) pairs summed over batch and heads: the pairs inside the mask's blocks that
    causality allows, and every causally allowed pair. Attention costs 4 * head_dim FLOPs per pair (QK^T and PV)."""
    bq, bk, device = mask.q_block_size, mask.kv_block_size, mask.device
    nq, nk, offset = mask.num_q_blocks, mask.num_kv_blocks, mask.kv_len - mask.q_len
    key_start = torch.arange(nk, device=device, dtype=torch.int64) * bk
    keys_in_block = torch.clamp(mask.kv_len - key_start, max=bk)
    block_start = torch.arange(nq, device=device, dtype=torch.int64) * bq
    pairs = torch.zeros(nq, nk, dtype=torch.int64, device=device)  # allowed pairs per (query block, kv block)
    for r in range(bq):
        row = block_start + r
        visible = torch.clamp(row[:, None] + offset + 1 - key_start[None, :], min=0) if causal else keys_in_block[None, :]
        visible = torch.minimum(visible, keys_in_block[None, :])
        pairs += torch.where((row < mask.q_len)[:, None], visible, 0)
    kept_blocks = mask.to_block_bool().sum((0, 1), dtype=torch.int64) * (heads // mask.heads)
    return int((kept_blocks * pairs).sum()), int(pairs.sum()) * heads * mask.batch


# ---------------------------------------------------------------------------------------------------- baselines


def flex_block_mask(mask: BlockSparseMask, heads: int, causal: bool = True, blocks_in_mask_mod: bool = False):
    """The same blocks as a FlexAttention BlockMask, expanded per head (every mask of a context then has one
    shape and one compiled kernel). Blocks wholly below the diagonal are "full" (no mask_mod call); the others
    apply ``mask_mod``: the causal rule, with queries at the end of the context.

    Compiled FlexAttention reads only the listed blocks, so causality is all ``mask_mod`` needs there. Eager
    FlexAttention ignores the block lists and applies ``mask_mod`` to every pair: ``blocks_in_mask_mod`` adds a
    lookup of the block matrix to it so eager results mean the same mask."""
    from torch.nn.attention.flex_attention import BlockMask

    keep = mask.expand(mask.batch, heads).to_block_bool()  # [B, H, nq, nk]
    bq, bk, device = mask.q_block_size, mask.kv_block_size, mask.device
    offset = mask.kv_len - mask.q_len
    first_row = torch.arange(mask.num_q_blocks, device=device) * bq + offset
    key_end = (torch.arange(mask.num_kv_blocks, device=device) + 1) * bk  # one past each block's last key
    full = keep & (key_end <= mask.kv_len)[None, :]  # blocks cut by the sequence end stay partial
    if causal:
        full &= key_end[None, :] <= first_row[:, None] + 1

    def ordered(blocks: torch.Tensor):  # flex wants indices over every kv block, kept ones first
        order = torch.sort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).indices
        return blocks.sum(-1, dtype=torch.int32), order.to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = q_idx + offset >= kv_idx if causal else q_idx >= 0
        return allowed & keep[b, h, q_idx // bq, kv_idx // bk] if blocks_in_mask_mod else allowed

    return BlockMask.from_kv_blocks(
        *ordered(keep & ~full), *ordered(full), BLOCK_SIZE=(bq, bk), mask_mod=mask_mod,
        seq_lengths=(mask.q_len, mask.kv_len),
    )


_flex_functions: dict[str, object] = {}


def flex_function(mode: str):
    """flex_attention, compiled once per process (``dynamic=False``: one kernel per context length)."""
    if mode not in _flex_functions:
        from torch.nn.attention.flex_attention import flex_attention

        if mode == "compile":
            import torch._dynamo

            for limit in ("cache_size_limit", "recompile_limit"):  # one compile per context, and other callers
                if hasattr(torch._dynamo.config, limit):
                    setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
            _flex_functions[mode] = torch.compile(flex_attention, dynamic=False)
        else:
            def eager(*args, **kwargs):  # the mode is recorded in the results; its performance warning is noise
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                    return flex_attention(*args, **kwargs)

            _flex_functions[mode] = eager
    return _flex_functions[mode]


def sdpa_function(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  causal: bool = True):
    """A callable running SDPA with exactly one backend, and how GQA reaches it: the backend's own ``enable_gqa``,
    else KV heads repeated to the query heads beforehand (outside the timed call). Causal unless ``causal=False``
    (a decode query reads its whole cache). Raises RuntimeError with the backend's reasons when it cannot run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = getattr(SDPBackend, SDPA_BACKENDS[backend])
    group = q.shape[1] // k.shape[1]

    def call(keys, values, gqa):
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(q, keys, values, is_causal=causal, scale=scale, enable_gqa=gqa)

    attempts = [("enable_gqa", k, v, True)] if group > 1 else [("none", k, v, False)]
    if group > 1:
        attempts.append(("repeat_kv", None, None, False))
    reasons: list[str] = []
    for mode, keys, values, gqa in attempts:
        if keys is None:
            keys, values = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                call(keys, values, gqa)
            except RuntimeError as exc:
                # CUDA SDPA says why in warnings ("... not used because ..."); the exception only says it gave up.
                why = [" ".join(str(w.message).split()) for w in caught if "not used because" in str(w.message)]
                for reason in why or [common.error_reason(exc)]:
                    if reason not in reasons:
                        reasons.append(reason)
                continue
        return (lambda: call(keys, values, gqa)), mode
    raise RuntimeError("; ".join(reasons))


def sdpa_extra_bytes(backend: str, heads: int, kv_heads: int, context: int, head_dim: int, elem: int) -> int:
    """Memory SDPA needs beyond q/k/v/out: repeated KV when GQA is not native, and the math backend's
    materialized score and probability matrices (fp32, [H, S, S])."""
    repeated = 2 * heads * context * head_dim * elem if heads != kv_heads else 0
    scores = 2 * heads * context * context * 4 if backend == "math" else 0
    return repeated + scores


def reference_rows_error(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: BlockSparseMask, q_blocks: list[int], scale: float, causal: bool = True) -> float:
    """Max abs error of ``out`` (padded ``[1, H, S, D]``) against the float32 reference on the listed query blocks.

    Query block i is its own problem: its rows are the last rows of the context cut after its last row, and
    reads the mask's row i (a one-block mask), so no token mask of the whole context is ever built."""
    tokens = [t[0].transpose(0, 1) for t in (out, q, k, v)]  # [S, H, D]
    out_t, q_t, k_t, v_t = tokens
    offset = mask.kv_len - mask.q_len
    worst = 0.0
    for i in q_blocks:
        r0, r1 = i * mask.q_block_size, min((i + 1) * mask.q_block_size, mask.q_len)
        key_end = offset + r1 if causal else mask.kv_len
        row_mask = BlockSparseMask(mask.kv_num_blocks[:, :, i : i + 1], mask.kv_indices[:, :, i : i + 1],
                                   mask.q_block_size, mask.kv_block_size, r1 - r0, key_end)
        ref, _ = attention_reference_varlen(q_t[r0:r1], k_t[:key_end], v_t[:key_end], [0, r1 - r0], [0, key_end],
                                            row_mask, causal, scale, compute_dtype=torch.float32)
        worst = max(worst, float((out_t[r0:r1].float() - ref).abs().max()))
    return worst


def sample_q_blocks(num_q_blocks: int, count: int, seed: int) -> list[int]:
    """The last query block (it reads the most keys) and ``count - 1`` others drawn at random."""
    rest = list(range(num_q_blocks - 1))
    return sorted(random.Random(seed).sample(rest, min(count - 1, len(rest))) + [num_q_blocks - 1])


def reference_bytes(heads: int, context: int, head_dim: int, block: int) -> int:
    """Peak of the float32 reference on one query block: repeated K/V and a few [H, block, S] score tensors."""
    return 2 * heads * context * head_dim * 4 + 4 * heads * block * context * 4


# ---------------------------------------------------------------------------------------------------- running


def tflops(pairs: int, head_dim: int, ms: float | None) -> float | None:
    return None if ms is None else 4 * head_dim * pairs / (ms * 1e-3) / 1e12


class PrefillRun:
    """Runs the grid for one Settings; results are plain dict rows (see the README for the schema)."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.device = torch.device(settings.device)
        self.dtype = common.parse_dtype(settings.dtype)
        self.scale = settings.head_dim ** -0.5
        self.deadline = None if settings.time_budget_s is None else time.monotonic() + settings.time_budget_s
        self.impl = None
        self.results: list[dict] = []

    # -------------------------------------------------------------- helpers
    def _skip_reason(self, need_bytes: int = 0) -> str | None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            return "time budget exhausted"
        return common.memory_shortfall(self.device, need_bytes) if need_bytes else None

    def _measure(self, row: dict, fn) -> dict:
        """Time ``fn`` into ``row``, or mark the row skipped with the reason (time budget, an error)."""
        reason = self._skip_reason()
        if reason is None:
            try:
                row.update(status="ok", **common.time_fn(fn, self.device, **self.s.timing).as_dict())
            except Exception as exc:  # a baseline that cannot run here is a result, not a crash
                reason = common.error_reason(exc)
        if reason is not None:
            return self._skip(row, reason)
        self.results.append(row)
        return row

    def _skip(self, row: dict, reason: str) -> dict:
        row.update(status="skipped", reason=reason, ms=None)
        common.release_memory(self.device)
        self.results.append(row)
        return row

    def _inputs(self, context: int):
        g = torch.Generator(device=self.device).manual_seed(self.s.seed + context)
        s = self.s

        def randn(h):  # [B, H, S, D] views of [B, S, H, D] storage: the layout q/k/v projections produce
            x = torch.randn(s.batch, context, h, s.head_dim, generator=g, device=self.device, dtype=self.dtype)
            return x.transpose(1, 2)

        return randn(s.heads), randn(s.kv_heads), randn(s.kv_heads)

    # -------------------------------------------------------------- per context
    def dense_baselines(self, context: int, q, k, v, dense_pairs: int) -> dict:
        """Time every SDPA backend (and flash-attn when installed); returns the fastest SDPA row's numbers."""
        s, elem = self.s, q.element_size()
        for backend in SDPA_BACKENDS:
            row = dict(context=context, method="sdpa", impl=backend, density_target=1.0, density=1.0)
            need = sdpa_extra_bytes(backend, s.heads, s.kv_heads, context, s.head_dim, elem)
            reason = self._skip_reason(need)
            if reason is None:
                try:
                    fn, row["gqa"] = sdpa_function(backend, q, k, v, self.scale)
                except RuntimeError as exc:
                    reason = str(exc)[:600]
            if reason is not None:
                self._skip(row, reason)
                continue
            self._measure(row, fn)
            fn = None
        fa = flash_attn_func()
        row = dict(context=context, method="flash_attn", impl="flash_attn", density_target=1.0, density=1.0)
        if fa is None or self.device.type != "cuda" or self.dtype == torch.float32:
            self._skip(row, "flash-attn is not installed" if fa is None else "needs fp16/bf16 CUDA tensors")
        else:
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            self._measure(row, lambda: fa(qt, kt, vt, softmax_scale=self.scale, causal=True))
        dense_rows = [r for r in self.results if r["context"] == context and r["density_target"] == 1.0
                      and r["method"] in ("sdpa", "flash_attn")]
        for r in dense_rows:
            r["tflops_effective"] = r["tflops_actual"] = tflops(dense_pairs, s.head_dim, r["ms"])
        timed = [r for r in dense_rows if r["method"] == "sdpa" and r["ms"] is not None]
        best = min(timed, key=lambda r: r["ms"]) if timed else None
        return {"impl": best["impl"], "ms": best["ms"]} if best else {"impl": None, "ms": None}

    def cell(self, context: int, target: float, q, k, v, sdpa_best: dict, dense_out) -> None:
        """One (context, density): our kernel and FlexAttention on the same mask, errors and speedups."""
        s = self.s
        mask, pattern = mask_at_density(target, context=context, heads=s.heads, block=s.block, pattern=s.pattern,
                                        device=self.device, seed=s.seed + context)
        kept, dense = attended_pairs(mask, s.heads)
        base = dict(context=context, density_target=target, density=mask.density(), pattern=pattern,
                    kept_pair_fraction=kept / dense)

        ours = dict(base, method="sparse_attn", impl=self.impl)
        ours_out = None
        reason = self._skip_reason()
        if reason is None:
            try:
                ours_out = block_sparse_attention(q, k, v, mask, causal=True, scale=self.scale, backend=s.backend)
            except Exception as exc:
                reason = common.error_reason(exc)
        if reason is None:
            self._measure(ours, lambda: block_sparse_attention(q, k, v, mask, causal=True, scale=self.scale, backend=s.backend))
            if s.page_size:
                self._paged(ours, q, k, v, mask, ours_out)
        else:
            self._skip(ours, reason)

        flex = dict(base, method="flex", impl=s.flex)
        flex_out = None
        if s.flex == "off":
            self._skip(flex, "disabled (--flex off)")
        else:
            reason = self._skip_reason()
            if reason is None:
                try:
                    block_mask = flex_block_mask(mask, s.heads, blocks_in_mask_mod=s.flex == "eager")
                    fn = flex_function(s.flex)
                    flex_call = lambda: fn(q, k, v, block_mask=block_mask, scale=self.scale, enable_gqa=s.heads != s.kv_heads)  # noqa: E731
                    flex_out = flex_call()
                except Exception as exc:
                    reason = common.error_reason(exc)
            if reason is None:
                self._measure(flex, flex_call)
            else:
                self._skip(flex, reason)

        for row in (ours, flex):
            row["tflops_effective"] = tflops(dense, s.head_dim, row["ms"])
            row["tflops_actual"] = tflops(kept, s.head_dim, row["ms"])
            row["sdpa_best_impl"], row["sdpa_best_ms"] = sdpa_best["impl"], sdpa_best["ms"]
            row["speedup_vs_sdpa"] = sdpa_best["ms"] / row["ms"] if row["ms"] and sdpa_best["ms"] else None
        ours["flex_ms"] = flex["ms"]
        ours["speedup_vs_flex"] = flex["ms"] / ours["ms"] if ours["ms"] and flex["ms"] else None

        if ours_out is not None:
            if flex_out is not None:
                ours["max_abs_err_vs_flex"] = float((ours_out.float() - flex_out.float()).abs().max())
            if dense_out is not None and target >= 1.0:
                ours["max_abs_err_vs_sdpa"] = float((ours_out.float() - dense_out.float()).abs().max())
            reason = self._skip_reason(reference_bytes(s.heads, context, s.head_dim, s.block))
            if reason is None:
                blocks = sample_q_blocks(mask.num_q_blocks, s.reference_blocks, s.seed + context)
                ours["reference_q_blocks"] = blocks
                ours["max_abs_err_vs_reference"] = reference_rows_error(ours_out, q, k, v, mask, blocks, self.scale)
            else:
                ours["reference_skipped"] = reason
        common.release_memory(self.device)

    def _paged(self, row: dict, q, k, v, mask, reference_out) -> None:
        """The same call with K/V in shuffled pages of ``page_size`` tokens read through a block table (how a serving
        engine's KV cache is read in place): its time beside the contiguous one, and its largest difference."""
        s = self.s
        batch, heads, context, dim = q.shape
        pages = -(-context // s.page_size)
        order = torch.randperm(batch * pages, generator=torch.Generator().manual_seed(s.seed)).to(self.device)
        table = order.view(batch, pages).to(torch.int32)

        def paged(x):  # [B, Hkv, S, D] -> [B * pages, page_size, Hkv, D] at the shuffled page ids
            padded = torch.nn.functional.pad(x.transpose(1, 2), (0, 0, 0, 0, 0, pages * s.page_size - context))
            out = torch.empty(batch * pages, s.page_size, x.shape[1], dim, dtype=x.dtype, device=x.device)
            out[order] = padded.reshape(batch * pages, s.page_size, x.shape[1], dim)
            return out

        k_pages, v_pages = paged(k), paged(v)
        q_tokens = q.transpose(1, 2).reshape(-1, heads, dim)
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device=self.device) * context
        kv_lens = [context] * batch
        call = lambda: block_sparse_attention(q_tokens, k_pages, v_pages, mask, causal=True, scale=self.scale,  # noqa: E731
                                              cu_seqlens_q=cu_q, block_table=table, kv_lens=kv_lens, backend=s.backend)
        try:
            out = call()
            timing = common.time_fn(call, self.device, **s.timing)
        except Exception as exc:
            row["paged_skipped"] = common.error_reason(exc)
            return
        row["paged_ms"] = timing.median_ms
        row["paged_vs_contiguous"] = row["ms"] / timing.median_ms if row.get("ms") else None
        if reference_out is not None:
            want = reference_out.transpose(1, 2).reshape(-1, heads, dim)
            row["paged_max_abs_diff"] = float((out.float() - want.float()).abs().max())

    # -------------------------------------------------------------- grid
    def run(self) -> list[dict]:
        s = self.s
        try:
            self.impl = resolve_backend(s.backend, self.device)
        except ValueError as exc:
            self.impl = f"unavailable ({exc})"
        jobs = [(c, d) for c in s.contexts for d in (None, *s.densities)]
        state = None
        for context, target in common.progress(jobs, desc="prefill", unit="cell"):
            if state is None or state["context"] != context:
                state = None
                common.release_memory(self.device)
                q, k, v = self._inputs(context)
                _, dense_pairs = attended_pairs(Dense().build_mask(q_lens=context, kv_lens=context, num_heads=1,
                                                                   q_block_size=s.block, kv_block_size=s.block,
                                                                   device=self.device), s.heads)
                state = dict(context=context, q=q, k=k, v=v, dense_pairs=dense_pairs, dense_out=None)
            if target is None:
                state["sdpa_best"] = self.dense_baselines(context, state["q"], state["k"], state["v"], state["dense_pairs"])
                state["dense_out"] = self._dense_reference_output(state)
            else:
                self.cell(context, target, state["q"], state["k"], state["v"], state["sdpa_best"], state["dense_out"])
                if s.compare_blocks and target < 1.0:
                    self.block_sizes(context, target, state["q"], state["k"], state["v"])
        return self.results

    def block_sizes(self, context: int, target: float, q, k, v, rounds: int = 9) -> None:
        """Our kernel on masks of the same pattern and density at each of ``compare_blocks`` (query and KV blocks of
        that size), the largest block size the baseline: ``vs_largest_block`` = the median over ``rounds`` of this
        time / its time, the block sizes taking turns within each round (a shared machine's drift hits both)."""
        s = self.s
        rows, calls = [], []
        for block in sorted(s.compare_blocks):
            mask, description = mask_at_density(target, context=context, heads=s.heads, block=block,
                                                pattern=s.pattern, device=self.device, seed=s.seed + context)
            rows.append(dict(context=context, method="block_size", impl=self.impl, block=block,
                             density_target=target, density=mask.density(), pattern=description, rounds=rounds))
            calls.append(lambda mask=mask: block_sparse_attention(q, k, v, mask, causal=True, scale=self.scale,
                                                                  backend=s.backend))
        reason = self._skip_reason()
        if reason is None:
            try:
                times = [[] for _ in calls]
                for call in calls:  # warm-up
                    call()
                for _ in range(1 if s.quick else rounds):
                    for i, call in enumerate(calls):
                        times[i].append(common.timed_calls(call, self.device, 1)[0])
            except Exception as exc:
                reason = common.error_reason(exc)
        for i, row in enumerate(rows):
            if reason is not None:
                self._skip(row, reason)
                continue
            ratios = [t / base for t, base in zip(times[i], times[-1])]
            row.update(status="ok", ms=statistics.median(times[i]), ms_min=min(times[i]),
                       vs_largest_block=statistics.median(ratios))
            self.results.append(row)

    def _dense_reference_output(self, state):
        """Output of the fastest SDPA backend, kept to check the Dense() cell against it."""
        best = state["sdpa_best"]["impl"]
        if best is None or 1.0 not in self.s.densities:
            return None
        try:
            fn, _ = sdpa_function(best, state["q"], state["k"], state["v"], self.scale)
            return fn()
        except Exception:
            return None


def target_checks(settings: dict, device_type: str, results: list[dict]) -> list[dict]:
    """The METHODS.md prefill bars at 64k, when this run used their configuration on a GPU."""
    if device_type != "cuda" or any(settings.get(k) != v for k, v in TARGET_CONFIG.items()):
        return []
    checks = []
    for name, density, metric, bar in TARGETS:
        row = next((r for r in results if r["method"] == "sparse_attn" and r["context"] == TARGET_CONTEXT
                    and r["density_target"] == density), None)
        if row is None:
            continue
        value = row.get(metric)
        checks.append(dict(name=name, context=TARGET_CONTEXT, density=row["density"], metric=metric,
                           value=value, bar=bar, met=value is not None and value >= bar))
    return checks


def run(settings: Settings, out_dir: Path | str | None = None, command: str | None = None) -> dict:
    """Run the benchmark; write ``prefill.json`` and ``prefill.md`` into ``out_dir`` when given."""
    device = torch.device(settings.device)
    payload = {"benchmark": NAME, **common.environment(device, command), "settings": asdict(settings)}
    if settings.table:
        payload["table"] = settings.table
    payload["settings"]["flex_mode"] = {"compile": "torch.compile(flex_attention, dynamic=False)",
                                        "eager": "flex_attention (eager, not compiled)", "off": None}[settings.flex]
    payload["results"] = PrefillRun(settings).run()
    payload["targets"] = target_checks(payload["settings"], device.type, payload["results"])
    if out_dir is not None:
        out_dir = Path(out_dir)
        common.write_json(out_dir / f"{NAME}.json", payload)
        (out_dir / f"{NAME}.md").write_text(markdown(payload) + "\n")
    return payload


# ---------------------------------------------------------------------------------------------------- markdown


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _ms(row: dict | None, notes: list[str]) -> str:
    """A row's time, or "skipped" with a footnote number for its reason."""
    if row is None:
        return "–"
    if row.get("ms") is not None:
        return f"{common.fmt(row['ms'])} ms"
    reason = row.get("reason", "skipped")
    if reason not in notes:
        notes.append(reason)
    return f"skipped [{notes.index(reason) + 1}]"


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}x"


def markdown(payload: dict) -> str:
    """The markdown tables of one prefill result file (also what bench.report prints)."""
    s, results = payload["settings"], payload["results"]
    notes: list[str] = []
    lines = [
        "### Prefill: block-sparse attention vs dense SDPA and FlexAttention",
        "",
        common.environment_line(payload),
        "",
        f"Batch {s['batch']}, {s['heads']} query / {s['kv_heads']} KV heads, head_dim {s['head_dim']}, {s['dtype']}, "
        f"causal, block {s['block']}, masks: {s['pattern']} pattern; FlexAttention: {s.get('flex_mode') or 'off'}. "
        "Times are medians; speedups divide the baseline's time by ours, measured in the same run. "
        "TFLOP/s: effective counts every causal pair (dense-equivalent), actual counts the pairs in kept blocks.",
        "",
    ]
    ours_rows = [r for r in results if r["method"] == "sparse_attn"]
    flex_by_cell = {(r["context"], r["density_target"]): r for r in results if r["method"] == "flex"}
    table = []
    for r in ours_rows:
        flex = flex_by_cell.get((r["context"], r["density_target"]))
        sdpa = f"{common.fmt(r['sdpa_best_ms'])} ms ({r['sdpa_best_impl']})" if r.get("sdpa_best_ms") else "–"
        errors = [common.fmt(r.get(key), 2) for key in ("max_abs_err_vs_flex", "max_abs_err_vs_reference")]
        table.append([
            _tokens(r["context"]), f"{r['density_target']:.0%} → {r['density']:.1%}", _ms(r, notes), _ms(flex, notes),
            sdpa, _ratio(r.get("speedup_vs_sdpa")), _ratio(r.get("speedup_vs_flex")),
            f"{common.fmt(r.get('tflops_effective'))} / {common.fmt(r.get('tflops_actual'))}", " / ".join(errors),
        ])
    headers = ["context", "density (target → kept)", f"sparse-attn ({ours_rows[0]['impl'] if ours_rows else '–'})",
               "FlexAttention", "dense SDPA (fastest)", "vs SDPA", "vs Flex", "TFLOP/s eff. / actual",
               "max err vs Flex / ref"]
    if s.get("page_size"):  # the paged read beside the contiguous one
        headers.append(f"paged, pages of {s['page_size']} (time, vs contiguous)")
        for row, r in zip(table, ours_rows):
            row.append(f"{common.fmt(r['paged_ms'])} ms, {_ratio(r.get('paged_vs_contiguous'))}" if r.get("paged_ms")
                       else r.get("paged_skipped", "–"))
    lines.append(common.markdown_table(headers, table))

    dense = [r for r in results if r["method"] in ("sdpa", "flash_attn")]
    contexts = sorted({r["context"] for r in dense})
    columns = [("sdpa", b) for b in SDPA_BACKENDS] + [("flash_attn", "flash_attn")]
    by_key = {(r["context"], r["method"], r["impl"]): r for r in dense}
    rows = []
    for c in contexts:
        cells = []
        for method, impl in columns:
            r = by_key.get((c, method, impl))
            text = _ms(r, notes)
            if r is not None and r.get("gqa") == "repeat_kv":
                text += " (KV repeated)"
            cells.append(text)
        rows.append([_tokens(c)] + cells)
    lines += ["", "Dense baselines (causal, same inputs):", "",
              common.markdown_table(["context"] + [f"SDPA {b}" if m == "sdpa" else "flash-attn" for m, b in columns], rows)]

    sizes = [r for r in results if r["method"] == "block_size"]
    if sizes:
        largest = max(r["block"] for r in sizes)
        lines += ["", f"Block sizes at equal density (same pattern, our kernel): time against {largest}-token blocks, "
                      f"the median ratio over {sizes[0].get('rounds', 1)} rounds in which the block sizes take turns.",
                  "", common.markdown_table(
                          ["context", "block", "density (target → kept)", "time", f"vs {largest}-token blocks"],
                          [[_tokens(r["context"]), str(r["block"]), f"{r['density_target']:.0%} → {r['density']:.1%}",
                            _ms(r, notes), _ratio(r.get("vs_largest_block"))] for r in sizes])]
    if payload.get("targets"):
        lines += ["", "Targets (METHODS.md):", "", common.markdown_table(
            ["target", "measured", "bar", "met"],
            [[t["name"], _ratio(t["value"]), f"≥ {t['bar']}x", "yes" if t["met"] else "**no**"] for t in payload["targets"]])]
    if notes:
        lines += [""] + [f"[{i + 1}] {note}" for i, note in enumerate(notes)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI


def settings_from_args(argv: list[str] | None = None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(prog="python -m bench.prefill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for prefill.json and prefill.md")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--contexts", help="comma-separated context lengths (default: by device)")
    parser.add_argument("--densities", help="comma-separated target densities in (0, 1]; 1 = Dense()")
    common.add_shape_arguments(parser)
    parser.add_argument("--block", type=int, choices=(16, 32, 64, 128), help="query and KV block size of the masks")
    parser.add_argument("--pattern", choices=PATTERNS, default="topk")
    parser.add_argument("--flex", choices=("compile", "eager", "off"),
                        help="FlexAttention mode (default: compile on GPU; eager on CPU, where compiling takes ~40 s)")
    parser.add_argument("--backend", help="sparse-attn backend (default: auto, or $SPARSE_ATTN_BACKEND)")
    parser.add_argument("--quick", action="store_true", help="fewer timed calls (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, help="seconds; cells after it are recorded as skipped")
    parser.add_argument("--compare-blocks", help="comma-separated block sizes (e.g. 32,64): also time our kernel "
                        "at each, on masks of the same density, against the largest")
    parser.add_argument("--table", help="name of the README table the result fills (results of another machine)")
    parser.add_argument("--page-size", type=int, default=0,
                        help="also time K/V read in place from shuffled pages of this many tokens (0: off)")
    args = parser.parse_args(argv)

    device = args.device or common.default_device().type
    defaults = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    settings = Settings(
        **common.options_or_defaults(args, defaults), device=device, pattern=args.pattern,
        flex=args.flex or ("compile" if device == "cuda" else "eager"), backend=args.backend, quick=args.quick,
        seed=args.seed, time_budget_s=args.time_budget, page_size=args.page_size,
        compare_blocks=common.parse_list(args.compare_blocks) if args.compare_blocks else [], table=args.table,
    )
    return settings, args.out


def main(argv: list[str] | None = None) -> int:
    return common.benchmark_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
