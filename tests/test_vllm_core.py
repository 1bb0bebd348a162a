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
from sparse_attn.decode import DoubleSparsityConfig, LabelCache
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

    def __init__(self, rows, label_width, gen):
        self.rows = rows
        num_pages = sum(-(-s // PAGE) for _, s in rows) + 3
        # Unused slots hold NaN: a read from a wrong slot shows in the output.
        physical = torch.full((num_pages, PAGE, HKV, 2 * D + label_width), float("nan"))
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
        layer.write(self.kv_cache, torch.cat([self.k[r][list(p)] for r, p in new] + [pad(5)]),
                    torch.cat([self.v[r][list(p)] for r, p in new] + [pad(5)]), slot_mapping)
        return slot_mapping

    def run(self, layer: PagedAttentionLayer, gen, dense_below: int = 0) -> torch.Tensor:
        slot_mapping = self.fill(layer, gen)
        meta = plan_step(self.query_start_loc, [s for _, s in self.rows], self.block_table, slot_mapping,
                         page_size=PAGE, dense_below=dense_below, num_actual_tokens=self.num_new + 3)
        output = torch.full_like(self.query, float("nan"))
        layer.forward(self.query, self.kv_cache, meta, output)
        assert torch.all(output[self.num_new : self.num_new + 3] == 0)  # padding rows are zeroed
        assert torch.isnan(output[self.num_new + 3 :]).all()  # rows past num_actual_tokens are not written
        return output

    def row_query(self, r):
        start = self.query_start_loc[r]
        return self.query[start : self.query_start_loc[r + 1]]


def masked_reference(q, k, v, mask, scale):
    out, _ = attention_reference_varlen(q, k, v, [0, q.shape[0]], [0, k.shape[0]], mask, True, scale, torch.float64)
    return out


def selected_reference(q, k, v, config: DoubleSparsityConfig, channels, scale):
    """Decode over each KV group's top-k tokens, all in float64: scores ``max_h q_h[ch] . k[ch]`` over the group's
    query heads, sink and recent tokens forced in, k from the config's budget rule."""
    seq_len, group = k.shape[0], HQ // HKV
    q64, k64, v64 = q[0].double(), k.double(), v.double()
    budget = config.token_budget(seq_len)
    out = torch.empty(HQ, D, dtype=torch.float64, device=q.device)
    positions = torch.arange(seq_len, device=q.device)
    for h in range(HKV):
        ch = channels[h].to(q.device) if channels is not None else torch.arange(D, device=q.device)
        heads = range(h * group, (h + 1) * group)
        scores = torch.stack([k64[:, h, ch] @ q64[g, ch] for g in heads]).amax(0)
        protected = (positions < config.sink_tokens) | (positions >= seq_len - config.recent_tokens)
        keep = scores.masked_fill(protected, math.inf).topk(budget).indices
        for g in heads:
            p = torch.softmax(k64[keep, h] @ q64[g] * scale, 0)
            out[g] = p @ v64[keep, h]
    return out[None]


def check_against_reference(step: Step, output, prefill, decode, dense_below=0):
    """Compare every row with the float64 reference; returns how many rows the sparse setting changed."""
    scale = D ** -0.5
    changed = 0
    for r, (q_len, seq_len) in enumerate(step.rows):
        q, k, v = step.row_query(r), step.k[r], step.v[r]
        dense = seq_len < dense_below
        if not dense and q_len == 1 and isinstance(decode, DecodeSelection):
            expected = selected_reference(q, k, v, decode.config, decode.channels, scale)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_proxy_prefill_and_exact_top_k_decode(rng, backend):
    """The backend's defaults, scaled down: content-aware prefill blocks and decode over the exact top-k tokens."""
    gen, seed = rng
    step = Step(ROWS, 0, gen)
    prefill = HeadProxy(gamma=0.6, min_budget=16)
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
