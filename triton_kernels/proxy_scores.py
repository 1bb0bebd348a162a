"""Pooled block probabilities in Triton: the estimation step of head-proxy attention (ProxyAttn).

For a set of query rows grouped by query block, the kernel computes the softmax attention probabilities of every row
over the keys (causal at token level) and pools them to one score per (head, query block, KV block):
- max pooling (``MEAN=False``): ``max`` over the block's rows and keys of ``P[m, n]``, how ProxyAttn scores blocks
  from its strided proxy queries;
- mean pooling (``MEAN=True``): the block's attention mass ``sum_n P[m, n]`` averaged over the rows, which ProxyAttn's
  per-head budget reads on the last query block.

One program handles one (query block, head): a first pass over the visible keys finds each row's softmax max and
normaliser online (base 2, as in the attention kernel), a second pass turns scores into probabilities and pools them.
Keys are loaded in tiles of BLOCK_N (a KV block is one or several tiles), so the on-chip tile stays small at large
head sizes and blocks; num_stages is chosen so the pipelined K tiles fit shared memory.
The probability matrix never reaches memory: the output is ``[H, num_q_blocks, num_kv_blocks]`` fp32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e)


@triton.jit
def _masked_scores(q, k_rows, start, offs_n, offs_d, d_ok, row_ok, pos, kv_len, stride_kt, stride_kd, qk_scale,
                   CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Scores ``q . k * qk_scale`` of the rows against the key tile at ``start``, -inf where a key is missing or
    causally hidden."""
    key = start + offs_n
    k = tl.load(k_rows + key.to(tl.int64)[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=(key < kv_len)[:, None] & d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    allowed = row_ok[:, None] & (key < kv_len)[None, :]
    if CAUSAL:
        allowed = allowed & (key[None, :] <= pos[:, None])
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _pooled_block_probs(
    Q, K, Pos, Out,
    stride_qh, stride_qb, stride_qr, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_pb, stride_pr,
    stride_oh, stride_ob, stride_oj,
    kv_len, num_kv_blocks, heads_per_kv, qk_scale,
    HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, MEAN: tl.constexpr, PRECISION: tl.constexpr,
):
    i = tl.program_id(0)  # query block
    h = tl.program_id(1)  # head of Q
    offs_r = tl.arange(0, ROWS)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    # Absolute position of each row; -1 marks an empty slot (blocks with fewer rows than ROWS).
    pos = tl.load(Pos + i * stride_pb + offs_r * stride_pr)
    row_ok = pos >= 0
    q = tl.load(Q + h * stride_qh + i * stride_qb + offs_r[:, None] * stride_qr + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_rows = K + (h // heads_per_kv) * stride_kh

    n_blocks = num_kv_blocks
    if CAUSAL:  # blocks past the block's last row hold no visible key
        n_blocks = tl.minimum(n_blocks, tl.max(pos, 0) // KV_BLOCK + 1)

    # Pass 1: running max m and normaliser l of 2^(s * qk_scale) per row.
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    for t in range(0, n_blocks * (KV_BLOCK // BLOCK_N)):
        s = _masked_scores(q, k_rows, t * BLOCK_N, offs_n, offs_d, d_ok, row_ok, pos, kv_len, stride_kt, stride_kd,
                           qk_scale, CAUSAL, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
        m_i = m_new

    # Pass 2: probabilities 2^(s*qk_scale - m) / l, pooled per KV block.
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
    n_rows = tl.maximum(tl.sum(row_ok.to(tl.float32), 0), 1.0)
    for j in range(0, n_blocks):
        value = 0.0
        for u in range(0, KV_BLOCK // BLOCK_N):
            s = _masked_scores(q, k_rows, j * KV_BLOCK + u * BLOCK_N, offs_n, offs_d, d_ok, row_ok, pos, kv_len,
                               stride_kt, stride_kd, qk_scale, CAUSAL, PRECISION)
            p = tl.math.exp2(s - m_safe[:, None]) * inv_l[:, None]  # exp2(-inf) = 0 for hidden keys
            if MEAN:
                value += tl.sum(tl.sum(p, 1), 0) / n_rows
            else:
                value = tl.maximum(value, tl.max(tl.max(p, 1), 0))
        tl.store(Out + h * stride_oh + i * stride_ob + j * stride_oj, value)


def _tile_config(kv_block: int, block_d: int, rows: int, elem_bytes: int) -> tuple[int, int]:
    """(BLOCK_N, num_stages): key tiles of at most 64 keys (32 from head_dim 256 up), and as many pipeline stages (up
    to 3) as keep the Q tile and the staged K tiles under 96 KiB of shared memory on every architecture."""
    block_n = min(kv_block, 64 if block_d <= 128 else 32)
    smem = lambda stages: (rows + stages * block_n) * block_d * elem_bytes
    return block_n, next((s for s in (3, 2) if smem(s) <= 96 * 1024), 1)


def pooled_block_probs_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    kv_block_size: int,
    scale: float,
    causal: bool,
    mean: bool,
) -> torch.Tensor:
    """Pooled attention probabilities per (head, query block, KV block).

    q ``[H, nq, R, D]``: R query rows per query block (any strides); k ``[Tk, Hk, D]`` with H a multiple of Hk
    (head h reads KV head ``h // (H // Hk)``); pos int32 ``[nq, R]``: each row's absolute position, -1 for an empty
    slot. Returns fp32 ``[H, nq, ceil(Tk / kv_block_size)]``; blocks no row can see are 0.
    """
    if q.dim() != 4 or k.dim() != 3 or pos.shape != q.shape[1:3]:
        raise ValueError(f"q must be [H, nq, R, D], k [Tk, Hk, D], pos [nq, R]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(pos.shape)}")
    heads, nq, rows, head_dim = q.shape
    if heads % k.shape[1] or k.shape[2] != head_dim:
        raise ValueError(f"q heads {heads} must be a multiple of k heads {k.shape[1]} with the same head_dim")
    if kv_block_size < 16 or kv_block_size & (kv_block_size - 1):
        raise ValueError(f"kv_block_size must be a power of two >= 16 for the Triton kernel, got {kv_block_size}")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ValueError(f"q is on {q.device}: the Triton kernel needs CUDA tensors, or TRITON_INTERPRET=1 for CPU")
    if pos.dtype != torch.int32 or pos.device != q.device:
        raise ValueError(f"pos must be int32 on {q.device}, got {pos.dtype} on {pos.device}")
    kv_len = k.shape[0]
    nk = -(-kv_len // kv_block_size)
    out = torch.zeros(heads, nq, nk, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    # tl.dot needs at least 16 rows: pad the row slots with empty ones.
    padded_rows = max(16, triton.next_power_of_2(rows))
    if padded_rows != rows:
        q = torch.nn.functional.pad(q, (0, 0, 0, padded_rows - rows))
        pos = torch.nn.functional.pad(pos, (0, padded_rows - rows), value=-1)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n, num_stages = _tile_config(kv_block_size, block_d, padded_rows, q.element_size())
    _pooled_block_probs[(nq, heads)](
        q, k, pos, out,
        *q.stride(), *k.stride(), *pos.stride(), *out.stride(),
        kv_len, nk, heads // k.shape[1], scale * LOG2E,
        HEAD_DIM=head_dim, ROWS=padded_rows, KV_BLOCK=kv_block_size, BLOCK_N=block_n, BLOCK_D=block_d,
        CAUSAL=bool(causal), MEAN=bool(mean), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=num_stages,
    )
    return out
