"""Block-sparse attention in PyTorch (any device PyTorch runs on), with work proportional to the blocks kept.

The "cpu" backend uses it where the C++ kernel (``sparse_attn._C.block_sparse_attention_cpu``, several times faster)
is not built or the tensors are not on the CPU; tests call it directly as a second implementation of the same op.

For each sequence and a chunk of query blocks, the kept KV blocks are gathered into a dense ``[H, nq, W*Bk, D]``
slab (W = widest row), scored, masked (padding slots, keys past the sequence, causality), and reduced with an fp32
softmax. Memory per chunk is bounded by ``_CHUNK_BYTES``.
"""

from __future__ import annotations

import torch

from ..masks import BlockSparseMask

_CHUNK_BYTES = 256 << 20


def block_sparse_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: list[int],
    cu_seqlens_k: list[int],
    mask: BlockSparseMask,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]``, mask broadcastable to ``[B, Hq]``.

    Returns out ``[Tq, Hq, D]`` in q's dtype and lse ``[Hq, Tq]`` in fp32 (natural log; -inf for empty rows).
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_head = torch.arange(num_heads, device=q.device) // (num_heads // k.shape[1])  # GQA: query head -> KV head
    bq, bk = mask.q_block_size, mask.kv_block_size
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((num_heads, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)

    for b in range(len(cu_seqlens_q) - 1):
        qs, ks = cu_seqlens_q[b], cu_seqlens_k[b]
        q_len, kv_len = cu_seqlens_q[b + 1] - qs, cu_seqlens_k[b + 1] - ks
        if q_len == 0 or kv_len == 0:
            continue  # no keys: rows stay 0 with lse -inf
        nq = -(-q_len // bq)
        row = b if mask.batch > 1 else 0
        counts = mask.kv_num_blocks[row, :, :nq].expand(num_heads, nq)  # [H, nq]
        width = max(int(counts.max()), 1)
        blocks = mask.kv_indices[row, :, :nq, :width].expand(num_heads, nq, width).long()

        # Pad the sequence's queries to whole blocks and its keys by one block, so gathers never leave the slab.
        qb = torch.zeros(num_heads, nq * bq, head_dim, dtype=torch.float32, device=q.device)
        qb[:, :q_len] = q[qs : qs + q_len].transpose(0, 1).float()
        qb = qb.view(num_heads, nq, bq, head_dim)
        kb = k[ks : ks + kv_len].transpose(0, 1).float()  # [Hkv, kv_len, D]
        vb = v[ks : ks + kv_len].transpose(0, 1).float()

        q_pos = torch.arange(nq * bq, device=q.device).view(nq, bq) + (kv_len - q_len)  # absolute query positions
        chunk = max(1, _CHUNK_BYTES // (num_heads * width * bk * head_dim * 4 * 3))
        for c0 in range(0, nq, chunk):
            c1 = min(nq, c0 + chunk)
            # key positions of every gathered slot: [H, c, W*Bk]
            key_pos = (blocks[:, c0:c1, :, None] * bk + torch.arange(bk, device=q.device)).flatten(-2)
            slot_ok = (torch.arange(width, device=q.device) < counts[:, c0:c1, None]).repeat_interleave(bk, -1)
            valid = slot_ok & (key_pos < kv_len)  # [H, c, W*Bk]
            gather = key_pos.clamp(max=kv_len - 1)
            keys = kb[kv_head[:, None, None], gather]  # [H, c, W*Bk, D]
            vals = vb[kv_head[:, None, None], gather]
            scores = torch.einsum("hcmd,hcnd->hcmn", qb[:, c0:c1], keys) * scale
            allowed = valid[:, :, None, :]
            if causal:
                allowed = allowed & (key_pos[:, :, None, :] <= q_pos[None, c0:c1, :, None])
            scores = scores.masked_fill(~allowed, float("-inf"))
            row_max = scores.amax(-1, keepdim=True)
            row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # empty rows
            probs = torch.exp(scores - row_max)
            denom = probs.sum(-1, keepdim=True)
            o = torch.einsum("hcmn,hcnd->hcmd", probs, vals) / denom.clamp(min=torch.finfo(torch.float32).tiny)
            row_lse = (row_max + torch.log(denom)).squeeze(-1)  # log(0) = -inf for empty rows

            r0, r1 = c0 * bq, min(c1 * bq, q_len)
            out[qs + r0 : qs + r1] = o.flatten(1, 2)[:, : r1 - r0].transpose(0, 1).to(q.dtype)
            lse[:, qs + r0 : qs + r1] = row_lse.flatten(1, 2)[:, : r1 - r0]
    return out, lse
