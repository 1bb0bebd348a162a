"""The vLLM backend's paged core (``sparse_attn.vllm.paged_core``) on hand-built vLLM-shaped inputs, without vLLM.

Pages are vLLM's LBNHC layout ``[num_pages, page_size, Hkv, 2*D (+ r labels)]`` seen through the logical
``[num_pages, Hkv, page_size, C]`` view vLLM hands a layer; the block table is shuffled; one step mixes decode rows
(not contiguous in the step), a fresh prefill and a chunked prefill over cached context, plus padding tokens.
Every setting is compared with a float64 reference. Runs on DEVICE (CUDA when present: the GPU check of the
backend's attention path on a machine without vLLM).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from backends import BACKENDS, DEVICE
from sparse_attn.decode import DoubleSparsityConfig, LabelCache, write_tokens
from sparse_attn.decode.pruned_pages import PrunedSlotFormat
from sparse_attn.ops.reference import attention_reference_varlen
from sparse_attn.patterns import AShape, Dense, HeadProxy
from sparse_attn.vllm.paged_core import DecodeSelection, PagedAttentionLayer, plan_step

HQ, HKV, D, PAGE = 6, 2, 32, 16
# (q_len, seq_len): decode rows around a fresh prefill and a chunked prefill (54 cached tokens), so the decode rows
# are not contiguous in the step.
ROWS = [(1, 37), (23, 23), (1, 5), (16, 70), (1, 90), (1, 64)]
TOL = dict(atol=5e-5, rtol=2e-5)


class Step:
    """Pages holding each row's cached context, the step's new tokens (written by the layer) and 3 padding tokens."""

    def __init__(self, rows, label_width, gen, kv_width=2 * D):
        self.rows = rows
        num_pages = sum(-(-s // PAGE) for _, s in rows) + 3
        # Unused slots hold NaN: a read from a wrong slot shows in the output.
        physical = torch.full((num_pages, PAGE, HKV, kv_width + label_width), float("nan"))
        self.kv_cache = physical.to(DEVICE).permute(0, 2, 1, 3)  # vLLM's logical [pages, Hkv, page, C] view
        pages = torch.randperm(num_pages, generator=gen)
        width = max(-(-s // PAGE) for _, s in rows) + 1  # one spare column: vLLM's tables are wider than needed
        self.block_table = torch.zeros(len(rows), width, dtype=torch.int32)
        used = 0
        for r, (_, seq_len) in enumerate(rows):
            n = -(-seq_len // PAGE)
            self.block_table[r, :n] = pages[used : used + n]
            used += n
        self.block_table = self.block_table.to(DEVICE)
        self.k = [torch.randn(s, HKV, D, generator=gen).to(DEVICE) for _, s in rows]
        self.v = [torch.randn(s, HKV, D, generator=gen).to(DEVICE) for _, s in rows]
        self.query_start_loc = [0]
        for q_len, _ in rows:
            self.query_start_loc.append(self.query_start_loc[-1] + q_len)
        self.num_new = self.query_start_loc[-1]
        self.query = torch.randn(self.num_new + 5, HQ, D, generator=gen).to(DEVICE)

    def slots(self, r, positions):
        positions = torch.as_tensor(list(positions), device=DEVICE)
        return self.block_table[r, positions // PAGE].long() * PAGE + positions % PAGE

    def fill(self, layer: PagedAttentionLayer, gen):
        """Earlier steps write the cached context; this step writes the new tokens plus padding (slot -1) and two
        tokens past the slot mapping. Returns the step's slot mapping."""
        cached = [(r, range(s - q)) for r, (q, s) in enumerate(self.rows) if s > q]
        layer.write(self.kv_cache, torch.cat([self.k[r][list(p)] for r, p in cached]),
                    torch.cat([self.v[r][list(p)] for r, p in cached]), torch.cat([self.slots(r, p) for r, p in cached]))
        new = [(r, range(s - q, s)) for r, (q, s) in enumerate(self.rows)]
        pad = lambda n: torch.randn(n, HKV, D, generator=gen).to(DEVICE)  # noqa: E731
        slot_mapping = torch.cat([self.slots(r, p) for r, p in new] + [torch.full((3,), -1, device=DEVICE)])
        self.key = torch.cat([self.k[r][list(p)] for r, p in new] + [pad(5)])
        self.value = torch.cat([self.v[r][list(p)] for r, p in new] + [pad(5)])
        layer.write(self.kv_cache, self.key, self.value, slot_mapping)
        return slot_mapping

    def run(self, layer: PagedAttentionLayer, gen, dense_below: int = 0) -> torch.Tensor:
        """One step; the forward gets the step's new key/value, as vLLM passes them."""
        slot_mapping = self.fill(layer, gen)
        meta = plan_step(self.query_start_loc, [s for _, s in self.rows], self.block_table, slot_mapping,
                         page_size=PAGE, dense_below=dense_below, num_actual_tokens=self.num_new + 3)
        output = torch.full_like(self.query, float("nan"))
        layer.forward(self.query, self.kv_cache, meta, output, self.key, self.value)
        assert torch.all(output[self.num_new : self.num_new + 3] == 0)  # padding rows are zeroed
        assert torch.isnan(output[self.num_new + 3 :]).all()  # rows past num_actual_tokens are not written
        return output

    def row_query(self, r):
        start = self.query_start_loc[r]
        return self.query[start : self.query_start_loc[r + 1]]


def masked_reference(q, k, v, mask, scale):
    out, _ = attention_reference_varlen(q, k, v, [0, q.shape[0]], [0, k.shape[0]], mask, True, scale, torch.float64)
    return out


def selected_reference(q, k, v, config: DoubleSparsityConfig, channels, scale, label_keys=None):
    """Decode over each KV group's top-k tokens, all in float64: scores ``max_h q_h[ch] . k[ch]`` over the group's
    query heads (k: ``label_keys`` when the labels come from other keys than those attended), sink and recent tokens
    forced in, k from the config's budget rule."""
    seq_len, group = k.shape[0], HQ // HKV
    q64, k64, v64 = q[0].double(), k.double(), v.double()
    label64 = k64 if label_keys is None else label_keys.double()
    budget = config.token_budget(seq_len)
    out = torch.empty(HQ, D, dtype=torch.float64, device=q.device)
    positions = torch.arange(seq_len, device=q.device)
    for h in range(HKV):
        ch = channels[h].to(q.device) if channels is not None else torch.arange(D, device=q.device)
        heads = range(h * group, (h + 1) * group)
        scores = torch.stack([label64[:, h, ch] @ q64[g, ch] for g in heads]).amax(0)
        protected = (positions < config.sink_tokens) | (positions >= seq_len - config.recent_tokens)
        keep = scores.masked_fill(protected, math.inf).topk(budget).indices
        for g in heads:
            p = torch.softmax(k64[keep, h] @ q64[g] * scale, 0)
            out[g] = p @ v64[keep, h]
    return out[None]


def check_against_reference(step: Step, output, prefill, decode, dense_below=0, keys=None, values=None):
    """Compare every row with the float64 reference over ``keys``/``values`` (per row; default: the step's K/V as
    written); returns how many rows the sparse setting changed."""
    scale = D ** -0.5
    changed = 0
    keys, values = keys or step.k, values or step.v
    for r, (q_len, seq_len) in enumerate(step.rows):
        q, k, v = step.row_query(r), keys[r], values[r]
        dense = seq_len < dense_below
        if not dense and q_len == 1 and isinstance(decode, DecodeSelection):
            # Labels are written from the unpruned keys; exact scores read the keys as attended.
            labels = None if decode.channels is None else step.k[r]
            expected = selected_reference(q, k, v, decode.config, decode.channels, scale, label_keys=labels)
        else:
            pattern = Dense() if dense else (decode if q_len == 1 else prefill)
            mask = pattern.build_mask(q_lens=q_len, kv_lens=seq_len, num_heads=HQ, q_block_size=16, kv_block_size=16,
                                      q=q, k=k, scale=scale)
            expected = masked_reference(q, k, v, mask, scale)
        start = step.query_start_loc[r]
        torch.testing.assert_close(output[start : start + q_len].double(), expected, **TOL,
                                   msg=lambda m: f"row {r} ({q_len}, {seq_len}): {m}")
        changed += not torch.allclose(masked_reference(q, k, v, None, scale), expected, atol=1e-4)
    return changed


def label_config(**kw) -> DoubleSparsityConfig:
    return DoubleSparsityConfig(**{"sink_tokens": 2, "recent_tokens": 4, "min_budget": 8, "budget_fraction": 0.25,
                                   "dense_below": 0, **kw})


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_setting_matches_the_reference(rng, backend):
    gen, seed = rng
    step = Step(ROWS, 0, gen)
    layer = PagedAttentionLayer(HQ, HKV, D, D ** -0.5, block_size=16, op_backend=backend)
    output = step.run(layer, gen)
    assert check_against_reference(step, output, Dense(), Dense()) == 0, f"seed {seed}"
    stats = layer.stats.as_dict()
    assert stats["prefill"]["density"] == 1.0 and stats["decode"]["density"] == 1.0
    assert stats["prefill"]["rows"] == 2 and stats["decode"]["rows"] == 4 and stats["decode"]["sparse_rows"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_patterns_match_the_reference(rng, backend):
    """A-shape on both phases; rows shorter than dense_below (the 5- and 23-token rows) run dense."""
    gen, seed = rng
    step = Step(ROWS, 0, gen)
    pattern = AShape(sink_tokens=16, local_tokens=16)
    layer = PagedAttentionLayer(HQ, HKV, D, D ** -0.5, prefill=pattern, decode=pattern, block_size=16, op_backend=backend)
    output = step.run(layer, gen, dense_below=30)
    assert check_against_reference(step, output, pattern, pattern, dense_below=30) >= 2, f"seed {seed}"
    stats = layer.stats.as_dict()
    assert stats["prefill"]["sparse_rows"] == 1 and stats["prefill"]["density"] < 1.0
    assert stats["decode"]["sparse_rows"] == 3 and stats["decode"]["density"] < 1.0
    # The sparse chunk (16 queries at positions 54..69) starts off the 16-row block grid.
    assert stats["prefill"]["unaligned_chunks"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_proxy_prefill_and_exact_top_k_decode(rng, backend):
    """The backend's defaults, scaled down: content-aware prefill blocks and decode over the exact top-k tokens."""
    gen, seed = rng
    step = Step(ROWS, 0, gen)
    # gamma 0.2: the best of the 5 blocks of row (16, 70) always holds >= 1/5 of the mass, so each head keeps one
    # block besides the sink and the diagonal: at most 4 of 5, whatever the random inputs.
    prefill = HeadProxy(gamma=0.2, min_budget=16)
    decode = DecodeSelection(label_config(r=D))
    layer = PagedAttentionLayer(HQ, HKV, D, D ** -0.5, prefill=prefill, decode=decode, block_size=16, op_backend=backend)
    output = step.run(layer, gen)
    assert check_against_reference(step, output, prefill, decode) >= 3, f"seed {seed}"
    stats = layer.stats.as_dict()
    # 4 decode rows read max(8, ceil(L / 4)) of L tokens each (all 5 tokens of the shortest).
    read = sum(min(s, max(8, math.ceil(s / 4))) for q, s in ROWS if q == 1)
    assert stats["decode"]["density"] == pytest.approx(read / sum(s for q, s in ROWS if q == 1))
    assert stats["prefill"]["density"] < 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_sparsity_labels_live_in_the_page(rng, backend):
    """Labels (K at each KV head's r heavy channels) are written after K and V in the page, and decode selects
    tokens by them."""
    gen, seed = rng
    r, width = 6, 8  # the page is wider than this layer's r (another layer may use r = 8)
    step = Step(ROWS, width, gen)
    channels = torch.stack([torch.randperm(D, generator=gen)[:r] for _ in range(HKV)])
    decode = DecodeSelection(label_config(r=r), channels)
    layer = PagedAttentionLayer(HQ, HKV, D, D ** -0.5, decode=decode, block_size=16, label_width=width,
                                op_backend=backend)
    output = step.run(layer, gen)
    pages = step.kv_cache.transpose(1, 2)
    for row in range(len(ROWS)):
        slots = step.slots(row, range(ROWS[row][1]))
        stored = pages[slots // PAGE, slots % PAGE]  # [L, Hkv, 2D + width]
        torch.testing.assert_close(stored[..., :D], step.k[row])
        torch.testing.assert_close(stored[..., D : 2 * D], step.v[row])
        expected_labels = torch.stack([step.k[row][:, h, channels[h].to(DEVICE)] for h in range(HKV)], 1)
        torch.testing.assert_close(stored[..., 2 * D : 2 * D + r], expected_labels)
    assert check_against_reference(step, output, Dense(), decode) >= 3, f"seed {seed}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_sparsity_with_every_channel_and_token_is_dense(rng, backend):
    gen, seed = rng
    step = Step(ROWS, D, gen)
    channels = torch.stack([torch.randperm(D, generator=gen) for _ in range(HKV)])
    decode = DecodeSelection(label_config(r=D, budget_fraction=1.0), channels)
    layer = PagedAttentionLayer(HQ, HKV, D, D ** -0.5, decode=decode, block_size=16, label_width=D, op_backend=backend)
    output = step.run(layer, gen)
    assert check_against_reference(step, output, Dense(), Dense()) == 0, f"seed {seed}"
    assert layer.stats.as_dict()["decode"]["density"] == 1.0


# ---------------------------------------------------------------------------------------------------- KV pruning
def top_magnitude_reference(x: torch.Tensor, keep: int) -> torch.Tensor:
    """``x`` with all but its ``keep`` largest |x| per vector zeroed, decided in float64 by a threshold: entries
    above the keep-th largest magnitude, then equal ones from the lowest channel up."""
    mag = x.double().abs()
    threshold = mag.topk(keep, dim=-1).values[..., -1:]
    above = mag > threshold
    ties = mag == threshold
    kept = above | (ties & (ties.cumsum(-1) <= keep - above.sum(-1, keepdim=True)))
    assert bool((kept.sum(-1) == keep).all())
    return torch.where(kept, x, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 100, 128, 256])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.99])
def test_pruned_slots_round_trip_keeps_the_top_magnitudes(rng, dtype, head_dim, sparsity):
    gen, seed = rng
    fmt = PrunedSlotFormat.for_sparsity(head_dim, sparsity, dtype)
    k = torch.randn(9, HKV, head_dim, generator=gen).to(dtype)
    v = torch.randn(9, HKV, head_dim, generator=gen).to(dtype)
    k[0, 0] = 1.0  # all tied: the lowest channels win
    k[0, 1, : fmt.keep] = 50.0  # the low channels kept: all-ones bitmap bytes, a NaN bit pattern in the cache dtype
    v[1, 0] = 0.0  # kept entries that are zero
    k[1, 1, head_dim - 1] = -80.0  # the last channel (the top bit of the last bitmap byte)
    slots = fmt.pack(k, v)
    assert slots.dtype == dtype and slots.shape == (9, HKV, fmt.width)
    # Through a page of NaN-filled slots: written at scattered slots, gathered back.
    page = torch.full((4, 8, HKV, fmt.width), float("nan"), dtype=dtype)
    where = torch.randperm(32, generator=gen)[:9]
    write_tokens(page, where, slots)
    k_out, v_out = fmt.unpack(page.flatten(0, 1).index_select(0, where))
    assert torch.equal(k_out, top_magnitude_reference(k, fmt.keep)), f"seed {seed}"
    assert torch.equal(v_out, top_magnitude_reference(v, fmt.keep)), f"seed {seed}"
    if sparsity == 0.0:  # the dense layout, bit for bit
        assert fmt.keep == head_dim and torch.equal(slots, torch.cat([k, v], -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim, sparsity", [(64, 0.5), (100, 0.7), (24, 0.5), (128, 0.99)])
def test_pruned_slot_write_matches_pack(rng, dtype, head_dim, sparsity):
    """PrunedSlotFormat.write (one C++ pass on CPU pages, vLLM's strided views) stores exactly the bytes pack()
    makes, with ties (the lower channel wins), zeros, signed zeros, inf and NaN among the values; padding slots
    (-1) and extra rows are left alone."""
    from sparse_attn.ops.extension import extension_available

    if not extension_available("write_pruned_slots"):
        pytest.skip("sparse_attn._C is not built")
    gen, seed = rng
    fmt = PrunedSlotFormat.for_sparsity(head_dim, sparsity, dtype)
    k = torch.randint(-3, 4, (12, HKV, head_dim), generator=gen).to(dtype)  # many ties
    v = torch.randn(12, HKV, head_dim, generator=gen).to(dtype)
    k[0, 0, 3], k[1, 1, 0], k[2, 0, 5], v[3, 1, 7] = float("nan"), float("inf"), -0.0, float("-inf")
    label = 4  # a label column after the slot, as Double Sparsity pages have: never touched
    pages = torch.full((4, HKV, 8, fmt.width + label), 7.0, dtype=dtype).transpose(1, 2)
    want = pages.clone()
    slots = torch.tensor([5, -1, 30, 0, 17, 9, -1, 31, 12, 2])
    fmt.write(pages[..., : fmt.width], slots, k, v)
    write_tokens(want[..., : fmt.width], slots, fmt.pack(k[:10], v[:10]))
    same = (pages == want) | (pages.isnan() & want.isnan())
    assert bool(same.all()), f"seed {seed}: {int((~same).sum())} values differ"


@pytest.mark.parametrize("label_width, r", [(0, 0), (8, 8), (8, 5)])
def test_layer_write_stores_keys_values_and_labels(rng, label_width, r):
    """The layer's write (one C++ pass on CPU pages) stores what the op-by-op writes store: K | V by write_tokens,
    the label of each key at the layer's channels by LabelCache.write; label columns past r and padding slots are left
    alone. Key and value are views into one projection output, as vLLM passes them."""
    gen, seed = rng
    channels = torch.stack([torch.randperm(D, generator=gen)[:r] for _ in range(HKV)]) if r else None
    decode = DecodeSelection(DoubleSparsityConfig(r=r), channels) if r else Dense()
    layer = PagedAttentionLayer(HQ, HKV, D, 0.1, decode=decode, label_width=label_width)
    pages = torch.randn(5, PAGE, HKV, 2 * D + label_width, generator=gen)
    kv_cache, want = pages.clone().transpose(1, 2), pages.clone()
    qkv = torch.randn(7, HQ + 2 * HKV, D, generator=gen)
    key, value = qkv[:, HQ : HQ + HKV], qkv[:, HQ + HKV :]
    slots = torch.tensor([3, -1, 79, 16, 40, -1])
    layer.write(kv_cache, key, value, slots)
    write_tokens(want[..., : 2 * D], slots, key, value)
    if r:
        LabelCache.over(want[..., 2 * D : 2 * D + r], channels).write(key, slots)
    assert torch.equal(kv_cache.transpose(1, 2), want), f"seed {seed}"


def test_pruned_slot_sizes():
    fp16 = PrunedSlotFormat.for_sparsity(64, 0.5, torch.float16)
    # 32 + 32 values (128 B) and two 64-bit bitmaps (16 B) against 256 B dense; channel ids would take 192 B.
    assert (fp16.keep, fp16.width, fp16.nbytes, fp16.dense_nbytes) == (32, 72, 144, 256)
    assert PrunedSlotFormat.for_sparsity(64, 0.7, torch.float16).nbytes == 2 * 19 * 2 + 16
    assert PrunedSlotFormat.for_sparsity(64, 0.5, torch.float32).nbytes == 272
    assert PrunedSlotFormat.for_sparsity(100, 0.5, torch.float32).width == 100 + 7  # 2 x 13 bitmap bytes in 7 floats
    assert PrunedSlotFormat.for_sparsity(64, 0.0, torch.bfloat16).width == 128  # no bitmap at all
    with pytest.raises(ValueError, match="sparsity must be a number in"):
        PrunedSlotFormat.for_sparsity(64, 1.0, torch.float16)
    with pytest.raises(ValueError, match="a quantized cache cannot be pruned"):
        PrunedSlotFormat.for_sparsity(64, 0.5, torch.int8)
    with pytest.raises(ValueError, match=r"slots must be a tensor \[\.\.\., 72\]"):
        fp16.unpack(torch.zeros(3, 128, dtype=torch.float16))
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        fp16.pack(torch.zeros(2, 64), torch.zeros(3, 64))


def pruned_context(step: Step, keep: int, new_tokens_exact: bool = True):
    """Each row's K and V as the pruned layer attends them: cached tokens pruned, the step's own tokens exact."""
    def row(x, q_len):
        cached = x.shape[0] - q_len if new_tokens_exact else x.shape[0]
        return torch.cat([top_magnitude_reference(x[:cached], keep), x[cached:]])

    return ([row(k, q) for k, (q, _) in zip(step.k, step.rows)], [row(v, q) for v, (q, _) in zip(step.v, step.rows)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("setting", ["dense", "dense, new tokens read pruned", "a_shape", "top_k", "double_sparsity"])
def test_kv_pruning_attends_the_pruned_paged_context(rng, backend, setting):
    """Pages store every token pruned (50%); each row attends its cached context pruned and the step's own tokens
    exactly, through every attention path, equal to the float64 reference over those K/V."""
    gen, seed = rng
    fmt = PrunedSlotFormat.for_sparsity(D, 0.5, torch.float32)
    label_width, channels = 0, None
    prefill = decode = Dense()
    if setting == "a_shape":
        prefill = decode = AShape(sink_tokens=16, local_tokens=16)
    elif setting == "top_k":
        decode = DecodeSelection(label_config(r=D))
    elif setting == "double_sparsity":
        label_width = 8
        channels = torch.stack([torch.randperm(D, generator=gen)[:6] for _ in range(HKV)])
        decode = DecodeSelection(label_config(r=6), channels)
    step = Step(ROWS, label_width, gen, kv_width=fmt.width)
    exact_new = setting != "dense, new tokens read pruned"
    layer = PagedAttentionLayer(HQ, HKV, D, D ** -0.5, prefill=prefill, decode=decode, block_size=16,
                                label_width=label_width, kv_sparsity=0.5, kv_exact_new=exact_new, op_backend=backend)
    output = step.run(layer, gen)  # the step's new key/value passed, as vLLM passes them

    pages = step.kv_cache.transpose(1, 2)
    for row, (_, seq_len) in enumerate(ROWS):
        slots = step.slots(row, range(seq_len))
        stored = pages[slots // PAGE, slots % PAGE]  # [L, Hkv, slot width + labels]
        k, v = fmt.unpack(stored[..., : fmt.width])
        assert torch.equal(k, top_magnitude_reference(step.k[row], fmt.keep))
        assert torch.equal(v, top_magnitude_reference(step.v[row], fmt.keep))
        if channels is not None:  # labels: the unpruned key at the heavy channels
            expected = torch.stack([step.k[row][:, h, channels[h].to(DEVICE)] for h in range(HKV)], 1)
            assert torch.equal(stored[..., fmt.width : fmt.width + 6], expected)
    keys, values = pruned_context(step, fmt.keep, exact_new)
    check_against_reference(step, output, prefill, decode, keys=keys, values=values)
    if setting.startswith("dense"):  # pruning changed every row that reads pruned tokens, and only those
        for r, (q_len, seq_len) in enumerate(ROWS):
            start = step.query_start_loc[r]
            exact = masked_reference(step.row_query(r), step.k[r], step.v[r], None, D ** -0.5)
            same = torch.allclose(output[start : start + q_len].double(), exact, **TOL)
            assert same == (exact_new and q_len == seq_len), f"row {r}, seed {seed}"


@pytest.mark.parametrize("exact_new", [True, False])
def test_kv_pruning_new_tokens_cached_makes_answers_independent_of_chunking(rng, exact_new):
    """One prompt attended in one step and in chunks cut off the block grid (as vLLM's token budget cuts them): with
    the step's own tokens read as cached (pruned) every row attends the same K/V either way, so the outputs agree;
    with them read exactly, the later chunks' rows read the earlier chunks pruned and differ."""
    gen, seed = rng
    fmt = PrunedSlotFormat.for_sparsity(D, 0.5, torch.float32)
    n = 70
    k, v = (torch.randn(n, HKV, D, generator=gen).to(DEVICE) for _ in range(2))
    q = torch.randn(n, HQ, D, generator=gen).to(DEVICE)
    pages = -(-n // PAGE)
    table = torch.randperm(pages + 2, generator=gen)[:pages].to(torch.int32)[None].to(DEVICE)

    def attend(bounds):
        kv_cache = torch.zeros(pages + 2, PAGE, HKV, fmt.width).to(DEVICE).permute(0, 2, 1, 3)
        layer = PagedAttentionLayer(HQ, HKV, D, D ** -0.5, block_size=16, kv_sparsity=0.5, kv_exact_new=exact_new)
        out = torch.empty(n, HQ, D, device=DEVICE)
        for a, b in zip(bounds, bounds[1:]):
            positions = torch.arange(a, b, device=DEVICE)
            slots = table[0, positions // PAGE].long() * PAGE + positions % PAGE
            layer.write(kv_cache, k[a:b], v[a:b], slots)
            meta = plan_step([0, b - a], [b], table, slots, page_size=PAGE, dense_below=0)
            layer.forward(q[a:b], kv_cache, meta, out[a:b], k[a:b], v[a:b])
        return out

    whole, chunked = attend([0, n]), attend([0, 23, 41, n])
    assert torch.allclose(chunked[:23], whole[:23], **TOL)  # the first chunk is the same step either way
    assert torch.allclose(chunked, whole, **TOL) == (not exact_new), f"seed {seed}"


def test_kv_pruning_at_sparsity_zero_is_the_dense_page(rng):
    gen, seed = rng
    state = gen.get_state()
    pages, outputs = [], []
    for extra in ({}, {"kv_sparsity": 0.0}):
        gen.set_state(state)
        step = Step(ROWS, 0, gen)
        layer = PagedAttentionLayer(HQ, HKV, D, D ** -0.5, decode=DecodeSelection(label_config(r=D)), block_size=16,
                                    **extra)
        outputs.append(step.run(layer, gen))
        pages.append(step.kv_cache.view(torch.int32))  # bit patterns (unused slots hold NaN)
    assert torch.equal(pages[0], pages[1])
    assert torch.equal(outputs[0].view(torch.int32), outputs[1].view(torch.int32))


def test_step_planning_groups_rows_by_phase_and_length():
    block_table = torch.arange(12, dtype=torch.int32).view(6, 2)
    meta = plan_step([0, 1, 24, 25, 41, 42, 43], [37, 23, 5, 70, 90, 64], block_table, torch.zeros(43),
                     page_size=64, dense_below=30)
    groups = {(g.phase, g.dense): g for g in meta.groups}
    assert sorted(groups) == [("decode", False), ("decode", True), ("prefill", False), ("prefill", True)]
    decode = groups[("decode", False)]
    assert decode.rows == [0, 4, 5] and decode.token_range is None and decode.token_index.tolist() == [0, 41, 42]
    assert groups[("prefill", False)].token_range == (25, 41)
    table, lens = decode.row_pages()
    assert table.tolist() == [[0, 1], [8, 9], [10, 11]] and lens.tolist() == [37, 90, 64]
    assert meta.num_actual_tokens == meta.num_scheduled_tokens == 43
    # Decode rows may have their own threshold: rows 0 and 5 (37 and 64 tokens) fall below it too, row 4 (90) not.
    meta = plan_step([0, 1, 24, 25, 41, 42, 43], [37, 23, 5, 70, 90, 64], block_table, torch.zeros(43),
                     page_size=64, dense_below=30, decode_dense_below=80)
    groups = {(g.phase, g.dense): g.rows for g in meta.groups}
    assert groups[("decode", True)] == [0, 2, 5] and groups[("decode", False)] == [4]
    assert groups[("prefill", False)] == [3] and groups[("prefill", True)] == [1]
    with pytest.raises(ValueError, match="one entry more than seq_lens"):
        plan_step([0, 1], [3, 4], block_table, torch.zeros(1), page_size=64, dense_below=0)


def test_bad_layer_settings_are_refused():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        PagedAttentionLayer(6, 4, D, 1.0)
    channels = torch.zeros(HKV, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="r <= label_width=4"):
        PagedAttentionLayer(HQ, HKV, D, 1.0, decode=DecodeSelection(label_config(r=8), channels), label_width=4)
    layer = PagedAttentionLayer(HQ, HKV, D, 1.0)
    with pytest.raises(ValueError, match=r"kv_cache must be \[num_pages, Hkv=2, page_size, 2\*32\+0\]"):
        layer.page_views(torch.zeros(4, HKV, PAGE, 2 * D + 8))
    pruned = PagedAttentionLayer(HQ, HKV, D, 1.0, kv_sparsity=0.5)
    with pytest.raises(ValueError, match=r"page_size, 34 \(K and V of 32 pruned to 16 values\)\+0\]"):
        pruned.page_views(torch.zeros(4, HKV, PAGE, 2 * D))
    with pytest.raises(ValueError, match="sparsity must be a number in"):
        PagedAttentionLayer(HQ, HKV, D, 1.0, kv_sparsity=1.0)
    labels = torch.zeros(4, PAGE, HKV, 8)
    with pytest.raises(ValueError, match=r"channels must be an integer tensor \[Hkv, r\] = \(2, 8\)"):
        LabelCache.over(labels, channels[:, :4])
    with pytest.raises(ValueError, match="non-negative channel ids"):
        LabelCache.over(labels, channels - 1)


def test_core_does_not_import_vllm(tmp_path):
    code = "import sys, sparse_attn.vllm.paged_core; print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip() == "[]"
