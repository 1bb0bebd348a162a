"""Dense attention for short sequences and baselines: flash-attn where the user has it, else torch SDPA."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def flash_attn_func():
    """flash-attn's ``flash_attn_func`` when installed (it is optional and never required), else None."""
    try:
        from flash_attn import flash_attn_func as fn
    except Exception:  # not installed, or built for another torch
        return None
    return fn


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float) -> torch.Tensor:
    """q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]``; causal rows are aligned bottom-right (queries are the last Sq
    positions), which is what chunked prefill and decode need; SDPA's own ``is_causal`` aligns top-left."""
    sq, skv = q.shape[2], k.shape[2]
    fa = flash_attn_func()
    if fa is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        out = fa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal)
        return out.transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    if not causal or sq == skv:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and sq > 0, scale=scale, enable_gqa=gqa)
    allowed = torch.ones(sq, skv, dtype=torch.bool, device=q.device).tril(diagonal=skv - sq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
