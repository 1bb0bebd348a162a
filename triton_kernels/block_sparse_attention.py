"""Block-sparse FlashAttention forward in Triton, over ragged (varlen) batches, keys varlen or read from pages.

One program computes one query tile of one (sequence, query head) and loops only over the KV blocks its mask row
keeps (``kv_num_blocks`` / ``kv_indices`` of :class:`sparse_attn.BlockSparseMask`), so work is proportional to the
blocks kept. Softmax is online, in base 2 (as in Triton's fused-attention tutorial), with fp32 accumulation.
Queries are the last ``q_len`` positions of a ``kv_len`` context: with ``causal`` row m sees keys ``<= kv_len - q_len + m``.

Keys are varlen (key t of sequence b at row ``cu_seqlens_k[b] + t``) or paged (``PAGED``: row
``block_table[b, t // PAGE_SIZE] * PAGE_SIZE + t % PAGE_SIZE`` of the page tensor viewed as rows, context length
``kv_lens[b]``): a KV tile loads its rows' page ids first, so pages of any size are read in place.

A query tile is one of the mask's query blocks, or a slice of it where the block is larger than the tile that fits on
chip (BLOCK_M divides q_block_size); KV blocks are likewise read in tiles of BLOCK_N keys. Both block sizes must be
powers of two >= 16 (the smallest ``tl.dot`` operand).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.attention import triton_interpreter_enabled

LOG2E = 1.4426950408889634  # log2(e)


@triton.jit
def _block_sparse_attn_fwd(
    Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k, kv_num_blocks, kv_indices, block_table, kv_lens, stride_bt,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_lh,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im, stride_iw,
    qk_scale, num_heads, group_size,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # Last query tiles first: under causality they read the most blocks, and the light ones then fill the tail.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // num_heads, bh % num_heads
    q_start = tl.load(cu_seqlens_q + b)
    q_len = tl.load(cu_seqlens_q + b + 1) - q_start
    if start_m >= q_len:  # the grid covers the longest sequence
        return
    if PAGED:
        k_start = 0
        kv_len = tl.load(kv_lens + b)
    else:
        k_start = tl.load(cu_seqlens_k + b)
        kv_len = tl.load(cu_seqlens_k + b + 1) - k_start
    kv_head = h // group_size  # GQA

    offs_m = start_m + tl.arange(0, BLOCK_M)  # query rows, local to the sequence
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # head_dim is padded to a power of two
    row_ok = offs_m < q_len

    # Token offsets in int64: T * H * D may pass 2**31.
    q_rows = Q + q_start.to(tl.int64) * stride_qt + h * stride_qh
    q = tl.load(q_rows + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_rows = K + kv_head * stride_kh
    v_rows = V + kv_head * stride_vh

    # This tile's mask row: the kept KV blocks, ascending.
    mask_row = start_m // Q_BLOCK
    n_blocks = tl.load(kv_num_blocks + b * stride_nb + h * stride_nh + mask_row * stride_nm)
    block_ids = kv_indices + b * stride_ib + h * stride_ih + mask_row * stride_im

    # Queries sit at absolute positions kv_len - q_len + m. A KV tile needs no mask when all its keys exist and all
    # lie at or before the tile's first query row: start_n + BLOCK_N <= unmasked_end.
    q_pos = kv_len - q_len + offs_m
    unmasked_end = kv_len
    if CAUSAL:
        unmasked_end = tl.minimum(kv_len, kv_len - q_len + start_m + 1)

    # Online softmax in base 2: softmax(s * scale) = 2^(s * qk_scale - m) / l with qk_scale = scale * log2(e),
    # m = running row max of s * qk_scale and l = running sum of 2^(s * qk_scale - m). When m grows to m', the old
    # terms are rescaled by alpha = 2^(m - m'). A row that has seen no key keeps m = -inf, l = 0 (no NaN: see m_safe).
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    tiles_per_block = KV_BLOCK // BLOCK_N
    for t in range(0, n_blocks * tiles_per_block):
        block = tl.load(block_ids + (t // tiles_per_block) * stride_iw)
        start_n = block * KV_BLOCK + (t % tiles_per_block) * BLOCK_N
        key_ok = start_n + offs_n < kv_len
        if PAGED:  # each key's page from the block table, then its row in the page tensor
            page = tl.load(block_table + b.to(tl.int64) * stride_bt + (start_n + offs_n) // PAGE_SIZE, mask=key_ok,
                           other=0)
            rows = page.to(tl.int64) * PAGE_SIZE + (start_n + offs_n) % PAGE_SIZE
        else:
            rows = k_start.to(tl.int64) + start_n + offs_n
        k = tl.load(k_rows + rows[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if start_n + BLOCK_N > unmasked_end:  # boundary tile: keys past the sequence or above the causal diagonal
            allowed = key_ok[None, :]
            if CAUSAL:
                allowed = allowed & (start_n + offs_n[None, :] <= q_pos[:, None])
            qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all keys masked so far: avoid -inf - (-inf)
        p = tl.math.exp2(qk * qk_scale - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        v = tl.load(v_rows + rows[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    # out = acc / l (0 for rows that saw no key); lse = ln(sum e^(s*scale)) = (m + log2(l)) * ln(2), -inf when l = 0.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # ln(2)
    o_rows = Out + q_start.to(tl.int64) * stride_ot + h * stride_oh
    tl.store(o_rows + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + h.to(tl.int64) * stride_lh + q_start + offs_m, lse, mask=row_ok)


def _tile_config(q_block_size: int, kv_block_size: int, block_d: int, elem_bytes: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for H100: a 128-row query tile on two warpgroups where registers
    allow, KV tiles of 64 keys from head_dim 128 up, and as many K/V pipeline stages (up to 3) as shared memory holds."""
    block_m = min(q_block_size, 128 if block_d <= 128 else 64)
    block_n = min(kv_block_size, 128 if block_d <= 64 else 64)
    num_warps = 8 if block_m >= 128 or block_d >= 256 else 4
    # Shared memory holds the Q tile and one K and one V tile per stage; stay under 200 KiB of the H100's 227 KiB.
    smem = lambda stages: (block_m + 2 * stages * block_n) * block_d * elem_bytes
    num_stages = next((s for s in (3, 2) if smem(s) <= 200 * 1024), 1)
    return block_m, block_n, num_warps, num_stages


def _check_block_size(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16 for the Triton kernel, got {value!r}")


def block_sparse_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    q_block_size: int,
    kv_block_size: int,
    causal: bool,
    scale: float,
    block_table: torch.Tensor | None = None,
    kv_lens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention forward over a ragged batch.

    q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]`` (any strides); ``cu_seqlens_q/k`` int32 ``[B+1]`` on q's device; or
    paged keys: k/v ``[num_pages, page_size, Hkv, D]`` (any strides), ``cu_seqlens_k`` None, ``block_table`` int32
    ``[B, max_pages]`` and ``kv_lens`` int32 ``[B]``;
    ``kv_num_blocks`` int32 ``[B, Hq, nq]`` and ``kv_indices`` int32 ``[B, Hq, nq, W]`` (stride-0 views welcome).
    Returns out ``[Tq, Hq, D]`` in q's dtype and lse ``[Hq, Tq]`` fp32 (natural log); rows that see no key get out 0
    and lse -inf. Inputs are assumed checked by :func:`sparse_attn.block_sparse_attention`; this checks only what the
    kernel itself needs.
    """
    _check_block_size("q_block_size", q_block_size)
    _check_block_size("kv_block_size", kv_block_size)
    total_q, num_heads, head_dim = q.shape
    paged = block_table is not None
    page_size = k.shape[1] if paged else 1
    if paged:
        k, v = k.flatten(0, 1), v.flatten(0, 1)  # rows of slots
    num_kv_heads = k.shape[1]
    if head_dim > 256:
        raise ValueError(f"head_dim must be <= 256 for the Triton kernel, got {head_dim}")
    if q.device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(f"q is on {q.device}: the Triton kernel needs CUDA tensors, or TRITON_INTERPRET=1 for CPU")
    index_args = [("cu_seqlens_q", cu_seqlens_q), ("kv_num_blocks", kv_num_blocks), ("kv_indices", kv_indices)]
    index_args += [("block_table", block_table), ("kv_lens", kv_lens)] if paged else [("cu_seqlens_k", cu_seqlens_k)]
    for name, t in index_args:
        if t.dtype != torch.int32 or t.device != q.device:
            raise ValueError(f"{name} must be int32 on {q.device}, got {t.dtype} on {t.device}")
    batch = cu_seqlens_q.numel() - 1
    if kv_num_blocks.shape[:2] != (batch, num_heads) or kv_indices.shape[:3] != kv_num_blocks.shape:
        raise ValueError(
            f"kv_num_blocks {tuple(kv_num_blocks.shape)} / kv_indices {tuple(kv_indices.shape)} must be "
            f"[{batch}, {num_heads}, nq] / [{batch}, {num_heads}, nq, W]"
        )
    if batch * num_heads > 65535:
        raise ValueError(f"batch * num_heads = {batch * num_heads} exceeds the kernel's grid limit of 65535")

    out = torch.empty((total_q, num_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((num_heads, total_q), dtype=torch.float32, device=q.device)
    if total_q == 0 or max_seqlen_q == 0:
        return out, lse
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = _tile_config(q_block_size, kv_block_size, block_d, q.element_size())
    grid = (triton.cdiv(max_seqlen_q, block_m), batch * num_heads)
    dummy = cu_seqlens_q  # stands in for the pointers of the layout not used
    _block_sparse_attn_fwd[grid](
        q, k, v, out, lse, cu_seqlens_q, dummy if paged else cu_seqlens_k, kv_num_blocks, kv_indices,
        block_table if paged else dummy, kv_lens if paged else dummy, block_table.stride(0) if paged else 0,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), lse.stride(0),
        *kv_num_blocks.stride(), *kv_indices.stride(),
        scale * LOG2E, num_heads, num_heads // num_kv_heads,
        HEAD_DIM=head_dim, CAUSAL=bool(causal), Q_BLOCK=q_block_size, KV_BLOCK=kv_block_size,
        PAGED=paged, PAGE_SIZE=page_size,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse
