"""Double Sparsity label scores in Triton: ``q[channels] . k_label`` for every cached token, through the block table.

One program scores BLOCK_N consecutive positions of one (sequence, head). The head is a KV head whose GQA group of
query heads is reduced (max or sum) into one score per token, or one query head (per-head selection). Labels are
read from the paged label cache in its stored form and dequantized in registers: unquantized floats, int8 codes, or
int4 codes packed two per byte (even channel in the low nibble, stored as code + 8), times a per-(token, head) fp16
scale. r is small (16-32), so the dot products are broadcast multiply-adds rather than ``tl.dot``.

Sink and recent positions score +inf, positions at or past the sequence length -inf: the top-k that follows needs
no other masking. Matches ``sparse_attn.decode.double_sparsity.label_scores``'s PyTorch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _label_scores_kernel(
    QLabel, Labels, Scales, BlockTable, SeqLens, Out,
    sink_tokens, recent_tokens, width,
    stride_qb, stride_qh, stride_qr,
    stride_lp, stride_lo, stride_lh, stride_lr,
    stride_sp, stride_so, stride_sh,
    stride_tb, stride_tp,
    stride_ob, stride_oh, stride_on,
    R: tl.constexpr, BITS: tl.constexpr, PAGE_SIZE: tl.constexpr, HEADS_PER_PROG: tl.constexpr,
    KV_DIV: tl.constexpr, REDUCE_MAX: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0)
    ph = tl.program_id(1)
    kv_head = ph // KV_DIV
    seq_len = tl.load(SeqLens + b)
    pos = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_seq = pos < seq_len
    page = tl.load(BlockTable + b.to(tl.int64) * stride_tb + (pos // PAGE_SIZE) * stride_tp,
                   mask=in_seq, other=0).to(tl.int64)
    offset = (pos % PAGE_SIZE).to(tl.int64)

    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    lab_ok = in_seq[:, None] & r_ok[None, :]
    rows = Labels + page * stride_lp + offset * stride_lo + kv_head * stride_lh
    if BITS == 16:
        labels = tl.load(rows[:, None] + offs_r[None, :] * stride_lr, mask=lab_ok, other=0.0).to(tl.float32)
    else:
        scale = tl.load(Scales + page * stride_sp + offset * stride_so + kv_head * stride_sh,
                        mask=in_seq, other=0.0).to(tl.float32)
        if BITS == 8:
            codes = tl.load(rows[:, None] + offs_r[None, :] * stride_lr, mask=lab_ok, other=0).to(tl.float32)
        else:
            packed = tl.load(rows[:, None] + (offs_r // 2)[None, :] * stride_lr, mask=lab_ok, other=0).to(tl.int32)
            codes = ((packed >> ((offs_r % 2) * 4)[None, :]) & 15).to(tl.float32) - 8.0
        labels = codes * scale[:, None]

    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < HEADS_PER_PROG
    heads = ph * HEADS_PER_PROG + offs_g
    q = tl.load(QLabel + b * stride_qb + heads[:, None] * stride_qh + offs_r[None, :] * stride_qr,
                mask=g_ok[:, None] & r_ok[None, :], other=0.0)
    s = tl.sum(q[:, None, :] * labels[None, :, :], axis=2)  # [BLOCK_G, BLOCK_N]
    if REDUCE_MAX:
        score = tl.max(tl.where(g_ok[:, None], s, float("-inf")), axis=0)
    else:
        score = tl.sum(s, axis=0)  # padded heads have q = 0
    protected = (pos < sink_tokens) | (pos >= seq_len - recent_tokens)
    score = tl.where(protected, float("inf"), score)
    score = tl.where(in_seq, score, float("-inf"))
    tl.store(Out + b * stride_ob + ph * stride_oh + pos * stride_on, score, mask=pos < width)


def label_scores_fwd(
    q_label: torch.Tensor,
    labels: torch.Tensor,
    scales: torch.Tensor | None,
    bits: int,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    width: int,
    sink_tokens: int,
    recent_tokens: int,
    share_kv_group: bool,
    reduce_max: bool,
) -> torch.Tensor:
    """q_label ``[B, Hq, r]`` (q at each head's channels, fp32); labels ``[num_pages, page_size, Hkv, r or r/2]``;
    scales ``[num_pages, page_size, Hkv]`` fp16 (None for bits=16). Returns fp32 ``[B, Hkv or Hq, width]``.

    Inputs are checked by ``sparse_attn.decode.double_sparsity.select_tokens``.
    """
    batch, num_heads, r = q_label.shape
    page_size, num_kv_heads = labels.shape[1], labels.shape[2]
    group = num_heads // num_kv_heads
    prog_heads, heads_per_prog, kv_div = (num_kv_heads, group, 1) if share_kv_group else (num_heads, 1, group)
    out = torch.empty(batch, prog_heads, width, dtype=torch.float32, device=q_label.device)
    if width == 0 or batch == 0:
        return out
    scale_strides = scales.stride() if scales is not None else (0, 0, 0)
    block_n = 64
    _label_scores_kernel[(batch, prog_heads, triton.cdiv(width, block_n))](
        q_label, labels, scales if scales is not None else labels, block_table, seq_lens, out,
        sink_tokens, recent_tokens, width,
        *q_label.stride(), *labels.stride(), *scale_strides, *block_table.stride(), *out.stride(),
        R=r, BITS=bits, PAGE_SIZE=page_size, HEADS_PER_PROG=heads_per_prog, KV_DIV=kv_div, REDUCE_MAX=reduce_max,
        BLOCK_G=triton.next_power_of_2(heads_per_prog), BLOCK_N=block_n, BLOCK_R=triton.next_power_of_2(r),
        num_warps=4,
    )
    return out
