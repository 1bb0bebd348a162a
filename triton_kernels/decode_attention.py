"""Sparse decode attention in Triton: one query token per sequence over a paged KV cache, split-K ("flash-decoding").

One program handles one (sequence, head, split). The head is a KV head serving its whole GQA group of query heads
(each K/V row is loaded once for the group) unless the selection lists tokens per query head, then one query head.
The program walks its split of the row's token list: the selected token ids (``kv_block_size`` tokens per id) or
every position below ``seq_len`` for dense decode, maps each token to ``block_table[b, pos // page_size]`` and loads
only those K/V rows. Softmax is online, in base 2, with fp32 accumulation.

With one split the program writes the final output; with more, it writes an fp32 partial ``(out, lse)`` per split
and ``_merge_splits`` combines them (the same math as ``sparse_attn.decode.merge_attention_states``). Splits divide
each row's own token count, so ragged batches stay balanced within a row and rows shorter than a split do no work
in the empty programs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e)


@triton.jit
def _decode_split_kernel(
    Q, K, V, BlockTable, SeqLens, SelIdx, SelCnt, Out, Lse,
    qk_scale,
    stride_qb, stride_qh, stride_qd,
    stride_kp, stride_ko, stride_kh, stride_kd,
    stride_vp, stride_vo, stride_vh, stride_vd,
    stride_tb, stride_tp,
    stride_ib, stride_ih, stride_in,
    stride_cb, stride_ch,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, SEL_BLOCK: tl.constexpr, HAS_SEL: tl.constexpr,
    HEADS_PER_PROG: tl.constexpr, KV_DIV: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    ph = tl.program_id(1)  # program head: a KV head (group of query heads) or one query head
    split = tl.program_id(2)
    kv_head = ph // KV_DIV
    seq_len = tl.load(SeqLens + b)
    if HAS_SEL:
        n_items = tl.load(SelCnt + b * stride_cb + ph * stride_ch) * SEL_BLOCK
    else:
        n_items = seq_len
    chunk = tl.cdiv(n_items, NUM_SPLITS)
    start = split * chunk
    end = tl.minimum(start + chunk, n_items)

    offs_g = tl.arange(0, BLOCK_G)  # query heads of this program, padded to a tl.dot operand
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < HEADS_PER_PROG
    d_ok = offs_d < HEAD_DIM
    heads = ph * HEADS_PER_PROG + offs_g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    k_head = K + kv_head.to(tl.int64) * stride_kh
    v_head = V + kv_head.to(tl.int64) * stride_vh
    table = BlockTable + b.to(tl.int64) * stride_tb

    # Online softmax in base 2 (qk_scale = scale * log2 e). A row with no key so far keeps m = -inf, l = 0;
    # m_use = 0 then keeps 2^(-inf - m_use) = 0 instead of NaN.
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        item = n0 + tl.arange(0, BLOCK_N)
        item_ok = item < end
        if HAS_SEL:
            block_id = tl.load(SelIdx + b * stride_ib + ph * stride_ih + (item // SEL_BLOCK) * stride_in,
                               mask=item_ok, other=0)
            pos = block_id * SEL_BLOCK + item % SEL_BLOCK
        else:
            pos = item
        ok = item_ok & (pos < seq_len)
        page = tl.load(table + (pos // PAGE_SIZE) * stride_tp, mask=ok, other=0).to(tl.int64)
        offset = (pos % PAGE_SIZE).to(tl.int64)
        kv_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(k_head + (page * stride_kp + offset * stride_ko)[:, None] + offs_d[None, :] * stride_kd,
                    mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        v = tl.load(v_head + (page * stride_vp + offset * stride_vo)[:, None] + offs_d[None, :] * stride_vd,
                    mask=kv_ok, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    tl.store(Lse + b * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=g_ok)


@triton.jit
def _merge_splits(
    PartOut, PartLse, Out, Lse,
    stride_ob, stride_oh, stride_od, stride_lb, stride_lh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """lse = M + log(sum_s w_s), out = sum_s w_s out_s / sum_s w_s with w_s = exp(lse_s - M); partials are contiguous."""
    row = tl.program_id(0)  # b * NUM_HEADS + h
    b, h = row // NUM_HEADS, row % NUM_HEADS
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(PartLse + row * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse - top)
    total = tl.sum(w, 0)
    parts = tl.load(PartOut + (row * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(w[:, None] * parts, 0) / tl.maximum(total, 1.1754943508222875e-38)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(Out.dtype.element_ty), mask=d_ok)
    # total 0: every split empty (lse -inf); a NaN total (a NaN split) stays NaN, as the split's own lse.
    lse_out = tl.where(total == 0.0, float("-inf"), top + tl.log(tl.where(total == 0.0, 1.0, total)))
    tl.store(Lse + b * stride_lb + h * stride_lh, lse_out)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_num_splits(device: torch.device, programs: int, max_tokens: int) -> int:
    """Enough splits for about two programs per SM, each reading at least 256 tokens (below that the merge costs
    more than the parallelism hides). 1 off the GPU. Uses only shapes: no device sync, CUDA-graph safe."""
    if device.type != "cuda":
        return 1
    wanted = -(-2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()) // max(programs, 1))
    return max(1, min(wanted, -(-max_tokens // 256), 64))


def decode_attention_fwd(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sel_indices: torch.Tensor | None,
    sel_counts: torch.Tensor | None,
    sel_block_size: int,
    scale: float,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[B, Hq, D]``; caches ``[num_pages, page_size, Hkv, D]`` (any strides); ``sel_indices [B|1, H|1, W]`` and
    ``sel_counts [B|1, H|1]`` (H = Hkv or Hq; stride-0 broadcasts welcome) or None for dense decode.

    Inputs are checked by ``sparse_attn.decode.sparse_decode_attention``. Returns out ``[B, Hq, D]`` (q's dtype) and
    lse ``[B, Hq]`` fp32.
    """
    batch, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    has_sel = sel_indices is not None
    per_query_head = has_sel and sel_indices.shape[1] == num_heads and group > 1
    prog_heads = num_heads if per_query_head else num_kv_heads
    heads_per_prog, kv_div = (1, group) if per_query_head else (group, 1)
    if has_sel:
        # A size-1 batch or head dimension is read with stride 0 (one list shared by all).
        sel_strides = [sel_indices.stride(0) if sel_indices.shape[0] > 1 else 0,
                       sel_indices.stride(1) if sel_indices.shape[1] > 1 else 0, sel_indices.stride(2)]
        cnt_strides = [sel_counts.stride(0) if sel_counts.shape[0] > 1 else 0,
                       sel_counts.stride(1) if sel_counts.shape[1] > 1 else 0]
        max_tokens = sel_indices.shape[-1] * sel_block_size
    else:
        sel_indices = sel_counts = seq_lens  # never read
        sel_strides, cnt_strides = [0, 0, 0], [0, 0]
        max_tokens = block_table.shape[1] * page_size
    if num_splits is None:
        num_splits = default_num_splits(q.device, batch * prog_heads, max_tokens)

    out = torch.empty_like(q)
    lse = torch.empty(batch, num_heads, dtype=torch.float32, device=q.device)
    if num_splits == 1:
        part_out, part_lse = out, lse
        out_strides = [out.stride(0), out.stride(1), 0, out.stride(2)]
        lse_strides = [lse.stride(0), lse.stride(1), 0]
    else:
        part_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
        out_strides, lse_strides = list(part_out.stride()), list(part_lse.stride())

    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = 64 if block_d <= 128 else 32
    _decode_split_kernel[(batch, prog_heads, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, sel_indices, sel_counts, part_out, part_lse,
        scale * LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_table.stride(),
        *sel_strides, *cnt_strides, *out_strides, *lse_strides,
        HEAD_DIM=head_dim, PAGE_SIZE=page_size, SEL_BLOCK=sel_block_size, HAS_SEL=has_sel,
        HEADS_PER_PROG=heads_per_prog, KV_DIV=kv_div, NUM_SPLITS=num_splits,
        BLOCK_G=max(16, triton.next_power_of_2(heads_per_prog)), BLOCK_N=block_n, BLOCK_D=block_d,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    if num_splits > 1:
        _merge_splits[(batch * num_heads,)](
            part_out, part_lse, out, lse, *out.stride(), *lse.stride(),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=triton.next_power_of_2(head_dim),
            num_warps=1,
        )
    return out, lse
