"""Decode benchmark: per-step latency of Double Sparsity and KV-cache pruning against dense decode (torch SDPA with
every backend that runs, FlexAttention, and sparse-attn's own dense path over a paged cache), measured side by side
in one run, with accuracy and the HBM-traffic floor next to every time.

    python -m bench.decode --out DIR [--contexts 8192,32768,131072] [--batches 1,8,16]
                           [--heads 32 --kv-heads 8 --head-dim 128 --dtype bf16] [--quick]

writes ``DIR/decode.json`` and ``DIR/decode.md``. Without a GPU the defaults shrink to seconds-long CPU sizes.

One query token per sequence over a cache of ``context`` tokens. K and V live once, as a paged cache
``[num_pages, page_size, Hkv, D]`` whose pages lie in token order, so the same storage is also the contiguous
``[B, L, Hkv, D]`` layout projections produce: SDPA and FlexAttention read ``[B, Hkv, L, D]`` views of it, our dense
path and Double Sparsity read the pages through a block table, pruning reads its own compressed copy. Inputs are
random with a few planted heavy channels per KV head (larger in both q and k), so Double Sparsity's label channels
carry most of q.k; the channels themselves come from ``calibrate_heavy_channels`` on separately drawn samples.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sparse_attn.decode import (
    DoubleSparsityConfig,
    LabelCache,
    calibrate_heavy_channels,
    decode_attention_reference,
    gather_tokens,
    label_scores,
    select_tokens,
    sparse_decode_attention,
    topk_token_indices,
)
from sparse_attn.decode.attention import CUDA_OP as DECODE_OP
from sparse_attn.decode.compressed import keep_count, num_tiles
from sparse_attn.decode.kv_pruning import OP as PRUNED_OP
from sparse_attn.decode.kv_pruning import KVPruningConfig, compressed_kv_attention
from sparse_attn.ops import resolve_backend
from sparse_attn.ops.attention import cuda_op_available
from sparse_attn.ops.extension import extension_available

from . import common, prefill
from .prefill import _ms, _ratio, _tokens

NAME = "decode"

GPU_DEFAULTS = dict(contexts=[8192, 32768, 131072], batches=[1, 8, 16], heads=32, kv_heads=8, head_dim=128,
                    dtype="bf16")
CPU_DEFAULTS = dict(contexts=[2048, 8192], batches=[1, 4], heads=4, kv_heads=2, head_dim=64, dtype="fp32")

SDPA_BACKENDS = tuple(prefill.SDPA_BACKENDS)
DENSE_METHODS = ("sdpa", "flex", "sparse_attn_dense")

ACCURACY_NOTE = (
    "Accuracy is measured on the benchmark's random inputs: keys and queries are Gaussian with a few planted heavy "
    "channels per KV head, so attention is far flatter than in a trained model and the attention-mass recall of "
    "the Double Sparsity selection understates what real models give (recall_oracle is the mass of the best "
    "k tokens per query head, the most any k-token selection can reach on these inputs). Errors are max abs "
    "differences from a float32 dense reference on the same inputs."
)

# The METHODS.md bars, checked when the run used their configuration on a GPU (one H100, bf16, 32/8 heads, d=128).
TARGET_CONFIG = dict(dtype="bf16", heads=32, kv_heads=8, head_dim=128, r=16, budget_divisor=16)
TARGET_BATCH = 8


@dataclass(frozen=True)
class Target:
    name: str
    method: str
    metric: str
    op: str  # "<=" or ">="
    bar: float
    min_context: int
    max_context: int | None = None
    sparsity: float | None = None

    def applies(self, row: dict) -> bool:
        return (row["method"] == self.method and row["batch"] == TARGET_BATCH and row["context"] >= self.min_context
                and (self.max_context is None or row["context"] <= self.max_context)
                and (self.sparsity is None or row.get("sparsity") == self.sparsity))

    def met(self, value: float | None) -> bool:
        return value is not None and (value <= self.bar if self.op == "<=" else value >= self.bar)


TARGETS = (
    Target("Double Sparsity r=16, k=L/16: time / HBM-traffic floor", "double_sparsity", "vs_floor", "<=", 1.25,
           131072, 131072),
    Target("Double Sparsity r=16, k=L/16: speedup vs best dense decode", "double_sparsity", "speedup_vs_dense", ">=",
           7.0, 131072, 131072),
    Target("KV pruning 70%: stored KV / dense", "kv_pruning", "stored_ratio", "<=", 0.40, 32768, sparsity=0.7),
    Target("KV pruning 70%: speedup vs best dense decode", "kv_pruning", "speedup_vs_dense", ">=", 2.0, 32768,
           sparsity=0.7),
)


@dataclass
class Settings:
    contexts: list[int]
    batches: list[int]
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    device: str
    page_size: int = 16
    r: int = 16  # Double Sparsity label channels
    budget_divisor: int = 16  # Double Sparsity reads k = ceil(L / budget_divisor) tokens per KV head
    sink_tokens: int = 4
    recent_tokens: int = 64
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.7])
    planted_channels: int = 8  # heavy channels per KV head in the random inputs
    channel_gain: float = 3.0  # their scale in q and in k
    calibration_tokens: int = 1024
    flex: str = "compile"  # compile | eager | off
    backend: str | None = None  # sparse-attn backend of our ops; None = auto
    quick: bool = False
    seed: int = 0
    time_budget_s: float | None = None
    copy_mib: int | None = None  # size of the copy that measures bandwidth (default: 1024 on a GPU, 64 on CPU)
    timing: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.contexts or not self.batches or min(self.contexts) < 1 or min(self.batches) < 1:
            raise ValueError(f"contexts and batches must be non-empty lists of positive ints, "
                             f"got {self.contexts} and {self.batches}")
        if self.kv_heads < 1 or self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if not 0 < self.planted_channels <= self.head_dim:
            raise ValueError(f"planted_channels must lie in [1, head_dim={self.head_dim}], got {self.planted_channels}")
        if self.page_size < 1 or self.budget_divisor < 1 or self.calibration_tokens < 1:
            raise ValueError("page_size, budget_divisor and calibration_tokens must be positive")
        if self.flex not in ("compile", "eager", "off"):
            raise ValueError(f"flex must be compile, eager or off, got {self.flex!r}")
        for sparsity in self.sparsities:
            KVPruningConfig(sparsity=sparsity)  # raises on a bad value
        common.parse_dtype(self.dtype)
        ds_config(self).check_head_dim(self.head_dim)
        if self.copy_mib is None:
            self.copy_mib = 1024 if self.device == "cuda" else 64
        if not self.timing:
            if self.quick:
                self.timing = dict(warmup=1, min_iters=2, max_iters=3, target_s=0.05)
            elif self.device == "cpu":
                self.timing = dict(warmup=1, min_iters=3, max_iters=10, target_s=0.2)
            else:
                self.timing = dict(warmup=3, min_iters=5, max_iters=50, target_s=0.3)


def ds_config(s: Settings) -> DoubleSparsityConfig:
    """Double Sparsity as benchmarked: k = ceil(L / budget_divisor) tokens (sink and recent included), selection
    at every length (dense_below=0), labels unquantized in the model dtype."""
    protected = s.sink_tokens + s.recent_tokens
    return DoubleSparsityConfig(r=s.r, budget_fraction=1 / s.budget_divisor, min_budget=max(1, protected),
                                sink_tokens=s.sink_tokens, recent_tokens=s.recent_tokens, dense_below=0)


# ---------------------------------------------------------------------------------------------------- inputs


@dataclass
class DecodeInputs:
    """q ``[B, Hq, D]``, paged k/v caches ``[num_pages, page_size, Hkv, D]``, block_table int32 ``[B, pages]``,
    seq_lens int32 ``[B]``; ``gains [Hkv, D]`` scale the planted channels ``planted [Hkv, n]`` of q and k."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    gains: torch.Tensor
    planted: torch.Tensor
    in_order: bool  # pages in token order: the caches are also contiguous [B, pages * page_size, Hkv, D]

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    def contiguous_kv(self, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v as ``[B, Hkv, context, D]`` views of the page storage (no copy; pages must be in order)."""
        if not self.in_order:
            raise ValueError("contiguous views need pages in token order")
        batch, (_, page_size, hkv, dim) = self.batch, self.k_cache.shape
        return tuple(c.view(batch, -1, hkv, dim)[:, :context].transpose(1, 2) for c in (self.k_cache, self.v_cache))

    def sequence_kv(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence b's tokens as ``[Hkv, L, D]`` (a gather: works for any page order)."""
        positions = torch.arange(int(self.seq_lens[b]), device=self.q.device)
        return tuple(gather_tokens(c, self.block_table, b, positions).transpose(0, 1)
                     for c in (self.k_cache, self.v_cache))


def planted_gains(kv_heads: int, head_dim: int, planted: int, gain: float, seed: int):
    """Per KV head, ``planted`` random channels scaled by ``gain`` (1 elsewhere): fp32 ``[Hkv, D]`` and the
    channel ids ``[Hkv, planted]`` (ascending)."""
    g = torch.Generator().manual_seed(seed)
    channels = torch.rand(kv_heads, head_dim, generator=g).argsort(-1)[:, :planted].sort(-1).values
    gains = torch.ones(kv_heads, head_dim).scatter_(1, channels, gain)
    return gains, channels


def draw(shape: tuple[int, ...], gains: torch.Tensor, generator: torch.Generator, device, dtype) -> torch.Tensor:
    """Gaussian ``[*shape, H, D]`` with channel gains ``[H, D]``."""
    x = torch.randn(*shape, *gains.shape, generator=generator, device=device, dtype=dtype)
    return x.mul_(gains.to(device=device, dtype=dtype))


def make_inputs(seq_lens: list[int], *, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device,
                page_size: int, planted: int, gain: float, seed: int, shuffle_pages: bool = False) -> DecodeInputs:
    """Random decode inputs: each sequence gets ``ceil(max(seq_lens) / page_size)`` pages, in token order unless
    ``shuffle_pages`` (then the block table is a random permutation, as a serving engine's allocator leaves it)."""
    device = torch.device(device)
    batch, pages = len(seq_lens), max(1, -(-max(seq_lens) // page_size))
    gains, channels = planted_gains(kv_heads, head_dim, planted, gain, seed)
    g = torch.Generator(device=device).manual_seed(seed)
    k_cache = draw((batch * pages, page_size), gains, g, device, dtype)
    v_cache = torch.randn(k_cache.shape, generator=g, device=device, dtype=dtype)
    q = draw((batch,), gains.repeat_interleave(heads // kv_heads, 0), g, device, dtype)
    pool = batch * pages
    order = torch.randperm(pool, generator=torch.Generator().manual_seed(seed)) if shuffle_pages else torch.arange(pool)
    block_table = order.view(batch, pages).to(device=device, dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return DecodeInputs(q, k_cache, v_cache, block_table, lens, gains, channels, in_order=not shuffle_pages)


def calibrate(inputs: DecodeInputs, r: int, tokens: int, seed: int) -> torch.Tensor:
    """Heavy channels ``[Hkv, r]``: ``calibrate_heavy_channels`` on fresh q/k drawn like the inputs."""
    heads, kv_heads = inputs.q.shape[1], inputs.k_cache.shape[2]
    g = torch.Generator(device=inputs.q.device).manual_seed(seed + 1)
    q = draw((tokens,), inputs.gains.repeat_interleave(heads // kv_heads, 0), g, inputs.q.device, inputs.q.dtype)
    k = draw((tokens,), inputs.gains, g, inputs.q.device, inputs.q.dtype)
    return calibrate_heavy_channels(q, k, r)


def label_cache_for(inputs: DecodeInputs, channels: torch.Tensor, config: DoubleSparsityConfig) -> LabelCache:
    """A label cache paged like the inputs' KV cache, written from every cached key."""
    num_pages, page_size, kv_heads, dim = inputs.k_cache.shape
    cache = LabelCache.from_config(config, channels, num_pages, page_size, dtype=inputs.q.dtype, device=inputs.q.device)
    cache.write(inputs.k_cache.view(-1, kv_heads, dim), torch.arange(num_pages * page_size, device=inputs.q.device))
    return cache


def pruned_cache_for(inputs: DecodeInputs, config: KVPruningConfig):
    """A CompressedKVCache holding every sequence's tokens (appended as one prefill, compressed in one batch)."""
    kv_heads, dim = inputs.k_cache.shape[2:]
    cache = config.make_cache(kv_heads, dim, batch_size=inputs.batch, dtype=inputs.q.dtype, device=inputs.q.device)
    for b in range(inputs.batch):
        cache.append(*inputs.sequence_kv(b), seq=b)
    return cache


# ---------------------------------------------------------------------------------------------------- accuracy


def dense_reference(inputs: DecodeInputs, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 dense decode ``(out [B, Hq, D], lse [B, Hq])`` from the oracle, one sequence at a time (its fp32 copies
    of one sequence's K/V bound the memory)."""
    outs, lses = [], []
    for b in range(inputs.batch):
        out, lse = decode_attention_reference(inputs.q[b : b + 1], inputs.k_cache, inputs.v_cache,
                                              inputs.block_table[b : b + 1], inputs.seq_lens[b : b + 1], scale=scale,
                                              compute_dtype=torch.float32)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def selection_recall(inputs: DecodeInputs, selection, lse: torch.Tensor, scale: float) -> dict:
    """Fraction of each query head's exact softmax mass on the tokens ``selection`` (a token-level decode
    BlockSparseMask, one set per KV head, per query head or shared) reads, from the reference ``lse``; and the same
    for the best possible set of as many tokens per query head (``recall_oracle``)."""
    if selection.kv_block_size != 1:
        raise ValueError("selection_recall expects token-level selections (kv_block_size 1)")
    heads, dim = inputs.q.shape[1:]
    kv_heads = inputs.k_cache.shape[2]
    group = heads // kv_heads
    recalls, oracles = [], []
    for b in range(inputs.batch):
        keys, _ = inputs.sequence_kv(b)  # [Hkv, L, D]
        logits = torch.einsum("hgd,hnd->hgn", inputs.q[b].float().view(kv_heads, group, dim), keys.float()) * scale
        probs = torch.exp(logits - lse[b].view(kv_heads, group, 1))  # [Hkv, G, L]
        sb = b if selection.batch > 1 else 0
        idx, count = selection.kv_indices[sb, :, 0].long(), selection.kv_num_blocks[sb, :, 0].long()
        idx = idx.expand(heads, -1) if idx.shape[0] == 1 else idx.repeat_interleave(heads // idx.shape[0], 0)
        count = count.expand(heads) if count.shape[0] == 1 else count.repeat_interleave(heads // count.shape[0], 0)
        valid = (torch.arange(idx.shape[-1], device=idx.device) < count[:, None]) & (idx < keys.shape[1])
        flat = probs.view(heads, -1)
        mass = (flat.gather(-1, idx.clamp(max=keys.shape[1] - 1)) * valid).sum(-1)  # [Hq]
        best = flat.topk(min(int(count.max()), flat.shape[-1]), dim=-1).values.sum(-1)
        recalls.append(mass)
        oracles.append(best)
    recall, oracle = torch.cat(recalls), torch.cat(oracles)
    return dict(recall_mean=float(recall.mean()), recall_min=float(recall.min()),
                recall_oracle_mean=float(oracle.mean()))


def max_abs_err(out: torch.Tensor, reference: torch.Tensor) -> float | None:
    """Max abs difference, or None when either side holds NaN/inf (JSON has no NaN; a None error fails checks)."""
    err = float((out.reshape(reference.shape).float() - reference.float()).abs().max()) if reference.numel() else 0.0
    return err if math.isfinite(err) else None


# ---------------------------------------------------------------------------------------------------- bytes


def dense_kv_bytes(batch: int, context: int, kv_heads: int, head_dim: int, elem: int) -> int:
    return batch * context * kv_heads * 2 * head_dim * elem


def ds_traffic(batch: int, context: int, kv_heads: int, head_dim: int, elem: int, r: int, k: int,
               label_bits: int, label_dtype: torch.dtype) -> dict:
    """Bytes Double Sparsity must read per step: every token's labels, then k tokens of K and V per KV head."""
    labels = batch * context * LabelCache.bytes_per_token(kv_heads, r, label_bits, label_dtype)
    return dict(label_bytes=labels, selected_kv_bytes=batch * kv_heads * k * 2 * head_dim * elem)


def cell_bytes(s: Settings, batch: int, context: int) -> int:
    """About the peak memory of one cell besides the per-method extras: K/V pages, labels, label scores, one pruned
    cache plus the compression temporaries of one sequence, or the fp32 reference of one sequence."""
    elem = common.parse_dtype(s.dtype).itemsize
    tokens = batch * -(-context // s.page_size) * s.page_size
    kv = dense_kv_bytes(1, tokens, s.kv_heads, s.head_dim, elem)
    labels = tokens * LabelCache.bytes_per_token(s.kv_heads, s.r, 16, common.parse_dtype(s.dtype))
    scores = 3 * batch * s.kv_heads * context * 4
    keep = keep_count(s.head_dim, min(s.sparsities)) if s.sparsities else 0
    pruned = batch * s.kv_heads * context * (2 * num_tiles(s.head_dim) * 8 + 2 * keep * elem)
    compress = s.kv_heads * context * s.head_dim * 48  # sort keys + int64 indices + bitmap terms of one sequence
    reference = 4 * s.heads * context * s.head_dim * 4 + 2 * context * s.kv_heads * s.head_dim * (elem + 4)
    return kv + labels + scores + max(pruned + compress, reference)


def sdpa_extra_bytes(backend: str, batch: int, heads: int, kv_heads: int, context: int, head_dim: int,
                     elem: int) -> int:
    """Memory SDPA may need beyond its inputs: K/V repeated to the query heads when GQA is not native (the math
    backend always repeats, and may upcast to fp32), and the math backend's scores."""
    repeated = 2 * batch * heads * context * head_dim * elem if heads != kv_heads else 0
    if backend == "math":
        return repeated + 2 * batch * heads * context * head_dim * 4 + 3 * batch * heads * context * 4
    return repeated


def pruned_impl(backend: str | None, device: torch.device) -> str:
    """Which code decodes on the compressed cache (kv_pruning's dispatch): "cuda", "cpu-c++" or "torch"."""
    name = resolve_backend(backend, device, cuda_op=PRUNED_OP, has_triton=False)
    if name == "cpu":
        return "cpu-c++" if device.type == "cpu" and extension_available(PRUNED_OP) else "torch"
    return name


# ---------------------------------------------------------------------------------------------------- running


def copy_bandwidth(device: torch.device, mib: int, timing: dict) -> dict:
    """Device-to-device copy bandwidth: (read + write bytes) / median time of ``dst.copy_(src)``."""
    nbytes = mib << 20
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = common.time_fn(lambda: dst.copy_(src), device, **timing)
    del src, dst
    common.release_memory(device)
    return dict(bytes=nbytes, ms=t.median_ms, ms_min=t.min_ms, iters=t.iters,
                gb_per_s=2 * nbytes / (t.median_ms * 1e-3) / 1e9)


def floor_ms(nbytes: int, bandwidth: dict) -> float:
    return nbytes / (bandwidth["gb_per_s"] * 1e9) * 1e3


def planned_rows(s: Settings, batch: int, context: int, impls: dict) -> list[dict]:
    """Every row a cell produces, before measuring (a skipped cell records them all with the reason)."""
    base = dict(batch=batch, context=context)
    rows = [dict(base, method="sdpa", impl=b) for b in SDPA_BACKENDS]
    rows.append(dict(base, method="flex", impl=s.flex))
    rows.append(dict(base, method="sparse_attn_dense", impl=impls["attention"]))
    rows.append(dict(base, method="double_sparsity", impl=impls["attention"]))
    rows += [dict(base, method="kv_pruning", impl=impls["pruning"], sparsity=sp) for sp in s.sparsities]
    return rows


class DecodeRun:
    """Runs the grid for one Settings; results are plain dict rows (see the README for the schema)."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.device = torch.device(settings.device)
        self.dtype = common.parse_dtype(settings.dtype)
        self.elem = self.dtype.itemsize
        self.scale = settings.head_dim ** -0.5
        self.deadline = None if settings.time_budget_s is None else time.monotonic() + settings.time_budget_s
        self.results: list[dict] = []
        self.bandwidth: dict | None = None
        # What runs each op here; "unavailable" where the requested backend cannot (the rows then say why).
        self.impls = {}
        backend, device = settings.backend, self.device
        for key, pick in (("attention", lambda: resolve_backend(backend, device, cuda_op=DECODE_OP)),
                          ("label_scores", lambda: resolve_backend(backend, device, cuda_op="label_scores_fwd")),
                          ("pruning", lambda: pruned_impl(backend, device))):
            try:
                self.impls[key] = pick()
            except ValueError:
                self.impls[key] = "unavailable"
        cuda_topk = self.device.type == "cuda" and cuda_op_available("topk_tokens")
        self.impls["topk"] = "sparse_attn._C.topk_tokens" if cuda_topk else "torch.topk"

    # -------------------------------------------------------------- helpers
    def _skip_reason(self, need_bytes: int = 0) -> str | None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            return "time budget exhausted"
        return common.memory_shortfall(self.device, need_bytes) if need_bytes else None

    def _skip(self, row: dict, reason: str) -> dict:
        row.update(status="skipped", reason=reason, ms=None)
        common.release_memory(self.device)
        return row

    def _time(self, fn) -> dict:
        return common.time_fn(fn, self.device, **self.s.timing).as_dict()

    def _run(self, row: dict, fn, reference: torch.Tensor, need_bytes: int = 0):
        """Call ``fn`` once (its output's error against the reference), then time it into ``row``; a method that
        cannot run here (budget, memory, an error) is a skipped row with the reason. Returns the output or None."""
        self.results.append(row)
        reason = self._skip_reason(need_bytes)
        if reason is not None:
            self._skip(row, reason)
            return None
        try:
            out = fn()
            out = out[0] if isinstance(out, tuple) else out
            row["max_abs_err_vs_dense"] = max_abs_err(out, reference)
            if row["max_abs_err_vs_dense"] is None:
                row["output_not_finite"] = True
            row.update(status="ok", **self._time(fn))
            return out
        except Exception as exc:  # a baseline that cannot run here is a result, not a crash
            self._skip(row, common.error_reason(exc))
            return None

    def _floor(self, row: dict) -> None:
        """The HBM-traffic floor of a row that knows its ``bytes_read``, and how far its time is above it."""
        row["floor_ms"] = floor_ms(row["bytes_read"], self.bandwidth)
        row["vs_floor"] = row["ms"] / row["floor_ms"] if row.get("ms") else None

    # -------------------------------------------------------------- one cell
    def cell(self, batch: int, context: int) -> None:
        s = self.s
        rows = planned_rows(s, batch, context, self.impls)
        reason = self._skip_reason(cell_bytes(s, batch, context))
        if reason is None:
            try:
                inputs = make_inputs([context] * batch, heads=s.heads, kv_heads=s.kv_heads, head_dim=s.head_dim,
                                     dtype=self.dtype, device=self.device, page_size=s.page_size,
                                     planted=s.planted_channels, gain=s.channel_gain, seed=s.seed + context + batch)
                reference, ref_lse = dense_reference(inputs, self.scale)
            except Exception as exc:
                reason = common.error_reason(exc)
        if reason is not None:
            self.results += [self._skip(row, reason) for row in rows]
            return
        q_bytes = batch * s.heads * s.head_dim * self.elem
        dense_bytes = dense_kv_bytes(batch, context, s.kv_heads, s.head_dim, self.elem) + q_bytes
        by_method = {}
        for row in rows:
            by_method.setdefault(row["method"], []).append(row)

        self.dense_baselines(inputs, context, by_method, reference)
        dense = [r for m in DENSE_METHODS for r in by_method[m]]
        for r in dense:
            r["bytes_read"] = dense_bytes
        timed = [r for r in dense if r.get("ms") is not None]
        best = min(timed, key=lambda r: r["ms"]) if timed else None

        self.double_sparsity(inputs, context, by_method["double_sparsity"][0], reference, ref_lse, q_bytes)
        for row in by_method["kv_pruning"]:
            self.kv_pruning(inputs, context, row, reference, q_bytes)

        for row in rows:
            if "bytes_read" in row:
                self._floor(row)
            row["best_dense_method"] = f"{best['method']}:{best['impl']}" if best else None
            row["best_dense_ms"] = best["ms"] if best else None
            row["speedup_vs_dense"] = best["ms"] / row["ms"] if best and row.get("ms") else None
        del inputs
        common.release_memory(self.device)

    def dense_baselines(self, inputs: DecodeInputs, context: int, by_method: dict, reference) -> None:
        s = self.s
        k, v = inputs.contiguous_kv(context)  # [B, Hkv, L, D] views of the page storage
        q = inputs.q[:, :, None, :]  # [B, Hq, 1, D]: one query token, no causal mask (it sees the whole cache)
        for row in by_method["sdpa"]:
            need = sdpa_extra_bytes(row["impl"], inputs.batch, s.heads, s.kv_heads, context, s.head_dim, self.elem)
            reason = self._skip_reason(need)
            if reason is None:
                try:
                    fn, row["gqa"] = prefill.sdpa_function(row["impl"], q, k, v, self.scale, causal=False)
                except RuntimeError as exc:
                    reason = str(exc)[:600]
            if reason is not None:
                self.results.append(self._skip(row, reason))
                continue
            self._run(row, fn, reference)
            fn = None
            common.release_memory(self.device)

        row = by_method["flex"][0]
        if s.flex == "off":
            self.results.append(self._skip(row, "disabled (--flex off)"))
        else:
            flex = prefill.flex_function(s.flex)
            self._run(row, lambda: flex(q, k, v, scale=self.scale, enable_gqa=s.heads != s.kv_heads), reference)

        row = by_method["sparse_attn_dense"][0]
        args = (inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_table, inputs.seq_lens, None)
        row["page_size"] = s.page_size
        try:  # one call with every value check, then the timed calls skip them as a serving loop does
            sparse_decode_attention(*args, scale=self.scale, backend=s.backend)
        except Exception as exc:
            self.results.append(self._skip(row, common.error_reason(exc)))
            return
        self._run(row, lambda: sparse_decode_attention(*args, scale=self.scale, backend=s.backend, check_values=False),
                  reference)

    def double_sparsity(self, inputs: DecodeInputs, context: int, row: dict, reference, ref_lse, q_bytes: int) -> None:
        """Label scores, top-k and sparse attention timed alone and as one step; recall of the selection."""
        s, config = self.s, ds_config(self.s)
        k = config.token_budget(context)
        row.update(r=s.r, k=k, budget_fraction=k / context, label_bits=config.label_bits, page_size=s.page_size,
                   scores_impl=self.impls["label_scores"], topk_impl=self.impls["topk"])
        traffic = ds_traffic(inputs.batch, context, s.kv_heads, s.head_dim, self.elem, s.r, k, config.label_bits,
                             self.dtype)
        row.update(traffic, bytes_read=traffic["label_bytes"] + traffic["selected_kv_bytes"] + q_bytes)
        reason = self._skip_reason()
        if reason is not None:
            self.results.append(self._skip(row, reason))
            return
        table, lens, backend = inputs.block_table, inputs.seq_lens, s.backend
        try:
            channels = calibrate(inputs, s.r, s.calibration_tokens, s.seed + context)
            found = [len(set(c.tolist()) & set(p.tolist())) for c, p in zip(channels.cpu(), inputs.planted)]
            row["planted_channels_found"] = sum(found) / inputs.planted.numel()
            labels = label_cache_for(inputs, channels, config)
            selection = select_tokens(inputs.q, labels, channels, table, lens, config, backend=backend)
            row.update(selection_recall(inputs, selection, ref_lse, self.scale))
        except Exception as exc:
            self.results.append(self._skip(row, common.error_reason(exc)))
            return

        def step():
            chosen = select_tokens(inputs.q, labels, None, table, lens, config, max_seq_len=context, backend=backend,
                                   check_values=False)
            return attend(chosen)

        def attend(chosen):
            return sparse_decode_attention(inputs.q, inputs.k_cache, inputs.v_cache, table, lens, chosen,
                                           scale=self.scale, backend=backend, check_values=False)

        if self._run(row, step, reference) is None:
            return
        budgets, width = config.token_budgets(lens), config.max_token_budget(context)
        score = lambda: label_scores(inputs.q, labels, table, lens, context, config, backend=backend)  # noqa: E731
        scores = score()
        parts = (("label_scores", score), ("topk", lambda: topk_token_indices(scores, budgets, width)),
                 ("attention", lambda: attend(selection)))
        for name, fn in parts:
            row[f"{name}_ms"] = None if self._skip_reason() else self._time(fn)["ms"]
        part_ms = [row[f"{name}_ms"] for name, _ in parts]
        row["parts_ms"] = sum(part_ms) if None not in part_ms else None
        # The two parts that read memory, each against its own floor: all labels, and the selected K/V rows.
        for name, nbytes in (("label_scores", traffic["label_bytes"]), ("attention", traffic["selected_kv_bytes"])):
            ms = row[f"{name}_ms"]
            row[f"{name}_vs_floor"] = ms / floor_ms(nbytes + q_bytes, self.bandwidth) if ms else None
        del labels, scores, selection
        common.release_memory(self.device)

    def kv_pruning(self, inputs: DecodeInputs, context: int, row: dict, reference, q_bytes: int) -> None:
        """Decode on a compressed cache at one sparsity; stored bytes from the cache object itself."""
        s = self.s
        config = KVPruningConfig(sparsity=row["sparsity"])
        row.update(recent_tokens=config.recent_tokens, compress_every=config.compress_every)
        # The PyTorch fallback decompresses everything into int64 bit tables and fp32 copies.
        need = 64 * inputs.batch * s.kv_heads * context * s.head_dim if row["impl"] == "torch" else 0
        reason = self._skip_reason(need)
        if reason is not None:
            self.results.append(self._skip(row, reason))
            return
        try:
            cache = pruned_cache_for(inputs, config)
        except Exception as exc:
            self.results.append(self._skip(row, common.error_reason(exc)))
            return
        row.update(k_keep=cache.k_keep, v_keep=cache.v_keep, compressed_tokens=sum(cache.comp_lengths),
                   stored_bytes=cache.nbytes, dense_bytes=cache.dense_nbytes, allocated_bytes=cache.allocated_nbytes,
                   stored_ratio=cache.nbytes / cache.dense_nbytes, bytes_read=cache.nbytes + q_bytes)
        compressed, (k_recent, v_recent, recent_lengths) = cache.compressed(), cache.recent()
        self._run(row, lambda: compressed_kv_attention(inputs.q, compressed, k_recent, v_recent, recent_lengths,
                                                       scale=self.scale, backend=s.backend, max_context=context),
                  reference, need)
        del cache, compressed, k_recent, v_recent
        common.release_memory(self.device)

    # -------------------------------------------------------------- grid
    def jobs(self) -> list[tuple[int, int]]:
        """(batch, context) cells, those at the target batch first so a time budget never cuts the targets."""
        cells = [(b, c) for b in self.s.batches for c in self.s.contexts]
        return sorted(cells, key=lambda cell: cell[0] != TARGET_BATCH)

    def run(self) -> list[dict]:
        self.bandwidth = copy_bandwidth(self.device, self.s.copy_mib, self.s.timing)
        for batch, context in common.progress(self.jobs(), desc="decode", unit="cell"):
            self.cell(batch, context)
        order = {m: i for i, m in enumerate(DENSE_METHODS + ("double_sparsity", "kv_pruning"))}
        self.results.sort(key=lambda r: (r["batch"], r["context"], order[r["method"]]))
        return self.results


def target_checks(settings: dict, device_type: str, results: list[dict]) -> list[dict]:
    """The METHODS.md decode bars, when this run used their configuration on a GPU."""
    if device_type != "cuda" or any(settings.get(k) != v for k, v in TARGET_CONFIG.items()):
        return []
    checks = []
    for target in TARGETS:
        for row in results:
            if target.applies(row):
                value = row.get(target.metric)
                checks.append(dict(name=target.name, batch=row["batch"], context=row["context"], metric=target.metric,
                                   value=value, op=target.op, bar=target.bar, met=target.met(value)))
    return checks


def run(settings: Settings, out_dir: Path | str | None = None, command: str | None = None) -> dict:
    """Run the benchmark; write ``decode.json`` and ``decode.md`` into ``out_dir`` when given."""
    device = torch.device(settings.device)
    payload = {"benchmark": NAME, **common.environment(device, command), "settings": asdict(settings)}
    payload["settings"]["flex_mode"] = {"compile": "torch.compile(flex_attention, dynamic=False)",
                                        "eager": "flex_attention (eager, not compiled)", "off": None}[settings.flex]
    payload["settings"]["double_sparsity"] = asdict(ds_config(settings))
    payload["settings"]["timed_calls"] = "value checks off (check_values=False), as a serving loop runs them"
    bench = DecodeRun(settings)
    payload["results"] = bench.run()
    payload["bandwidth"] = bench.bandwidth
    payload["impls"] = bench.impls
    payload["accuracy_note"] = ACCURACY_NOTE
    payload["targets"] = target_checks(payload["settings"], device.type, payload["results"])
    if out_dir is not None:
        out_dir = Path(out_dir)
        common.write_json(out_dir / f"{NAME}.json", payload)
        (out_dir / f"{NAME}.md").write_text(markdown(payload) + "\n")
    return payload


# ---------------------------------------------------------------------------------------------------- markdown


def _err(row: dict | None) -> str:
    return common.fmt(row.get("max_abs_err_vs_dense"), 2) if row else "–"


def _ms_of(value: float | None) -> str:
    return "–" if value is None else f"{common.fmt(value)} ms"


def markdown(payload: dict) -> str:
    """The markdown tables of one decode result file (also what bench.report prints)."""
    s, results, bw = payload["settings"], payload["results"], payload["bandwidth"]
    ds = s["double_sparsity"]
    notes: list[str] = []
    lines = [
        "### Decode: Double Sparsity and KV-cache pruning vs dense decode",
        "",
        common.environment_line(payload),
        "",
        f"{s['heads']} query / {s['kv_heads']} KV heads, head_dim {s['head_dim']}, {s['dtype']}; one query token per "
        f"sequence over {s['page_size']}-token pages (SDPA and FlexAttention read the same storage as "
        f"[B, Hkv, L, D] views). Double Sparsity: r={ds['r']} calibrated label channels, k = L/{s['budget_divisor']} "
        f"tokens per KV head ({ds['sink_tokens']} sink + {ds['recent_tokens']} recent included). Times are medians, "
        "value checks off; speedups divide the best dense time of the same cell by the method's. HBM floor: bytes "
        f"the method must read / copy bandwidth ({common.fmt(bw['gb_per_s'])} GB/s, device-to-device copy of "
        f"{bw['bytes'] >> 20} MiB, read + write). Errors: max abs vs a float32 dense reference.",
        "",
    ]
    cells = sorted({(r["batch"], r["context"]) for r in results})
    by = {}
    for r in results:
        by.setdefault((r["batch"], r["context"], r["method"]), []).append(r)

    def one(batch, context, method, **match):
        rows = [r for r in by.get((batch, context, method), []) if all(r.get(k) == v for k, v in match.items())]
        return rows[0] if rows else None

    dense_rows = []
    for b, c in cells:
        ours = one(b, c, "sparse_attn_dense")
        best, floor = ours.get("best_dense_ms"), ours.get("floor_ms")
        best_text = f"{_ms_of(best)} ({ours['best_dense_method']})" if best else "–"
        dense_rows.append([b, _tokens(c)] + [_ms(one(b, c, "sdpa", impl=i), notes) for i in SDPA_BACKENDS]
                          + [_ms(one(b, c, "flex"), notes), _ms(ours, notes), best_text, _ms_of(floor),
                             _ratio(best / floor if best and floor else None), _err(ours)])
    lines.append("Dense decode (same K/V storage):")
    lines += ["", common.markdown_table(
        ["batch", "context"] + [f"SDPA {i}" for i in SDPA_BACKENDS]
        + ["FlexAttention", "sparse-attn dense (paged)", "best", "HBM floor", "best / floor", "err (ours)"], dense_rows)]

    ds_rows = []
    for b, c in cells:
        r = one(b, c, "double_sparsity")
        if r is None:
            continue
        recall = (f"{r['recall_mean']:.3f} (min {r['recall_min']:.3f}) / {r['recall_oracle_mean']:.3f}"
                  if r.get("recall_mean") is not None else "–")
        ds_rows.append([b, _tokens(c), r.get("k", "–"), _ms_of(r.get("label_scores_ms")), _ms_of(r.get("topk_ms")),
                        _ms_of(r.get("attention_ms")), _ms(r, notes), _ratio(r.get("speedup_vs_dense")),
                        _ms_of(r.get("floor_ms")), _ratio(r.get("vs_floor")), recall, _err(r)])
    lines += ["", f"Double Sparsity (label scores: {payload['impls']['label_scores']}, top-k: "
                  f"{payload['impls']['topk']}, attention: {payload['impls']['attention']}):", "",
              common.markdown_table(["batch", "context", "k", "label scores", "top-k", "attention", "step",
                                     "vs best dense", "HBM floor", "step / floor", "recall mean (min) / oracle",
                                     "max err"], ds_rows)]

    prune_rows = []
    for b, c in cells:
        for r in by.get((b, c, "kv_pruning"), []):
            prune_rows.append([b, _tokens(c), f"{r['sparsity']:.0%}", r["impl"], _ms(r, notes),
                               _ratio(r.get("speedup_vs_dense")),
                               f"{r['stored_ratio']:.3f}" if r.get("stored_ratio") is not None else "–",
                               _ms_of(r.get("floor_ms")), _ratio(r.get("vs_floor")), _err(r)])
    lines += ["", "KV-cache pruning (decode on the compressed cache; stored = CompressedKVCache.nbytes / dense_nbytes):",
              "", common.markdown_table(["batch", "context", "sparsity", "impl", "decode", "vs best dense",
                                         "stored / dense", "HBM floor", "time / floor", "max err"], prune_rows)]
    lines += ["", payload.get("accuracy_note", "")]

    if payload.get("targets"):
        lines += ["", "Targets (METHODS.md):", "", common.markdown_table(
            ["target", "batch", "context", "measured", "bar", "met"],
            [[t["name"], t["batch"], _tokens(t["context"]), common.fmt(t["value"]), f"{t['op']} {t['bar']}",
              "yes" if t["met"] else "**no**"] for t in payload["targets"]])]
    if notes:
        lines += [""] + [f"[{i + 1}] {note}" for i, note in enumerate(notes)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI


def settings_from_args(argv: list[str] | None = None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for decode.json and decode.md")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--contexts", help="comma-separated context lengths (default: by device)")
    parser.add_argument("--batches", help="comma-separated batch sizes (default: by device)")
    common.add_shape_arguments(parser)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--r", type=int, default=16, help="Double Sparsity label channels")
    parser.add_argument("--budget-divisor", type=int, default=16, help="Double Sparsity reads k = L / this tokens")
    parser.add_argument("--sparsities", default="0.5,0.7", help="KV pruning sparsities")
    parser.add_argument("--flex", choices=("compile", "eager", "off"),
                        help="FlexAttention mode (default: compile on GPU; eager on CPU)")
    parser.add_argument("--backend", help="sparse-attn backend of our ops (default: auto, or $SPARSE_ATTN_BACKEND)")
    parser.add_argument("--quick", action="store_true", help="fewer timed calls (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, help="seconds; cells after it are recorded as skipped")
    args = parser.parse_args(argv)

    device = args.device or common.default_device().type
    defaults = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    settings = Settings(
        **common.options_or_defaults(args, defaults), device=device, page_size=args.page_size, r=args.r,
        budget_divisor=args.budget_divisor,
        sparsities=common.parse_list(args.sparsities, float),
        flex=args.flex or ("compile" if device == "cuda" else "eager"),
        backend=args.backend, quick=args.quick, seed=args.seed, time_budget_s=args.time_budget,
    )
    return settings, args.out


def main(argv: list[str] | None = None) -> int:
    return common.benchmark_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
