"""Paged KV caches, the form every decode op reads (vLLM-compatible).

A cache is ``[num_pages, page_size, Hkv, D]`` (any strides: vLLM hands out ``kv.transpose(1, 2).split(D, -1)`` views of
its ``[num_pages, Hkv, page_size, 2D]`` pages). ``block_table[b, i]`` is the physical page holding logical page ``i`` of
sequence ``b``, so token ``t`` of sequence ``b`` lives at page ``block_table[b, t // page_size]``, offset
``t % page_size``, i.e. at flat slot ``page * page_size + offset``. ``seq_lens[b]`` counts the tokens of sequence
``b`` including the one being decoded.

A contiguous cache ``[B, Hkv, S, D]`` is the special case of one page of ``S`` tokens per sequence: :func:`as_paged_cache`
views it that way (a transpose, no copy), so one kernel serves both forms.
"""

from __future__ import annotations

import torch

from ..ops.extension import write_slots_cpu

__all__ = ["as_paged_cache", "split_vllm_kv_cache", "token_slots", "gather_tokens", "write_tokens", "flat_slots"]


def as_paged_cache(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """View a contiguous ``[B, Hkv, S, D]`` cache as ``B`` pages of ``S`` tokens.

    Returns ``(pages [B, S, Hkv, D]`` (a strided view of ``cache``), ``block_table`` int32 ``[B, 1]`` = ``arange(B))``.
    """
    if not isinstance(cache, torch.Tensor) or cache.dim() != 4:
        raise ValueError(f"cache must be a [B, Hkv, S, D] tensor, got {getattr(cache, 'shape', type(cache).__name__)}")
    block_table = torch.arange(cache.shape[0], dtype=torch.int32, device=cache.device)[:, None]
    return cache.transpose(1, 2), block_table


def split_vllm_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's per-layer cache ``[num_pages, Hkv, page_size, 2 * head_size]`` (K|V per token and head) as the two
    ``[num_pages, page_size, Hkv, head_size]`` views the decode ops read (no copy)."""
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
        raise ValueError(f"kv_cache must be [num_pages, Hkv, page_size, 2*{head_size}], got {tuple(kv_cache.shape)}")
    k_cache, v_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return k_cache, v_cache


def token_slots(block_table: torch.Tensor, batch_idx, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Flat slots ``page * page_size + offset`` of tokens ``positions`` of sequences ``batch_idx`` (int or a tensor
    broadcastable with ``positions``). This is vLLM's ``slot_mapping`` for new tokens."""
    positions = positions.long()
    pages = block_table.long()[batch_idx, positions // page_size]
    return pages * page_size + positions % page_size


def gather_tokens(cache: torch.Tensor, block_table: torch.Tensor, b, token_idx: torch.Tensor) -> torch.Tensor:
    """Tokens ``token_idx`` (any shape) of sequence(s) ``b`` from a paged cache: ``[*token_idx.shape, *cache.shape[2:]]``."""
    page_size = cache.shape[1]
    token_idx = token_idx.long()
    pages = block_table.long()[b, token_idx // page_size]
    return cache[pages, token_idx % page_size]


def write_tokens(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor, *more: torch.Tensor) -> None:
    """Write ``values[i]`` (``[T, *cache.shape[2:]]``) to flat slot ``slot_mapping[i]`` of a paged cache, in place;
    with ``more`` tensors, the sources side by side along the last axis fill it (``[T, Hkv, W_j]``, widths summing to
    the cache's: a token's K and V into one K|V page slot in one pass).

    One C++ pass on CPU pages whose slots are rows of one strided view (vLLM's), else an index_put (any device, any
    cache strides). Slots < 0 are padding (vLLM's ``PAD_SLOT_ID``) and are
    skipped; ``values`` may hold more rows than ``slot_mapping`` (padded batches): only the first ``len(slot_mapping)``
    are written.
    """
    if slot_mapping.dim() != 1:
        raise ValueError(f"slot_mapping must be 1-D [T], got shape {tuple(slot_mapping.shape)}")
    n = slot_mapping.shape[0]
    sources = (values, *more)
    fits = all(src.dim() == cache.dim() - 1 and src.shape[0] >= n and src.shape[1:-1] == cache.shape[2:-1]
               for src in sources)
    if not fits or sum(src.shape[-1] for src in sources) != cache.shape[-1]:
        shape, got = ", ".join(map(str, cache.shape[2:])), ", ".join(str(tuple(x.shape)) for x in sources)
        raise ValueError(f"values must be [T >= {n}, {shape}] to match the cache pages (side by side: their last axes "
                         f"summing to {cache.shape[-1]}), got {got}")
    if cache.device.type == "cpu" and cache.dim() == 4 and slot_mapping.device.type == "cpu":
        flat = flat_slots(cache)
        if flat is not None and write_slots_cpu(flat, slot_mapping, *(src.to(cache.dtype) for src in sources)):
            return
    page_size = cache.shape[1]
    slots = slot_mapping.long()
    real = slots >= 0
    slots, column = slots[real], 0
    for src in sources:
        w = src.shape[-1]
        cache[slots // page_size, slots % page_size, ..., column : column + w] = src[:n][real].to(cache.dtype)
        column += w


def flat_slots(cache: torch.Tensor) -> torch.Tensor | None:
    """``cache [num_pages, page_size, H, W]`` as a ``[num_pages * page_size, H, W]`` view with slot-major rows, or
    None when the pages cannot be merged without a copy."""
    if cache.shape[0] > 1 and cache.stride(0) != cache.shape[1] * cache.stride(1):
        return None
    return cache.flatten(0, 1)
