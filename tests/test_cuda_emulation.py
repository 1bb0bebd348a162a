"""The CUDA kernels of csrc/cuda, executed on the CPU by the emulation harness (csrc/emulation, built as
``sparse_attn._cuda_emu``): the same .cu sources compiled by the host compiler, every block's threads real threads
that meet at real barriers and exchange warp shuffles through per-warp barriers, so the kernels' own
synchronisation decides the results.

Each kernel runs on fresh random inputs against a PyTorch reference (float64 for attention) on small shapes that
still reach each branch: top-k with ties, sink and recent ranges, budgets, rows no longer than the budget, keys that
differ only in the last radix pass, rows longer than a block; compressed decode with partial tiles, empty bitmap
tiles, empty contexts, GQA, split-context merges and the opt-in shared memory of large groups. Then the harness
itself: shuffles and votes against CUDA's documented semantics, fp16/bf16 rounding, launch limits, the failures of
broken warp synchronisation, and dropped __syncthreads that the tests must catch.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch

from sparse_attn.decode.compressed import compress_kv, keep_count

try:
    from sparse_attn import _cuda_emu as emu
except ImportError:
    emu = None

CUDA_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
requires_emulation = pytest.mark.skipif(
    emu is None, reason="sparse_attn._cuda_emu is not built (pip install --no-build-isolation -e .)"
)


def test_emulation_is_built_when_required():
    """CI builds the extensions and sets SPARSE_ATTN_REQUIRE_EXTENSION=1, so a broken emulation build fails here."""
    if emu is None:
        if os.environ.get("SPARSE_ATTN_REQUIRE_EXTENSION", "0") == "1":
            pytest.fail("SPARSE_ATTN_REQUIRE_EXTENSION=1 but sparse_attn._cuda_emu is not importable")
        pytest.skip("sparse_attn._cuda_emu is not built")
    assert callable(emu.topk_tokens) and callable(emu.compressed_decode_attention)


# ---------------------------------------------------------------------------------------------- top-k tokens
def ordered_keys(scores: torch.Tensor) -> torch.Tensor:
    """csrc/ordered_key.h in PyTorch: int64 keys with the order of the float32 scores, NaN as -inf (so -0 < +0)."""
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    u = scores.view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(u >= 0x80000000, 0xFFFFFFFF - u, u | 0x80000000)


def topk_reference(scores, lengths, k, sink, recent, budgets=None):
    """csrc/ops.h's topk_tokens: per row, all of its first len tokens if they fit the budget, else the sink and recent
    tokens and the highest keys of the rest (ties: the lower index), ascending, zero-padded past the count."""
    batch, heads, _ = scores.shape
    indices = torch.zeros(batch, heads, k, dtype=torch.int32)
    counts = torch.zeros(batch, heads, dtype=torch.int32)
    for b in range(batch):
        n = int(lengths[b])
        budget = k if budgets is None else min(int(budgets[b]), k)
        for h in range(heads):
            if n <= budget:
                chosen = list(range(n))
            else:
                sink_end = min(sink, n)
                recent_start = max(n - recent, sink_end)
                middle = torch.arange(sink_end, recent_start)
                need = max(budget - sink_end - (n - recent_start), 0)
                order = torch.sort(ordered_keys(scores[b, h, middle]), descending=True, stable=True).indices
                chosen = sorted([*range(sink_end), *middle[order[:need]].tolist(), *range(recent_start, n)])
            indices[b, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
            counts[b, h] = len(chosen)
    return indices, counts


def run_topk(scores, lengths, k, sink=0, recent=0, budgets=None):
    lengths = torch.as_tensor(lengths, dtype=torch.int32)
    budgets = None if budgets is None else torch.as_tensor(budgets, dtype=torch.int32)
    got = emu.topk_tokens(scores, lengths, k, sink, recent, budgets)
    return got, topk_reference(scores, lengths, k, sink, recent, budgets)


def tied_scores(g, shape):
    """Scores from five values: most selections end in a tie at the threshold."""
    return torch.randint(-2, 3, shape, generator=g).float()


def last_pass_scores(g, shape):
    """Scores that share their upper 24 key bits (1.0 plus a few ulps, and a few of each sign): only the fourth radix
    pass separates them; with specials (inf, -inf, NaN, -0.0, 0.0) sprinkled in."""
    base = torch.randint(0, 256, shape, generator=g).float() * 2.0 ** -23 + 1.0
    sign = torch.where(torch.rand(shape, generator=g) < 0.1, -1.0, 1.0)
    scores = (base * sign).flatten()
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0] * 3)
    where = torch.randperm(scores.numel(), generator=g)[: specials.numel()]
    scores[where] = specials
    return scores.view(shape)


TOPK_CASES = {
    # name: (scores maker, [B, H, L], lengths, k, sink, recent, budgets)
    "ties, sink and recent": (tied_scores, (2, 2, 700), [700, 333], 64, 3, 5, None),
    "budgets below k, a row within its budget, a budget under sink + recent": (
        lambda g, s: torch.randn(s, generator=g), (4, 1, 400), [400, 400, 50, 300], 64, 4, 4, [10, 64, 64, 5]),
    "rows no longer than the budget (empty, one token, exactly k)": (
        lambda g, s: torch.randn(s, generator=g), (3, 2, 64), [0, 1, 64], 64, 2, 2, None),
    "keys separated only by the last radix pass, specials": (last_pass_scores, (2, 2, 600), [600, 517], 40, 0, 0, None),
    "rows longer than a block (three compaction rounds)": (
        lambda g, s: torch.randn(s, generator=g), (1, 2, 2300), [2300], 300, 16, 64, None),
}


@requires_emulation
@pytest.mark.parametrize("case", list(TOPK_CASES))
def test_topk_kernel_matches_reference(case, rng):
    g, seed = rng
    make, shape, lengths, k, sink, recent, budgets = TOPK_CASES[case]
    scores = make(g, shape).float().contiguous()
    (indices, counts), (ref_indices, ref_counts) = run_topk(scores, lengths, k, sink, recent, budgets)
    assert torch.equal(counts, ref_counts), f"seed {seed}: counts {counts.tolist()} != {ref_counts.tolist()}"
    bad = (indices != ref_indices).any(-1).nonzero().tolist()
    assert not bad, f"seed {seed}: rows (b, h) {bad} differ from the reference"


@requires_emulation
def test_topk_tie_break_takes_the_lowest_indices():
    """All-equal scores: the middle tokens kept are the first ones after the sink, whatever the thread order."""
    scores = torch.zeros(1, 1, 1500)
    (indices, counts), _ = run_topk(scores, [1500], 40, sink=4, recent=6)
    assert int(counts) == 40
    assert indices[0, 0].tolist() == list(range(34)) + list(range(1494, 1500))


# ---------------------------------------------------------------------------------------------- compressed decode
def decode_inputs(g, *, batch, kv_heads, group, dim, dtype, comp_lengths, recent_lengths, window, sparsity,
                  empty_high_tiles=False):
    """Random q and K/V, compressed with the project's format (sparse_attn.decode.compressed.compress_kv), and a dense
    recent window. ``empty_high_tiles`` makes channels 64 and up tiny, so their tiles keep nothing (bitmap 0)."""
    max_comp = max(max(comp_lengths), 1)
    k = torch.randn(batch, kv_heads, max_comp, dim, generator=g)
    v = torch.randn(batch, kv_heads, max_comp, dim, generator=g)
    if empty_high_tiles:
        k[..., 64:] *= 1e-3
        v[..., 64:] *= 1e-3
    keep = keep_count(dim, sparsity)
    assert not empty_high_tiles or keep <= 64
    compressed = compress_kv(k.to(dtype), v.to(dtype), torch.tensor(comp_lengths, dtype=torch.int32),
                             k_keep=keep, v_keep=keep if sparsity > 0 else dim)
    q = torch.randn(batch, kv_heads * group, dim, generator=g).to(dtype)
    k_recent = torch.randn(batch, kv_heads, window, dim, generator=g).to(dtype)
    v_recent = torch.randn(batch, kv_heads, window, dim, generator=g).to(dtype)
    return q, compressed, k_recent, v_recent, torch.tensor(recent_lengths, dtype=torch.int32)


def decode_reference(q, compressed, k_recent, v_recent, recent_lengths, scale):
    """Float64 attention of each query head over its sequence's decompressed tokens, then its recent ones."""
    k_comp, v_comp, _ = compressed.decompress_padded()
    batch, q_heads, dim = q.shape
    group = q_heads // compressed.kv_heads
    out = torch.zeros(batch, q_heads, dim, dtype=torch.float64)
    lse = torch.full((batch, q_heads), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        n_comp, n_rec = int(compressed.lengths[b]), int(recent_lengths[b])
        for h in range(q_heads):
            g = h // group
            keys = torch.cat([k_comp[b, g, :n_comp], k_recent[b, g, :n_rec]]).double()
            values = torch.cat([v_comp[b, g, :n_comp], v_recent[b, g, :n_rec]]).double()
            if keys.shape[0] == 0:
                continue
            s = keys @ q[b, h].double() * scale
            lse[b, h] = torch.logsumexp(s, 0)
            out[b, h] = torch.softmax(s, 0) @ values
    return out, lse


def run_decode(q, compressed, k_recent, v_recent, recent_lengths, *, max_context=0, device_sms=132):
    c, scale = compressed, q.shape[-1] ** -0.5
    out, lse, splits = emu.compressed_decode_attention(
        q, c.k_bitmaps, c.k_values, c.k_keep, c.v_bitmaps, c.v_values, c.v_keep, c.offsets, c.lengths,
        k_recent, v_recent, recent_lengths, scale, max_context, device_sms)
    return out, lse, splits, decode_reference(q, compressed, k_recent, v_recent, recent_lengths, scale)


# Max abs error on out (rounded to the dtype: values |x| < ~3) and on lse (fp32).
DECODE_TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

DECODE_CASES = {
    # name: (settings, device_sms, max_context, expected splits)
    "partial tiles (head_dim 100), MHA, fp32, four splits and a short sequence's empty ones": (
        dict(batch=2, kv_heads=2, group=1, dim=100, dtype=torch.float32, comp_lengths=[190, 40],
             recent_lengths=[10, 7], window=12, sparsity=0.5), 8, 0, 4),
    "GQA group 4, fp16, 70% pruned, splits over an upper bound on the context": (
        dict(batch=2, kv_heads=2, group=4, dim=64, dtype=torch.float16, comp_lengths=[100, 77],
             recent_lengths=[5, 16], window=16, sparsity=0.7), 6, 180, 3),
    "head_dim 200 (last tile of 8), bf16, GQA 2, values unpruned": (
        dict(batch=1, kv_heads=2, group=2, dim=200, dtype=torch.bfloat16, comp_lengths=[90], recent_lengths=[9],
             window=9, sparsity=0.0), 4, 0, 2),
    "empty bitmap tiles, a context without compressed tokens, an empty context": (
        dict(batch=3, kv_heads=1, group=3, dim=100, dtype=torch.float32, comp_lengths=[120, 0, 0],
             recent_lengths=[4, 11, 0], window=12, sparsity=0.9, empty_high_tiles=True), 4, 0, 2),
    "group 16 at head_dim 256: over 48 KiB of shared memory (opt-in)": (
        dict(batch=1, kv_heads=1, group=16, dim=256, dtype=torch.float32, comp_lengths=[20], recent_lengths=[3],
             window=4, sparsity=0.5), 1, 0, 1),
}


@requires_emulation
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_compressed_decode_kernels_match_reference(case, rng):
    g, seed = rng
    settings, sms, max_context, splits_expected = DECODE_CASES[case]
    inputs = decode_inputs(g, **settings)
    out, lse, splits, (ref_out, ref_lse) = run_decode(*inputs, max_context=max_context, device_sms=sms)
    assert splits == splits_expected, f"the case meant to run {splits_expected} splits ran {splits}"
    assert out.dtype == settings["dtype"] and lse.dtype == torch.float32
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), empty), f"seed {seed}: empty contexts must give lse -inf"
    assert torch.all(out[empty] == 0), f"seed {seed}: empty contexts must give out 0"
    tol = DECODE_TOLERANCE[settings["dtype"]]
    err_out = (out.double() - ref_out).abs().max().item()
    err_lse = (lse.double() - ref_lse)[~empty].abs().max().item()
    assert err_out <= tol and err_lse <= 2e-5 * max(1.0, ref_lse[~empty].abs().max().item()), (
        f"seed {seed}: max error out {err_out:.2e} (tolerance {tol:.0e}), lse {err_lse:.2e}")
    if settings.get("empty_high_tiles"):  # the case must hold tiles with nothing kept
        c = inputs[1]
        assert bool((c.k_bitmaps.view(-1, c.tiles)[:, 1] == 0).all())


# ---------------------------------------------------------------------------------------------- the harness itself
def cuda_warp_ops(x: list[int]) -> list[list[int]]:
    """What selftest.cpp's warp_ops_kernel writes per thread, from CUDA's documented shuffle and vote semantics."""
    rows, total = [], sum(x)
    for tid, value in enumerate(x):
        base, lane = tid - tid % 32, tid % 32
        warp = x[base: base + 32]

        def seg(l, w):
            return l - l % w

        up = lambda d, w: warp[lane - d] if lane - d >= seg(lane, w) else value
        down = lambda d, w: warp[lane + d] if lane + d < seg(lane, w) + w else value
        xor = lambda m, w: warp[lane ^ m] if seg(lane ^ m, w) <= seg(lane, w) else value
        ballot = sum(1 << i for i, y in enumerate(warp) if y & 1)
        rows.append([up(3, 32), up(2, 8), down(5, 16), xor(7, 32), xor(9, 8), warp[seg(lane, 16) + 13],
                     ballot - (1 << 32) if ballot >= 1 << 31 else ballot, int(any(y > 90 for y in warp)),
                     int(all(y >= 0 for y in warp)), int(2 * (warp[lane ^ 1] + 0.5)), total])
    return rows


@requires_emulation
def test_shuffles_votes_and_atomics_follow_cuda(rng):
    g, seed = rng
    x = torch.randint(0, 100, (96,), generator=g, dtype=torch.int32)  # three warps
    assert emu.selftest_warp_ops(x).tolist() == cuda_warp_ops(x.tolist()), f"seed {seed}"


@requires_emulation
def test_broken_warp_synchronisation_fails_the_launch():
    """A shuffle whose mask names lanes that returned, and a deadlock (lanes at a shuffle, the rest of the warp at
    __syncthreads), must fail the launch with a description, not hang or return garbage."""
    assert "did not take part" in emu.selftest_failure("divergent_shuffle")
    emu.set_stall_timeout(0.5)
    try:
        message = emu.selftest_failure("deadlock")
    finally:
        emu.set_stall_timeout(60.0)
    assert "stalled" in message and "16 wait at __syncthreads and 16 at warp operations" in message


@requires_emulation
def test_dynamic_shared_memory_limits_follow_cuda():
    words = 20_000  # 80,000 bytes: over the 48 KiB a kernel gets without opting in
    assert emu.selftest_dynamic_shared(1000, 0) == (2 * sum(range(1000)), "")
    total, error = emu.selftest_dynamic_shared(words, 0)
    assert "exceeds the kernel's limit of 49152" in error
    assert emu.selftest_dynamic_shared(words, 4 * words) == (2 * sum(range(words)), "")
    _, error = emu.selftest_dynamic_shared(words, 228 * 1024)  # over sm_90's 227 KiB
    assert "exceeds" in error


@requires_emulation
@pytest.mark.parametrize("dtype", ["half", "bfloat16"])
def test_half_and_bfloat16_conversions_round_like_torch(dtype, rng):
    g, seed = rng
    torch_dtype = getattr(torch, dtype)
    x = torch.cat([
        torch.randn(4000, generator=g) * torch.exp2(torch.randint(-30, 20, (4000,), generator=g).float()),
        torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e-8, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26,
                      float("inf"), float("-inf"), 3.4e38, 1.0 + 2.0 ** -11, 1.0 + 2.0 ** -8]),
    ])
    bits, back = emu.selftest_round(x, dtype)
    expected = x.to(torch_dtype)
    assert torch.equal(bits.to(torch.int16), expected.view(torch.int16)), f"seed {seed}"
    assert torch.equal(back, expected.float())
    nan_bits, nan_back = emu.selftest_round(torch.tensor([float("nan")]), dtype)
    assert torch.isnan(nan_back).all() and torch.isnan(torch.tensor(nan_bits.to(torch.int16).item(),
                                                                    dtype=torch.int16).view(torch_dtype).float())


# ---------------------------------------------------------------------------------------------- dropped barriers
def barrier_lines(name: str) -> list[int]:
    """Line numbers of the __syncthreads calls in csrc/cuda/<name>."""
    lines = (CUDA_DIR / name).read_text().splitlines()
    return [i + 1 for i, line in enumerate(lines) if re.search(r"\b__syncthreads\(\)", line)]


def barrier_before(name: str, marker: str) -> int:
    """The line of the last __syncthreads before the first line containing ``marker`` in csrc/cuda/<name>."""
    lines = (CUDA_DIR / name).read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if marker in line)
    return max(n for n in barrier_lines(name) if n <= at)


@pytest.fixture
def dropped_barrier():
    """Drops one __syncthreads for the test (file, line); restores it afterwards."""
    def drop(name: str, line: int):
        emu.drop_barrier(name, line)

    yield drop
    emu.drop_barrier("", -1)


@requires_emulation
def test_every_barrier_runs_and_is_seen():
    """Each __syncthreads of the kernels completes in a small run: the harness reaches them all and names them by
    the lines the dropped-barrier tests look up."""
    emu.reset_barrier_site_counts()
    g = torch.Generator().manual_seed(0)
    run_topk(torch.randn(1, 1, 300, generator=g), [300], 20)
    run_decode(*decode_inputs(g, batch=1, kv_heads=1, group=2, dim=64, dtype=torch.float32, comp_lengths=[40],
                              recent_lengths=[3], window=4, sparsity=0.5), device_sms=1)
    names = ("topk_tokens.cu", "compressed_decode.cu")
    seen = {site.rsplit("/", 1)[-1]: n for site, n in emu.barrier_site_counts()}
    seen = {site: n for site, n in seen.items() if site.split(":")[0] in names}
    expected = {f"{name}:{line}" for name in names for line in barrier_lines(name)}
    assert set(seen) == expected and all(n > 0 for n in seen.values()), seen


@requires_emulation
def test_dropped_histogram_barrier_breaks_topk(dropped_barrier, rng):
    """Without the barrier between the histogram's atomic adds and thread 0's scan of it, thread 0 picks digits from
    a partial histogram: the selection must come out wrong, and the harness must show it."""
    g, seed = rng
    scores = torch.randn(2, 2, 1000, generator=g)
    dropped_barrier("topk_tokens.cu", barrier_before("topk_tokens.cu", "highest digit whose cumulative count"))
    (indices, counts), (ref_indices, _) = run_topk(scores, [1000, 1000], 50)
    assert emu.dropped_barrier_calls() > 0
    assert not torch.equal(indices, ref_indices), f"seed {seed}: a dropped barrier went unnoticed"


@requires_emulation
def test_dropped_merge_barrier_breaks_decode(dropped_barrier, rng):
    """Without the barrier before the warps' results are merged, warps that finish first read the others' maxima
    and sums before they are written: the output must come out wrong."""
    g, seed = rng
    inputs = decode_inputs(g, batch=1, kv_heads=2, group=2, dim=64, dtype=torch.float32, comp_lengths=[61],
                           recent_lengths=[2], window=4, sparsity=0.5)
    dropped_barrier("compressed_decode.cu", barrier_before("compressed_decode.cu", "Merge the warps"))
    out, lse, _, (ref_out, ref_lse) = run_decode(*inputs, device_sms=1)
    assert emu.dropped_barrier_calls() > 0
    assert not torch.allclose(out.double(), ref_out, atol=1e-3, equal_nan=False), (
        f"seed {seed}: a dropped barrier went unnoticed")
