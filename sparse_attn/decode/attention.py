"""Sparse decode attention over paged KV caches: one query token per sequence, exact attention over selected tokens.

Layout (see :mod:`sparse_attn.decode.paged`): q ``[B, Hq, D]``, k/v caches ``[num_pages, page_size, Hkv, D]`` (any
strides), ``block_table`` ``[B, max_pages]``, ``seq_lens`` ``[B]`` (context length including the new token, which must
already be in the cache). Query head ``h`` reads KV head ``h // (Hq // Hkv)`` (GQA, never expanded to MHA).

Selection: ``None`` means dense decode (every token ``< seq_lens[b]``). Otherwise a :class:`BlockSparseMask` with one
query block, as built by ``BlockSparseMask.from_token_indices(indices [B, H, k], counts [B, H], kv_len=...)``: row
``[b, h]`` reads the ``counts[b, h]`` listed tokens (with ``kv_block_size > 1`` the entries are block ids of that many
tokens each, e.g. page-level selections). ``H`` is 1 (one token set for all heads), ``Hkv`` (one set per GQA group, the
default of Double Sparsity) or ``Hq`` (one per query head). Selected positions at or past ``seq_lens[b]`` are ignored.
Why a group shares one set by default: decode is memory-bound, and the bytes read are the selected tokens of each KV
head; with a per-group set each selected K/V row is loaded once and serves all ``Hq/Hkv`` query heads of the group
(k tokens per KV head), while per-query-head sets read up to ``Hq/Hkv`` times as many rows for the same k.

Split-K ("flash-decoding"): a long context is cut into ``num_splits`` contiguous pieces of the (selected) token list;
each piece yields a partial ``(out, lse)`` and :func:`merge_attention_states` combines them exactly, so short batches
still fill the GPU. Results are independent of ``num_splits`` up to float rounding.

Backends (chosen once by ``resolve_backend``): "triton" (GPU, or CPU under TRITON_INTERPRET=1), "cpu" (the C++
attention kernel on CPU tensors: the listed tokens read from the pages in place, rows split over the threads; else
PyTorch, reading only the selected tokens through vectorized gathers, chunked to bound memory) and "reference" (the float64 oracle
built on ``ops.reference``). "cuda" dispatches to ``sparse_attn._C.sparse_decode_attention_fwd`` where built.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..masks import BlockSparseMask
from ..ops import checks
from ..ops.attention import cuda_extension, resolve_backend, triton_kernels
from ..ops.extension import block_sparse_attention_cpu as block_sparse_attention_cpp
from ..ops.extension import cpu_kernel_available
from ..ops.reference import attention_reference_varlen
from .paged import gather_tokens

__all__ = [
    "sparse_decode_attention", "merge_attention_states", "decode_attention_reference", "check_decode_inputs",
    "check_block_table",
]

CUDA_OP = "sparse_decode_attention_fwd"
_CHUNK_BYTES = 256 << 20  # bound on the gathered K/V of one CPU step


# ---------------------------------------------------------------------------------------------------- merging
def merge_attention_states(outs, lses) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention results over disjoint key sets into the result over their union.

    ``outs`` ``[S, ..., D]`` (or a sequence of S ``[..., D]`` tensors) are softmax-normalized partial outputs and
    ``lses`` ``[S, ...]`` their natural-log log-sum-exps (-inf for an empty part). With ``M = max_s lse_s`` and
    ``w_s = exp(lse_s - M)``: ``lse = M + log(sum w_s)``, ``out = sum_s w_s out_s / sum_s w_s``. All parts empty gives
    out 0, lse -inf. Computes in fp32 (fp64 for fp64 inputs). Returns ``(out [..., D]`` in the dtype of ``outs``,
    ``lse [...]`` in the compute dtype).
    """
    if isinstance(outs, Sequence):
        if len(outs) == 0 or len(lses) != len(outs):
            raise ValueError(f"outs and lses must be non-empty sequences of equal length, got {len(outs)} and {len(lses)}")
        outs, lses = torch.stack(list(outs)), torch.stack(list(lses))
    if outs.dim() < 2 or outs.shape[0] == 0 or lses.shape != outs.shape[:-1]:
        raise ValueError(f"outs must be [S, ..., D] and lses [S, ...] with S >= 1, got {tuple(outs.shape)} and {tuple(lses.shape)}")
    compute = torch.promote_types(outs.dtype, torch.float32)
    lses = lses.to(compute)
    top = lses.amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all parts empty: weights exp(-inf) = 0
    weights = torch.exp(lses - top)
    total = weights.sum(0)
    out = (weights.unsqueeze(-1) * outs.to(compute)).sum(0) / total.clamp(min=torch.finfo(compute).tiny).unsqueeze(-1)
    return out.to(outs.dtype), top + torch.log(total)


def _softmax_state(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention state of masked fp32 ``scores [..., G, N]`` (-inf = not read) over ``values [..., N, D]``."""
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(scores - row_max)
    denom = probs.sum(-1, keepdim=True)
    out = (probs @ values) / denom.clamp(min=torch.finfo(torch.float32).tiny)
    return out, (row_max + torch.log(denom)).squeeze(-1)


# ---------------------------------------------------------------------------------------------------- checks
def check_decode_inputs(q, k_cache, v_cache, block_table, seq_lens, selection, *, check_values: bool = True) -> None:
    """Raise ValueError naming the argument that does not fit the decode layout (module docstring)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a [B, Hq, D] tensor, got {getattr(q, 'shape', type(q).__name__)}")
    if q.dtype not in checks.KERNEL_DTYPES:
        raise ValueError(f"q has dtype {q.dtype}; supported: {', '.join(map(str, checks.KERNEL_DTYPES))}")
    batch, hq, head_dim = q.shape
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(cache, torch.Tensor) or cache.dim() != 4:
            raise ValueError(f"{name} must be a paged cache [num_pages, page_size, Hkv, D], got {getattr(cache, 'shape', type(cache).__name__)}")
        if cache.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {cache.dtype} but q has {q.dtype}")
        if cache.device != q.device:
            raise ValueError(f"{name} is on {cache.device} but q is on {q.device}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    num_pages, page_size, hkv, cache_dim = k_cache.shape
    if cache_dim != head_dim or head_dim == 0:
        raise ValueError(f"k_cache head_dim {cache_dim} must equal q head_dim {head_dim} (> 0)")
    if num_pages == 0 or page_size == 0:
        raise ValueError(f"k_cache must hold at least one page of at least one token, got shape {tuple(k_cache.shape)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"number of query heads ({hq}) must be a positive multiple of the number of KV heads ({hkv})")
    if selection is not None:
        if not isinstance(selection, BlockSparseMask):
            raise ValueError(f"selection must be a BlockSparseMask or None, got {type(selection).__name__}")
        if selection.batch not in (1, batch):
            raise ValueError(f"selection batch {selection.batch} must be 1 or the batch size {batch}")
        if selection.heads not in (1, hkv, hq):
            raise ValueError(f"selection heads {selection.heads} must be 1, Hkv ({hkv}) or Hq ({hq})")
        if selection.num_q_blocks != 1:
            raise ValueError(f"selection must have one query block (a decode selection), got {selection.num_q_blocks}")
        if selection.device != q.device:
            raise ValueError(f"selection is on {selection.device} but q is on {q.device}")
    check_block_table(block_table, seq_lens, batch, page_size, num_pages, q.device, check_values=check_values)
    if not check_values:
        return
    hi = int(seq_lens.max()) if batch else 0
    if selection is not None:
        if selection.kv_len < hi:
            raise ValueError(f"selection was built for kv_len {selection.kv_len}, but seq_lens reach {hi}")
        selection.validate(check_values=True)


def check_block_table(block_table, seq_lens, batch: int, page_size: int, num_pages: int, device, *,
                      check_values: bool = True) -> None:
    """block_table ``[B, max_pages]`` and seq_lens ``[B]`` (int32/int64 on ``device``); with ``check_values`` also
    ``0 <= seq_lens <= max_pages * page_size`` and every page a sequence uses in ``[0, num_pages)``."""
    for name, t, rank in (("block_table", block_table, 2), ("seq_lens", seq_lens, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != rank or t.shape[0] != batch:
            raise ValueError(f"{name} must be a rank-{rank} tensor with batch {batch} first, got {getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")
    if not check_values or batch == 0:
        return
    capacity = block_table.shape[1] * page_size
    lo, hi = int(seq_lens.min()), int(seq_lens.max())
    if lo < 0 or hi > capacity:
        raise ValueError(f"seq_lens must lie in [0, {capacity}] (block_table pages x page_size), got [{lo}, {hi}]")
    used = torch.arange(block_table.shape[1], device=device) < (seq_lens[:, None] + page_size - 1) // page_size
    pages = block_table[used]
    if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= num_pages):
        raise ValueError(f"block_table entries of used pages must lie in [0, {num_pages}), got [{int(pages.min())}, {int(pages.max())}]")


# ---------------------------------------------------------------------------------------------------- entry point
def sparse_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selection: BlockSparseMask | None = None,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    backend: str | None = None,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of ``q [B, Hq, D]`` over the tokens ``selection`` keeps (all tokens when None).

    Returns ``(out [B, Hq, D]`` in q's dtype, ``lse [B, Hq]`` fp32, natural log; rows reading no token give out 0
    and lse -inf). ``num_splits`` splits each row's token list (None: the backend's choice). ``check_values=False``
    skips the checks that read tensor values (a device sync), e.g. under CUDA graphs with trusted metadata. NaN and
    inf among the tokens read behave as in :func:`sparse_attn.block_sparse_attention` (a NaN or +inf score makes the
    row NaN); slots a row does not read, other sequences' pages included, never reach it.
    """
    check_decode_inputs(q, k_cache, v_cache, block_table, seq_lens, selection, check_values=check_values)
    scale = checks.check_scale(scale, q.shape[-1])
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    name = resolve_backend(backend, q.device, cuda_op=CUDA_OP)
    if name == "reference":
        out, lse = decode_attention_reference(q, k_cache, v_cache, block_table, seq_lens, selection, scale=scale)
        return out.to(q.dtype), lse
    if name == "cpu" and q.device.type == "cpu" and cpu_kernel_available():
        # The C++ kernel reads the pages in place (only the selected tokens), split over the threads and merged. The
        # one query sees its whole context (non-causal), so an empty context (seq_len 0) reads nothing.
        out, lse = block_sparse_attention_cpp(
            q, k_cache, v_cache, torch.arange(q.shape[0] + 1, dtype=torch.int32), None, selection, False, scale,
            block_table=block_table, kv_lens=seq_lens, q_block_size=1, checked=True)
        return out, lse.transpose(0, 1)
    if name == "cpu":
        return _decode_cpu(q, k_cache, v_cache, block_table, seq_lens, selection, scale, num_splits or 1)
    sel = (None, None, 1) if selection is None else (
        selection.kv_indices[:, :, 0], selection.kv_num_blocks[:, :, 0], selection.kv_block_size)
    impl = triton_kernels().decode_attention_fwd if name == "triton" else getattr(cuda_extension(), CUDA_OP)
    return impl(q, k_cache, v_cache, block_table, seq_lens, *sel, scale, num_splits)


# ---------------------------------------------------------------------------------------------------- CPU
def _token_positions(selection, seq_lens, batch: int, hq: int, hkv: int):
    """Token positions each program head reads, ``[B, P, N]`` (long), and which of them are real (bool).

    P is Hkv (a query-head group shares the keys it reads) unless the selection is per query head (P = Hq).
    """
    device = seq_lens.device
    lens = seq_lens.long()[:, None, None]
    if selection is None:
        width = int(seq_lens.max()) if batch else 0
        pos = torch.arange(width, device=device).expand(batch, hkv, width)
        return pos, pos < lens
    heads = hq if selection.heads == hq else hkv
    idx = selection.kv_indices[:, :, 0].long().expand(batch, heads, -1)  # broadcast B and H of size 1
    count = selection.kv_num_blocks[:, :, 0].long().expand(batch, heads)
    bk = selection.kv_block_size
    pos = (idx[..., None] * bk + torch.arange(bk, device=device)).flatten(-2)
    listed = (torch.arange(idx.shape[-1], device=device) < count[..., None]).repeat_interleave(bk, -1)
    return pos, listed & (pos < lens)


def _decode_cpu(q, k_cache, v_cache, block_table, seq_lens, selection, scale: float, num_splits: int):
    batch, hq, head_dim = q.shape
    page_size, hkv = k_cache.shape[1], k_cache.shape[2]
    positions, valid = _token_positions(selection, seq_lens, batch, hq, hkv)
    heads, width = positions.shape[1], positions.shape[2]
    if width == 0:
        return torch.zeros_like(q), torch.full((batch, hq), float("-inf"), device=q.device)
    q_groups = q.float().view(batch, heads, hq // heads, head_dim)
    kv_head = (torch.arange(heads, device=q.device) // (heads // hkv))[None, :, None]
    rows, table = torch.arange(batch, device=q.device)[:, None, None], block_table.long()
    step = min(-(-width // num_splits), max(1, _CHUNK_BYTES // (batch * heads * head_dim * 4 * 2)))

    outs, lses = [], []
    for start in range(0, width, step):
        ok = valid[..., start : start + step]
        pos = positions[..., start : start + step].masked_fill(~ok, 0)  # unread slots point at token 0, never past the table
        page = table[rows, pos // page_size].masked_fill(~ok, 0)
        offset = pos % page_size
        keys = k_cache[page, offset, kv_head].float()  # [B, P, n, D]: only the listed tokens are gathered
        # Unread slots are zeroed: whatever the cache holds there (stale or NaN pages) never reaches the output.
        values = v_cache[page, offset, kv_head].float().masked_fill(~ok[..., None], 0.0)
        scores = (q_groups @ keys.transpose(-1, -2)) * scale  # [B, P, G, n]
        out, lse = _softmax_state(scores.masked_fill(~ok[:, :, None, :], float("-inf")), values)
        outs.append(out)
        lses.append(lse)
    out, lse = merge_attention_states(outs, lses) if len(outs) > 1 else (outs[0], lses[0])
    return out.reshape(batch, hq, head_dim).to(q.dtype), lse.reshape(batch, hq)


# ---------------------------------------------------------------------------------------------------- oracle
def decode_attention_reference(
    q, k_cache, v_cache, block_table, seq_lens, selection=None, *, scale=None, compute_dtype=torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: gathers each sequence's tokens from the pages and runs ``ops.reference`` (a token mask, exact
    softmax in ``compute_dtype``). Returns out ``[B, Hq, D]`` in compute_dtype and lse ``[B, Hq]`` fp32."""
    batch, hq, _ = q.shape
    hkv = k_cache.shape[2]
    lens = seq_lens.tolist()
    keys = [gather_tokens(k_cache, block_table, b, torch.arange(n, device=q.device)) for b, n in enumerate(lens)]
    values = [gather_tokens(v_cache, block_table, b, torch.arange(n, device=q.device)) for b, n in enumerate(lens)]
    cu_k = [0]
    for n in lens:
        cu_k.append(cu_k[-1] + n)
    mask = selection
    if selection is not None and selection.heads == hkv and hq != hkv:  # one set per group: repeat for its query heads
        group = hq // hkv
        mask = BlockSparseMask(
            selection.kv_num_blocks.repeat_interleave(group, 1), selection.kv_indices.repeat_interleave(group, 1),
            selection.q_block_size, selection.kv_block_size, selection.q_len, selection.kv_len,
        )
    scale = checks.check_scale(scale, q.shape[-1])
    out, lse = attention_reference_varlen(
        q, torch.cat(keys), torch.cat(values), list(range(batch + 1)), cu_k, mask, True, scale, compute_dtype,
    )
    return out, lse.transpose(0, 1)
