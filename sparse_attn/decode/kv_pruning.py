"""KV-cache pruning (Mustafar): magnitude-pruned, bitmap-compressed K and V, and decode attention on them.

Each token's K and V vectors keep their largest-magnitude entries over head_dim (``sparsity`` = fraction zeroed);
the newest ``recent_tokens`` stay dense and older tokens are compressed in batches of ``compress_every``
(format and cache: :mod:`sparse_attn.decode.compressed`). Decode runs on the compressed cache through one
dispatch point (:func:`~sparse_attn.ops.attention.resolve_backend`):

- "cpu": the C++ operator ``sparse_attn._C.compressed_decode_attention`` for CPU tensors where built, else PyTorch;
- "cuda": the extension's CUDA kernel (the default on a GPU where built: there is no Triton kernel for this op);
- "reference": decompress and run the attention oracle (:mod:`sparse_attn.ops.reference`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validate import check_int
from ..ops.attention import resolve_backend
from ..ops.extension import extension_available
from ..ops.reference import attention_reference_varlen
from .compressed import compressed_decode_attention as compressed_decode_attention_ext
from .compressed import (
    CompressedKV,
    CompressedKVCache,
    check_decode_inputs,
    check_sparsity,
    compressed_decode_attention_torch,
    context_tokens,
    keep_count,
    magnitude_keep_indices,
)

OP = "compressed_decode_attention"


@dataclass(frozen=True)
class KVPruningConfig:
    """sparsity: fraction of each token vector's entries zeroed, in [0, 1) (Mustafar: 0.5 about lossless, 0.7 mostly);
    recent_tokens: newest tokens kept dense; compress_every: tokens compressed per batch once they leave the window;
    prune_keys / prune_values: prune K / V (an unpruned side keeps every entry)."""

    sparsity: float = 0.5
    recent_tokens: int = 32
    compress_every: int = 256
    prune_keys: bool = True
    prune_values: bool = True

    def __post_init__(self):
        check_sparsity(self.sparsity)
        check_int("recent_tokens", self.recent_tokens, 0)
        check_int("compress_every", self.compress_every, 1)
        for name in ("prune_keys", "prune_values"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def make_cache(self, num_kv_heads: int, head_dim: int, *, batch_size: int = 1,
                   dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu") -> CompressedKVCache:
        return CompressedKVCache(self, num_kv_heads, head_dim, batch_size=batch_size, dtype=dtype, device=device)


def prune_magnitude(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero all but the ``round((1 - sparsity) * D)`` largest-magnitude entries of every vector along the last dim
    (ties: the lower channel is kept). The exact tensor a compressed cache stores."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError(f"x must be a tensor with a last (head_dim) axis, got {getattr(x, 'shape', type(x).__name__)}")
    channels = magnitude_keep_indices(x, keep_count(x.shape[-1], sparsity))
    return torch.zeros_like(x).scatter_(-1, channels, x.gather(-1, channels))


def compressed_kv_attention(
    q: torch.Tensor,
    compressed: CompressedKV,
    k_recent: torch.Tensor,
    v_recent: torch.Tensor,
    recent_lengths: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
    return_lse: bool = False,
    max_context: int | None = None,
    check_values: bool = True,
):
    """Decode attention of ``q [B, Hq, D]`` (one query per sequence) over each sequence's compressed tokens followed
    by its dense recent tokens (``k_recent/v_recent [B, Hkv, W, D]``, ``recent_lengths [B]``).

    Returns ``out [B, Hq, D]`` in q's dtype and, with ``return_lse``, the fp32 log-sum-exp ``[B, Hq]`` (-inf and
    out 0 for an empty context), which merges exactly with other partial results (``merge_attention_states``).
    ``check_values=False`` skips the checks that read the offsets and lengths (for callers that built them).
    """
    scale = check_decode_inputs(q, compressed, k_recent, v_recent, recent_lengths, scale, check_values=check_values)
    name = resolve_backend(backend, q.device, cuda_op=OP, has_triton=False)
    if name == "reference":
        k, v, cu_k = context_tokens(compressed, k_recent, v_recent, recent_lengths)
        out, lse = attention_reference_varlen(q, k, v, list(range(q.shape[0] + 1)), cu_k, None, False, scale)
        out, lse = out.to(q.dtype), lse.transpose(0, 1)
    elif name == "cuda" or (q.device.type == "cpu" and extension_available(OP)):
        out, lse = compressed_decode_attention_ext(q, compressed, k_recent, v_recent, recent_lengths, scale=scale,
                                                   max_context=max_context, checked=True)
    else:
        out, lse = compressed_decode_attention_torch(q, compressed, k_recent, v_recent, recent_lengths, scale)
    return (out, lse) if return_lse else out


def pruned_decode_attention(q: torch.Tensor, cache: CompressedKVCache, *, scale: float | None = None,
                            backend: str | None = None, return_lse: bool = False):
    """:func:`compressed_kv_attention` over everything ``cache`` holds (its host-side lengths bound the context)."""
    if not isinstance(cache, CompressedKVCache):
        raise ValueError(f"cache must be a CompressedKVCache, got {type(cache).__name__}")
    k_recent, v_recent, recent_lengths = cache.recent()
    # The cache wrote its offsets and lengths itself: only the structure is checked.
    return compressed_kv_attention(q, cache.compressed(), k_recent, v_recent, recent_lengths, scale=scale,
                                   backend=backend, return_lse=return_lse, max_context=max(cache.lengths, default=0),
                                   check_values=False)
