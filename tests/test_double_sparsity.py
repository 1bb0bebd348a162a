"""Double Sparsity: config checks, channel calibration, the (quantized) label cache, label scores (PyTorch and the
Triton kernel under the CPU interpreter) and top-k token selection, on fresh random inputs (seed in failure messages).

Test data plants heavy channels: per KV head a few channels where q and k are large, so they carry most of q.k,
which is the structure Double Sparsity relies on in post-RoPE activations.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/conftest.py does the same)


import pytest
import torch

from sparse_attn.decode import (
    DoubleSparsityConfig,
    LabelCache,
    calibrate_heavy_channels,
    label_scores,
    select_tokens,
    sparse_decode_attention,
    token_slots,
    topk_token_indices,
    write_tokens,
)
from sparse_attn.decode.double_sparsity import dequantize_labels, quantize_labels
from backends import BACKENDS, DEVICE, TRITON_RUNS



def planted(gen, num_tokens, num_heads, num_kv_heads, head_dim, heavy, *, heavy_scale=3.0):
    """``[num_tokens, num_heads, head_dim]`` Gaussian activations, ``heavy_scale`` times larger on the heavy
    channels ``heavy[kv_head]`` of each head's KV head."""
    x = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    for h in range(num_heads):
        x[:, h, heavy[h * num_kv_heads // num_heads]] *= heavy_scale
    return x


class Setup:
    """A paged KV cache and label cache for a ragged batch, filled with planted activations."""

    def __init__(self, gen, lens, *, hq=6, hkv=2, head_dim=32, r=4, page_size=8, bits=16, heavy_scale=3.0):
        self.lens, self.hq, self.hkv, self.head_dim, self.page_size = lens, hq, hkv, head_dim, page_size
        self.heavy = torch.stack([torch.randperm(head_dim, generator=gen)[:r] for _ in range(hkv)])
        max_pages = max(-(-n // page_size) for n in lens)
        num_pages = len(lens) * max_pages + 2
        self.block_table = torch.randperm(num_pages, generator=gen)[: len(lens) * max_pages].view(len(lens), -1).int()
        self.k_cache = torch.zeros(num_pages, page_size, hkv, head_dim)
        self.v_cache = torch.zeros(num_pages, page_size, hkv, head_dim)
        self.labels = LabelCache(self.heavy, num_pages, page_size, bits=bits, dtype=torch.float32)
        self.keys = []
        for b, n in enumerate(lens):
            k = planted(gen, n, hkv, hkv, head_dim, self.heavy, heavy_scale=heavy_scale)
            slots = token_slots(self.block_table, b, torch.arange(n), page_size)
            write_tokens(self.k_cache, slots, k)
            write_tokens(self.v_cache, slots, torch.randn(n, hkv, head_dim, generator=gen))
            self.labels.write(k, slots)
            self.keys.append(k)
        self.q = planted(gen, len(lens), hq, hkv, head_dim, self.heavy, heavy_scale=heavy_scale)
        self.seq_lens = torch.tensor(lens, dtype=torch.int32)

    def to(self, device):
        for name in ("block_table", "k_cache", "v_cache", "q", "seq_lens"):
            setattr(self, name, getattr(self, name).to(device))
        self.labels.labels = self.labels.labels.to(device)
        self.labels.channels = self.labels.channels.to(device)
        if self.labels.scales is not None:
            self.labels.scales = self.labels.scales.to(device)
        return self

    def true_scores(self, b, reduce="max"):
        """Exact q.k of sequence b, reduced over each GQA group: ``[Hkv, len]`` float64."""
        group = self.hq // self.hkv
        s = torch.einsum("hgd,nhd->hgn", self.q[b].cpu().double().view(self.hkv, group, -1), self.keys[b].double())
        return s.amax(1) if reduce == "max" else s.sum(1)


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("field, value", [
    ("budget", 0), ("budget", -5), ("r", 0), ("r", -1), ("budget_fraction", 0.0), ("budget_fraction", 1.5),
    ("min_budget", 0), ("sink_tokens", -1), ("recent_tokens", -1), ("dense_below", -1), ("label_bits", 3),
    ("group_reduce", "mean"),
])
def test_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=field):
        DoubleSparsityConfig(**{field: value})


def test_config_budget_must_cover_protected_tokens_and_r_fit_head_dim():
    with pytest.raises(ValueError, match="min_budget"):
        DoubleSparsityConfig(min_budget=10, sink_tokens=4, recent_tokens=8)
    with pytest.raises(ValueError, match="budget"):
        DoubleSparsityConfig(budget=10, sink_tokens=4, recent_tokens=8)
    with pytest.raises(ValueError, match="r must be even"):
        DoubleSparsityConfig(r=5, label_bits=4)
    with pytest.raises(ValueError, match=r"r \(80\) must be <= head_dim"):
        DoubleSparsityConfig(r=80).check_head_dim(64)


def test_token_budget_rule():
    cfg = DoubleSparsityConfig()  # 1/16 of the context, at least 256, dense below 4096
    assert [cfg.token_budget(n) for n in (0, 1, 4095, 4096, 8000, 131072)] == [0, 1, 4095, 256, 500, 8192]
    fixed = DoubleSparsityConfig(budget=300, dense_below=100)
    assert [fixed.token_budget(n) for n in (50, 100, 200, 5000)] == [50, 100, 200, 300]
    lens = torch.tensor([0, 1, 99, 100, 257, 4095, 4096, 4097, 9999, 70000], dtype=torch.int32)
    for c in (cfg, fixed, DoubleSparsityConfig(budget_fraction=0.3, min_budget=16, recent_tokens=8, dense_below=0)):
        assert c.token_budgets(lens).tolist() == [c.token_budget(n) for n in lens.tolist()]
        assert all(c.max_token_budget(m) >= c.token_budget(n) for m in (5000, 70000) for n in range(0, m + 1, 97))


# ---------------------------------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("mode", ["qk", "q", "k"])
def test_calibration_finds_planted_channels_in_importance_order(rng, mode):
    gen, seed = rng
    hq, hkv, d, r = 6, 2, 32, 4
    heavy = torch.stack([torch.randperm(d, generator=gen)[:r] for _ in range(hkv)])
    # Graded magnitudes: channel heavy[:, 0] is the heaviest, heavy[:, 3] the lightest of the planted ones.
    grade = torch.tensor([8.0, 6.0, 4.5, 3.0])
    q, k = torch.randn(512, hq, d, generator=gen), torch.randn(512, hkv, d, generator=gen)
    for h in range(hq):
        q[:, h, heavy[h // 3]] *= grade
    for h in range(hkv):
        k[:, h, heavy[h]] *= grade
    channels = calibrate_heavy_channels(q.view(2, 256, hq, d), k.view(2, 256, hkv, d), r, mode)
    assert channels.shape == (hkv, r) and channels.dtype == torch.int64
    assert torch.equal(channels, heavy), f"seed {seed}: {channels} vs {heavy}"


def test_calibration_rejects_bad_inputs():
    q, k = torch.randn(10, 4, 16), torch.randn(10, 2, 16)
    for match, args in [
        ("r must be", (q, k, 0)), ("r must be", (q, k, 17)), ("mode", (q, k, 4, "v")),
        ("multiple of the number of KV heads", (q, torch.randn(10, 3, 16), 4)),
        ("head_dim", (q, torch.randn(10, 2, 8), 4)), ("pairs q and k", (q, k[:5], 4)),
        ("q_samples must be", (q[0], k, 4)), ("k_samples must be", (q, k.int(), 4)),
    ]:
        with pytest.raises(ValueError, match=match):
            calibrate_heavy_channels(*args)


# ---------------------------------------------------------------------------------------------------- label cache
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_labels_round_trip_within_half_a_step(rng, bits):
    gen, seed = rng
    x = torch.randn(200, 3, 16, generator=gen) * torch.rand(200, 3, 1, generator=gen) * 10
    codes, scales = quantize_labels(x, bits)
    assert codes.shape[-1] == (16 if bits == 8 else 8) and scales.dtype == torch.float16
    back = dequantize_labels(codes, scales, bits)
    qmax = 127 if bits == 8 else 7
    # Half a quantization step (the step is amax / qmax, at least 2^-14), plus the fp16 rounding of the step
    # (relative 2^-11, times up to qmax steps).
    step = (x.abs().amax(-1, keepdim=True) / qmax).clamp(min=2.0 ** -14)
    bound = step * (0.5 + qmax * 2.0 ** -11) + 1e-7
    assert ((back - x).abs() <= bound).all(), f"seed {seed}"
    assert (back - x).abs().max() > 0  # it really is quantized


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_label_cache_write_read_and_bytes(rng, bits):
    gen, seed = rng
    channels = torch.tensor([[0, 5, 9, 2], [7, 1, 3, 8]])
    cache = LabelCache(channels, num_pages=6, page_size=4, bits=bits, dtype=torch.float32 if bits == 16 else torch.float16)
    k_new = torch.randn(5, 2, 12, generator=gen)
    slots = torch.tensor([3, -1, 12, 23])  # one padding slot; k_new has one more (padded) row than slots
    cache.write(k_new, slots)
    written = [0, 2, 3]
    got = cache.read(torch.tensor([0, 3, 5]), torch.tensor([3, 0, 3]))
    want = k_new[written].gather(2, channels.expand(3, -1, -1))
    tol = 0 if bits == 16 else want.abs().amax() / (127 if bits == 8 else 7)
    assert (got - want).abs().max() <= tol, f"seed {seed}"
    untouched = cache.read(torch.tensor([1]), torch.tensor([0]))
    assert torch.equal(untouched, torch.zeros_like(untouched))
    # Byte accounting: everything the cache holds, and the per-token figure used to plan KV memory.
    per_token = LabelCache.bytes_per_token(2, 4, bits, torch.float32 if bits == 16 else torch.float16)
    assert cache.nbytes == per_token * 6 * 4
    assert per_token == {16: 2 * 4 * 4, 8: 2 * (4 + 2), 4: 2 * (2 + 2)}[bits]
    assert LabelCache.bytes_per_token(8, 16, 4) == 8 * 10 and LabelCache.bytes_per_token(8, 16, 16, torch.bfloat16) == 8 * 32


def test_label_cache_rejects_bad_inputs():
    channels = torch.tensor([[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="channels"):
        LabelCache(channels.float(), 4, 4)
    with pytest.raises(ValueError, match="r even"):
        LabelCache(channels, 4, 4, bits=4)
    with pytest.raises(ValueError, match="bits"):
        LabelCache(channels, 4, 4, bits=2)
    with pytest.raises(ValueError, match="num_pages"):
        LabelCache(channels, 0, 4)
    cache = LabelCache(channels, 4, 4)
    with pytest.raises(ValueError, match="k_new"):
        cache.write(torch.randn(3, 3, 8), torch.arange(3))
    with pytest.raises(ValueError, match="head_dim"):
        cache.write(torch.randn(3, 2, 4), torch.arange(3))
    with pytest.raises(ValueError, match="slot_mapping"):
        cache.write(torch.randn(3, 2, 8), torch.arange(4))
    with pytest.raises(ValueError, match="config.r"):
        LabelCache.from_config(DoubleSparsityConfig(r=4), channels, 4, 4)


# ---------------------------------------------------------------------------------------------------- label scores
@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_label_scores_match_float64(rng, reduce):
    gen, seed = rng
    s = Setup(gen, [5, 30], page_size=4)
    cfg = DoubleSparsityConfig(r=4, budget=8, sink_tokens=2, recent_tokens=3, group_reduce=reduce)
    scores = label_scores(s.q, s.labels, s.block_table, s.seq_lens, 32, cfg, backend="cpu")
    assert scores.shape == (2, 2, 32)
    for b, n in enumerate(s.lens):
        group = s.hq // s.hkv
        ql = s.q[b].view(s.hkv, group, -1).double()
        want = torch.stack([torch.einsum("gr,nr->gn", ql[h][:, s.heavy[h]], s.keys[b][:, h, s.heavy[h]].double())
                            for h in range(s.hkv)])
        want = want.amax(1) if reduce == "max" else want.sum(1)
        middle = slice(2, n - 3)
        torch.testing.assert_close(scores[b, :, middle].double(), want[:, middle], atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
        assert torch.isposinf(scores[b, :, :2]).all() and torch.isposinf(scores[b, :, n - 3 : n]).all()
        assert torch.isneginf(scores[b, :, n:]).all()


@pytest.mark.skipif(not TRITON_RUNS, reason="triton cannot run here")
@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("share, reduce", [(True, "max"), (True, "sum"), (False, "max")])
def test_triton_label_scores_match_torch(rng, bits, share, reduce):
    gen, seed = rng
    s = Setup(gen, [1, 19, 70], page_size=16 if bits == 4 else 1, bits=bits).to(DEVICE)
    cfg = DoubleSparsityConfig(r=4, budget=8, sink_tokens=1, recent_tokens=2, share_kv_group=share, group_reduce=reduce)
    want = label_scores(s.q, s.labels, s.block_table, s.seq_lens, 75, cfg, backend="cpu")
    got = label_scores(s.q, s.labels, s.block_table, s.seq_lens, 75, cfg, backend="triton")
    assert got.shape == (3, 2 if share else 6, 75)
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)) and torch.equal(torch.isneginf(got), torch.isneginf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], atol=1e-4, rtol=1e-5, msg=f"seed {seed}")


# ---------------------------------------------------------------------------------------------------- selection
def test_topk_token_indices_against_brute_force(rng):
    gen, seed = rng
    scores = torch.randn(3, 2, 20, generator=gen)
    scores[0, :, 15:] = float("-inf")  # a short row
    budgets = torch.tensor([4, 0, 9])
    indices, counts = topk_token_indices(scores, budgets, 9)
    assert indices.dtype == counts.dtype == torch.int32 and indices.shape == (3, 2, 9)
    for b in range(3):
        for h in range(2):
            k = int(budgets[b])
            assert counts[b, h] == k
            want = scores[b, h].argsort(descending=True)[:k].sort().values
            assert indices[b, h, :k].tolist() == want.tolist(), f"seed {seed}"
            assert (indices[b, h, k:] == 0).all()


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_selection_recall_with_planted_heavy_channels(rng, bits):
    """With heavy channels carrying most of q.k (8 of 64 channels, 8x larger in q and k: 99.8% of its variance), the
    label top-k recovers the exact top-k outside the always-kept sink and recent tokens with recall >= 0.9 (0.85 for
    4-bit labels, whose rounding error is about a tenth of a label)."""
    gen, seed = rng
    s = Setup(gen, [300, 517], head_dim=64, r=8, bits=bits, page_size=16, heavy_scale=8.0)
    cfg = DoubleSparsityConfig(r=8, budget=64, sink_tokens=4, recent_tokens=8, dense_below=256, label_bits=bits)
    sel = select_tokens(s.q, s.labels, s.heavy, s.block_table, s.seq_lens, cfg)
    assert sel.kv_block_size == 1 and sel.heads == s.hkv and sel.kv_len == 517
    hits = total = 0
    for b, n in enumerate(s.lens):
        exact = s.true_scores(b)
        exact[:, :4] = exact[:, n - 8 :] = float("inf")
        for h in range(s.hkv):
            count = int(sel.kv_num_blocks[b, h, 0])
            chosen = sel.kv_indices[b, h, 0, :count]
            assert count == 64 and (chosen[1:] > chosen[:-1]).all()
            assert set(range(4)) | set(range(n - 8, n)) <= set(chosen.tolist())  # sink and recent always kept
            oracle = set(exact[h].topk(64).indices.tolist()) - set(range(4)) - set(range(n - 8, n))
            hits += len(oracle & set(chosen.tolist()))
            total += len(oracle)
    assert hits / total >= (0.85 if bits == 4 else 0.9), f"seed {seed}: recall {hits / total:.3f}"


def test_dense_below_threshold(rng):
    gen, seed = rng
    s = Setup(gen, [40, 100])
    cfg = DoubleSparsityConfig(r=4, budget=16, sink_tokens=2, recent_tokens=2, dense_below=64)
    sel = select_tokens(s.q, s.labels, s.heavy, s.block_table, s.seq_lens, cfg)
    assert sel.kv_num_blocks[0].flatten().tolist() == [40, 40]  # below the threshold: every token
    assert sel.kv_indices[0, 0, 0, :40].tolist() == list(range(40))
    assert sel.kv_num_blocks[1].flatten().tolist() == [16, 16]
    all_short = DoubleSparsityConfig(r=4, budget=16, sink_tokens=2, recent_tokens=2, dense_below=101)
    assert select_tokens(s.q, s.labels, None, s.block_table, s.seq_lens, all_short) is None  # dense decode


@pytest.mark.parametrize("backend", BACKENDS)
def test_budget_at_least_the_length_equals_dense_exactly(rng, backend):
    gen, seed = rng
    s = Setup(gen, [1, 23, 50], page_size=8).to(DEVICE)
    cfg = DoubleSparsityConfig(r=4, budget=64, sink_tokens=1, recent_tokens=1, dense_below=0)
    sel = select_tokens(s.q, s.labels, s.heavy.to(DEVICE), s.block_table, s.seq_lens, cfg, backend=backend)
    assert sel.kv_num_blocks.flatten().tolist() == [1, 1, 23, 23, 50, 50]
    sparse = sparse_decode_attention(s.q, s.k_cache, s.v_cache, s.block_table, s.seq_lens, sel, backend=backend)
    dense = sparse_decode_attention(s.q, s.k_cache, s.v_cache, s.block_table, s.seq_lens, backend=backend)
    assert torch.equal(sparse[0], dense[0]) and torch.equal(sparse[1], dense[1]), f"seed {seed}"


def test_per_query_head_selection(rng):
    gen, seed = rng
    s = Setup(gen, [90])
    cfg = DoubleSparsityConfig(r=4, budget=12, sink_tokens=1, recent_tokens=1, dense_below=0, share_kv_group=False)
    sel = select_tokens(s.q, s.labels, s.heavy, s.block_table, s.seq_lens, cfg)
    assert sel.heads == s.hq and sel.kv_num_blocks.flatten().tolist() == [12] * s.hq
    out, lse = sparse_decode_attention(s.q, s.k_cache, s.v_cache, s.block_table, s.seq_lens, sel)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_select_tokens_rejects_bad_inputs(rng):
    gen, _ = rng
    s = Setup(gen, [20, 30])
    cfg = DoubleSparsityConfig(r=4, budget=8, sink_tokens=1, recent_tokens=1, dense_below=0)
    args = (s.q, s.labels, s.heavy, s.block_table, s.seq_lens)
    for match, changed in [
        ("q must be", (s.q[0],) + args[1:]),
        ("label_cache must be", (s.q, s.labels.labels) + args[2:]),
        ("channels must equal", (s.q, s.labels, s.heavy.flip(-1)) + args[3:]),
        ("multiple of the label cache", (s.q[:, :5],) + args[1:]),
        ("seq_lens must lie", args[:4] + (torch.tensor([20, 999], dtype=torch.int32),)),
        ("block_table must be int32", args[:3] + (s.block_table.float(), s.seq_lens)),
    ]:
        with pytest.raises(ValueError, match=match):
            select_tokens(*changed, cfg)
    with pytest.raises(ValueError, match="config.r"):
        select_tokens(*args, DoubleSparsityConfig(r=8, budget=16, recent_tokens=4, dense_below=0))
    with pytest.raises(ValueError, match="config must be"):
        select_tokens(*args, {"r": 4})
    with pytest.raises(ValueError, match="max_seq_len"):
        select_tokens(*args, cfg, max_seq_len=25)


# ---------------------------------------------------------------------------------------------------- C++ selection
def _torch_selection(s, cfg, labels, width):
    scores = label_scores(s.q, labels, s.block_table, s.seq_lens, max(s.lens), cfg, backend="reference")
    return topk_token_indices(scores, cfg.token_budgets(s.seq_lens), width)


@pytest.mark.parametrize("share, reduce", [(True, "max"), (True, "sum"), (False, "max")])
@pytest.mark.parametrize("r, lens, threads, hq", [(4, [3, 40, 150], None, 6), (16, [5, 2100, 4500], 1, 6),
                                                  (16, [5, 2100, 4500], 2, 6), (32, [7, 1500], 1, 16),
                                                  (24, [7, 1500], 1, 6)])
def test_cpp_decode_select_matches_torch(rng, share, reduce, r, lens, threads, hq):
    """The C++ selection (scores read from the pages, top-k in one pass) keeps what PyTorch's label scores and
    top-k keep: sink and recent tokens, rows no longer than the budget, the best others (continuous scores: no
    ties). Long rows on two threads are scored in chunks of tokens in parallel; on one thread item by item. Labels
    of 16-multiple widths take 16 tokens at a time (AVX-512), of 8-multiple widths 8 at a time (AVX2), groups of
    more query heads than a pass holds in passes."""
    from sparse_attn.ops.extension import decode_select_cpu

    gen, seed = rng
    s = Setup(gen, lens, r=r, page_size=8, hq=hq, head_dim=max(32, r))  # 16 query heads: groups of 8
    budget = 24 if max(lens) < 1000 else 700
    cfg = DoubleSparsityConfig(r=r, budget=budget, min_budget=24, sink_tokens=2, recent_tokens=5, dense_below=0,
                               share_kv_group=share, group_reduce=reduce)
    width = cfg.max_token_budget(max(lens))
    want_idx, want_cnt = _torch_selection(s, cfg, s.labels, width)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or before)
        got_idx, got_cnt = decode_select_cpu(s.q, s.labels.labels, s.labels.channels, s.block_table, s.seq_lens,
                                             cfg.token_budgets(s.seq_lens), width, sink=2, recent=5, per_group=share,
                                             reduce_max=reduce == "max")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got_cnt, want_cnt), f"seed {seed}"
    for b in range(len(lens)):
        for h in range(got_idx.shape[1]):
            n = int(got_cnt[b, h])
            assert got_idx[b, h, :n].tolist() == want_idx[b, h, :n].tolist(), f"seed {seed}, row {b}, {h}"
            assert (got_idx[b, h, n:] == 0).all()


@pytest.mark.parametrize("bits, r, lens", [(8, 16, [5, 2100, 4500]), (8, 32, [7, 1500]), (4, 16, [3, 40, 150]),
                                          (4, 6, [300])])
def test_cpp_decode_select_reads_quantized_labels(rng, bits, r, lens):
    """int8 and int4 labels are scored in the same C++ pass as code * scale: the selection equals PyTorch's over the
    dequantized labels (and select_tokens takes that pass for a quantized cache)."""
    from sparse_attn.ops.extension import decode_select_cpu

    gen, seed = rng
    s = Setup(gen, lens, r=r, page_size=8, head_dim=max(32, r), bits=bits)
    cfg = DoubleSparsityConfig(r=r, budget=24 if max(lens) < 1000 else 700, min_budget=24, sink_tokens=2,
                               recent_tokens=5, dense_below=0, label_bits=bits)
    width = cfg.max_token_budget(max(lens))
    want_idx, want_cnt = _torch_selection(s, cfg, s.labels, width)
    got_idx, got_cnt = decode_select_cpu(s.q, s.labels.labels, s.labels.channels, s.block_table, s.seq_lens,
                                         cfg.token_budgets(s.seq_lens), width, sink=2, recent=5,
                                         label_scales=s.labels.scales, label_bits=bits)
    assert torch.equal(got_cnt, want_cnt), f"seed {seed}"
    assert torch.equal(got_idx, want_idx), f"seed {seed}"
    mask = select_tokens(s.q, s.labels, None, s.block_table, s.seq_lens, cfg, backend="cpu")
    assert torch.equal(mask.kv_indices[:, :, 0], got_idx) and torch.equal(mask.kv_num_blocks[:, :, 0], got_cnt)
    with pytest.raises(RuntimeError, match="label_scales must be given"):
        decode_select_cpu(s.q, s.labels.labels, s.labels.channels, s.block_table, s.seq_lens,
                          cfg.token_budgets(s.seq_lens), width, sink=2, recent=5, label_bits=bits)
    with pytest.raises(RuntimeError, match="labels"):  # codes of the other width
        decode_select_cpu(s.q, s.labels.labels.view(torch.uint8 if bits == 8 else torch.int8), s.labels.channels,
                          s.block_table, s.seq_lens, cfg.token_budgets(s.seq_lens), width, sink=2, recent=5,
                          label_scales=s.labels.scales, label_bits=bits)


def test_cpp_decode_select_exact_scores_on_pruned_slots(rng):
    """Exact top-k over KV-pruned page slots: the keys are unpacked as they are scored, so the selection equals the
    one made on the unpacked keys."""
    from sparse_attn.decode.pruned_pages import PrunedSlotFormat
    from sparse_attn.ops.extension import decode_select_cpu

    gen, seed = rng
    s = Setup(gen, [90, 33], page_size=8)
    fmt = PrunedSlotFormat.for_sparsity(s.head_dim, 0.5, torch.float32)
    slots = fmt.pack(s.k_cache, s.v_cache)  # [P, page, Hkv, width]
    k_unpacked, _ = fmt.unpack(slots)
    cfg = DoubleSparsityConfig(r=s.head_dim, budget=16, min_budget=16, sink_tokens=1, recent_tokens=3, dense_below=0)
    everything = torch.arange(s.head_dim).expand(s.hkv, s.head_dim)
    budgets = cfg.token_budgets(s.seq_lens)
    got_idx, got_cnt = decode_select_cpu(s.q, slots, everything, s.block_table, s.seq_lens, budgets, 16, sink=1,
                                         recent=3, slot_keep=fmt.keep)
    want_idx, want_cnt = decode_select_cpu(s.q, k_unpacked, everything, s.block_table, s.seq_lens, budgets, 16, sink=1,
                                           recent=3)
    assert torch.equal(got_cnt, want_cnt) and torch.equal(got_idx, want_idx), f"seed {seed}"
    exact = LabelCache.over(k_unpacked, everything)
    torch_idx, _ = _torch_selection(s, cfg, exact, 16)
    assert torch.equal(got_idx, torch_idx), f"seed {seed}"


def test_cpp_decode_select_checks_its_arguments(rng):
    from sparse_attn.ops.extension import extension

    gen, _ = rng
    s = Setup(gen, [20], page_size=8)
    args = dict(q=s.q, labels=s.labels.labels.flatten(0, 1), channels=s.labels.channels, block_table=s.block_table,
                page_size=8, kv_lens=s.seq_lens, budgets=torch.tensor([8], dtype=torch.int32), width=8, sink=1,
                recent=2)
    for overrides, message in [(dict(block_table=s.block_table + 50), "block_table"),
                               (dict(budgets=torch.tensor([9], dtype=torch.int32)), "budgets"),
                               (dict(channels=s.labels.channels + 40), "channels must lie"),
                               (dict(sink=-1), "non-negative")]:
        with pytest.raises(RuntimeError, match=message):
            extension().decode_select(**{**args, **overrides})
