"""PyTorch reference attention: the oracle every kernel is tested against.

Written for clarity, not speed: the block mask is expanded to a token mask, causality is applied with the query
offset (queries are the last q_len positions of the context), and softmax runs in ``compute_dtype``. Rows that see
no key return 0 with log-sum-exp -inf.
"""

from __future__ import annotations

import torch

from ..masks import BlockSparseMask


def attention_reference_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: list[int],
    cu_seqlens_k: list[int],
    mask: BlockSparseMask | None,
    causal: bool,
    scale: float,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]``; returns out ``[Tq, Hq, D]`` in compute_dtype and lse ``[Hq, Tq]`` (fp32)."""
    num_heads, group = q.shape[1], q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    lse = torch.full((num_heads, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(len(cu_seqlens_q) - 1):
        qs, qe, ks, ke = cu_seqlens_q[b], cu_seqlens_q[b + 1], cu_seqlens_k[b], cu_seqlens_k[b + 1]
        q_len, kv_len = qe - qs, ke - ks
        if q_len == 0:
            continue
        qb = q[qs:qe].transpose(0, 1).to(compute_dtype)  # [Hq, q_len, D]
        kb = k[ks:ke].transpose(0, 1).to(compute_dtype).repeat_interleave(group, 0)  # [Hq, kv_len, D]
        vb = v[ks:ke].transpose(0, 1).to(compute_dtype).repeat_interleave(group, 0)
        allowed = torch.ones(num_heads, q_len, kv_len, dtype=torch.bool, device=q.device)
        if mask is not None:
            m = b if mask.batch > 1 else 0
            token_mask = BlockSparseMask(
                mask.kv_num_blocks[m : m + 1], mask.kv_indices[m : m + 1],
                mask.q_block_size, mask.kv_block_size, mask.q_len, mask.kv_len,
            ).to_token_mask(q_len, kv_len)[0]
            allowed &= token_mask.expand(num_heads, -1, -1)
        if causal:
            q_pos = torch.arange(q_len, device=q.device) + (kv_len - q_len)
            allowed &= torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]
        scores = torch.einsum("hmd,hnd->hmn", qb, kb) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # -inf for empty rows
        probs = torch.exp(scores - row_lse.unsqueeze(-1).clamp(min=torch.finfo(compute_dtype).min))
        probs = probs.masked_fill(~allowed, 0.0)
        out[qs:qe] = torch.einsum("hmn,hnd->hmd", probs, vb).transpose(0, 1)
        lse[:, qs:qe] = row_lse.float()
    return out, lse
