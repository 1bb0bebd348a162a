"""The attention entry point and the one place that chooses an implementation (Triton, CUDA, CPU or reference).

The "cpu" backend runs the C++ kernel (``sparse_attn._C``) on CPU tensors where the extension is built, else the
PyTorch op of ``cpu.py``, which stays importable on its own as a second implementation.

Two query layouts and two key layouts, one semantics:
- padded, like ``scaled_dot_product_attention``: q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]``;
- varlen (ragged batches), like flash-attn: q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]`` with ``cu_seqlens_q/k [B+1]``;
- paged keys (a KV cache read in place, like vLLM's and FlashInfer's): varlen q with k/v ``[num_pages, page_size,
  Hkv, D]`` (any strides), ``block_table [B, max_pages]`` and ``kv_lens [B]``: key t of sequence b lives in page
  ``block_table[b, t // page_size]`` at offset ``t % page_size``.
Queries are the last q_len positions of each sequence's context (chunked prefill and decode), GQA maps query head h
to KV head ``h // (Hq // Hkv)``, and rows that read no key return 0 (log-sum-exp -inf).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from typing import Sequence

import torch

from ..masks import BlockSparseMask
from . import checks
from .cpu import block_sparse_attention_cpu as block_sparse_attention_torch
from .extension import block_sparse_attention_cpu as block_sparse_attention_cpp
from .extension import cpu_kernel_available, cuda_extension, cuda_op_available
from .reference import attention_reference_varlen

__all__ = ["BACKENDS", "BACKEND_ENV", "block_sparse_attention", "resolve_backend", "triton_kernels",
           "triton_interpreter_enabled", "cuda_extension", "cuda_op_available", "cpu_kernel_available"]

BACKENDS = ("triton", "cuda", "cpu", "reference")
BACKEND_ENV = "SPARSE_ATTN_BACKEND"


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_kernels():
    """The project's Triton kernels module, or None where Triton is not importable."""
    try:
        return importlib.import_module("sparse_attn.triton_kernels")
    except ImportError:
        return None


def resolve_backend(
    requested: str | None, device: torch.device, cuda_op: str = "block_sparse_attention_fwd", has_triton: bool = True
) -> str:
    """Pick the implementation for tensors on ``device``: the request (argument, then $SPARSE_ATTN_BACKEND) if it can
    run there, else the fastest that can. A request that cannot run raises instead of silently running another.
    ``cuda_op`` names the extension function the caller needs: "cuda" is available when the extension has it.
    ``has_triton=False`` says the operation has no Triton kernel: "auto" on a GPU then picks "cuda" where built."""
    requested = requested or os.environ.get(BACKEND_ENV) or "auto"
    if requested not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {requested!r}")
    on_gpu = device.type == "cuda"
    if requested == "auto":
        if on_gpu and has_triton and triton_kernels() is not None:
            return "triton"
        if on_gpu and not has_triton and cuda_op_available(cuda_op):
            return "cuda"
        return "cpu"
    if requested == "triton":
        if not has_triton:
            raise ValueError("backend 'triton' has no kernel for this operation (choose 'cuda', 'cpu' or 'reference')")
        if triton_kernels() is None:
            raise ValueError("backend 'triton' requested but triton is not importable")
        if not on_gpu and not triton_interpreter_enabled():
            raise ValueError("backend 'triton' runs CPU tensors only under TRITON_INTERPRET=1 (set before importing triton)")
    if requested == "cuda":
        if not cuda_op_available(cuda_op):
            raise ValueError(f"backend 'cuda' requested but the CUDA extension with {cuda_op} is not built")
        if not on_gpu:
            raise ValueError(f"backend 'cuda' needs CUDA tensors, got {device}")
    return requested


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockSparseMask | None,
    *,
    causal: bool = True,
    scale: float | None = None,
    cu_seqlens_q: torch.Tensor | Sequence[int] | None = None,
    cu_seqlens_k: torch.Tensor | Sequence[int] | None = None,
    block_table: torch.Tensor | None = None,
    kv_lens: torch.Tensor | Sequence[int] | None = None,
    q_block_size: int = 64,
    skip_mass: float = 0.0,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Attention that reads only the KV blocks ``mask`` keeps (see the module docstring for layouts); ``mask=None``
    reads every key (dense, in query blocks of ``q_block_size``).

    ``skip_mass`` > 0 (C++ CPU kernel) also skips, inside the kept blocks, every key tile whose scores all lie more
    than ``ln(kv_len / skip_mass)`` below their rows' running maxima (softmax thresholding, as in BLASST): each
    skipped key weighs at most ``skip_mass / kv_len`` of its row's largest term, so all of them together at most
    ``skip_mass`` of the row's softmax mass, and their exponentials and P.V products are left out without an
    estimation pass. The threshold grows with the context, so the bound holds at every length. 0 is exact.

    Returns ``out`` shaped like q (q's dtype), and with ``return_lse`` also the fp32 log-sum-exp, ``[B, Hq, Sq]``
    (padded) or ``[Hq, Tq]`` (varlen), which lets partial results over disjoint key sets be merged exactly.

    NaN and inf inputs give what torch's softmax attention (``scaled_dot_product_attention``) gives over the keys a
    row reads: a NaN or +inf score among them makes the row's output NaN (its lse NaN, or +inf), -inf scores weigh
    0 (a row whose every score is -inf returns 0 and lse -inf, like a row that reads no key), and a NaN or inf
    value a row weighs makes that output channel non-finite. Keys a row does not read never reach it through their
    keys; their values may, when they share a kept block with keys it reads (the kernels multiply them by a weight
    of exactly 0, and 0 * NaN = NaN, as SDPA's masked product does for every masked value).
    """
    paged = block_table is not None
    varlen = paged or cu_seqlens_q is not None or cu_seqlens_k is not None
    if paged:
        if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (k, v)):
            raise ValueError(f"paged k/v must be [num_pages, page_size, Hkv, D], got {tuple(getattr(k, 'shape', ()))} "
                             f"and {tuple(getattr(v, 'shape', ()))}")
        checks.check_qkv(q, k[:, 0], v[:, 0], varlen=True)  # one slot of every page: dtypes, devices, heads, D
        if cu_seqlens_q is None or cu_seqlens_k is not None or kv_lens is None:
            raise ValueError("paged keys take cu_seqlens_q, block_table and kv_lens (not cu_seqlens_k)")
        cu_q = checks.check_cu_seqlens("cu_seqlens_q", _as_tensor(cu_seqlens_q), q.shape[0], q.device)
        kv_list = kv_lens.tolist() if isinstance(kv_lens, torch.Tensor) else list(kv_lens)
        # Page ids are read by the C++ kernel's own checks; the other implementations check them here.
        in_cpp = q.device.type == "cpu" and cpu_kernel_available() and resolve_backend(backend, q.device) == "cpu"
        checks.check_paged(block_table, kv_list, len(cu_q) - 1, k.shape[1], k.shape[0], q.device,
                           check_values=not in_cpp)
        q_tokens = q
    else:
        checks.check_qkv(q, k, v, varlen=varlen)
    if varlen and not paged:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("varlen inputs need both cu_seqlens_q and cu_seqlens_k")
        cu_q = checks.check_cu_seqlens("cu_seqlens_q", _as_tensor(cu_seqlens_q), q.shape[0], q.device)
        cu_k = checks.check_cu_seqlens("cu_seqlens_k", _as_tensor(cu_seqlens_k), k.shape[0], q.device)
        kv_list = [b - a for a, b in zip(cu_k, cu_k[1:])]
        q_tokens, k_tokens, v_tokens = q, k, v
    elif not varlen:
        batch, sq, skv = q.shape[0], q.shape[2], k.shape[2]
        cu_q, cu_k = [i * sq for i in range(batch + 1)], [i * skv for i in range(batch + 1)]
        kv_list = [skv] * batch
        if batch == 1:  # [1, H, S, D] as a [S, H, D] view (a cache laid out [B, H, S, D] is not copied): the C++
            q_tokens, k_tokens, v_tokens = (t[0].transpose(0, 1) for t in (q, k, v))  # kernel reads any strides
        else:  # [B, H, S, D] -> [B*S, H, D]; free for tensors that came from a [B, S, H, D] projection
            q_tokens, k_tokens, v_tokens = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (q, k, v))
    q_lens = [b - a for a, b in zip(cu_q, cu_q[1:])]
    checks.check_lengths(q_lens, kv_list, causal)
    batch, num_heads = len(q_lens), q_tokens.shape[1]
    if mask is not None:
        checks.check_mask(mask, batch, num_heads, max(q_lens, default=0), max(kv_list, default=0), q.device)
    scale = checks.check_scale(scale, q.shape[-1])
    if not isinstance(skip_mass, (int, float)) or isinstance(skip_mass, bool) or not 0 <= skip_mass < 1:
        raise ValueError(f"skip_mass must be a number in [0, 1), got {skip_mass!r}")
    skip_threshold = skip_threshold_for(max(kv_list, default=0), skip_mass)

    name = resolve_backend(backend, q.device)
    cpp = name == "cpu" and q.device.type == "cpu" and cpu_kernel_available() and not _needs_grad(q, k, v)
    if skip_threshold and not cpp:
        raise ValueError("skip_mass runs in the C++ CPU kernel only (CPU tensors, backend 'cpu', no gradients)")
    if cpp:  # reads pages in place
        out, lse = block_sparse_attention_cpp(
            q_tokens, k if paged else k_tokens, v if paged else v_tokens, cu_q, None if paged else cu_k, mask, causal,
            scale, block_table=block_table, kv_lens=kv_list if paged else None, q_block_size=q_block_size,
            skip_threshold=skip_threshold, checked=True,
        )
    else:
        if not varlen and batch == 1:  # the other implementations take token-major layouts
            q_tokens, k_tokens, v_tokens = (t.contiguous() for t in (q_tokens, k_tokens, v_tokens))
        if paged:  # the other implementations read varlen keys: gather them (Triton reads pages in place)
            if name != "triton":
                k_tokens, v_tokens, cu_k = _gather_pages(k, v, block_table, kv_list)
        if mask is None:
            mask = _dense_mask(q_lens, kv_list, num_heads, q_block_size, q.device)
        mask = mask.expand(batch, num_heads)
        if name == "reference":
            out, lse = attention_reference_varlen(q_tokens, k_tokens, v_tokens, cu_q, cu_k, mask, causal, scale)
            out = out.to(q.dtype)
        elif name == "cpu":  # the PyTorch op (any device; autograd runs through it)
            out, lse = block_sparse_attention_torch(q_tokens, k_tokens, v_tokens, cu_q, cu_k, mask, causal, scale)
        elif name == "triton":
            cu_q_t = torch.tensor(cu_q, dtype=torch.int32, device=q.device)
            paged_args = {}
            if paged:
                k_tokens, v_tokens = k, v
                cu_k_t = None
                paged_args = dict(block_table=block_table.to(torch.int32),
                                  kv_lens=torch.tensor(kv_list, dtype=torch.int32, device=q.device))
            else:
                cu_k_t = torch.tensor(cu_k, dtype=torch.int32, device=q.device)
            out, lse = triton_kernels().block_sparse_attention_fwd(
                q_tokens, k_tokens, v_tokens, cu_q_t, cu_k_t, max(q_lens, default=0),
                mask.kv_num_blocks, mask.kv_indices, mask.q_block_size, mask.kv_block_size, causal, scale, **paged_args,
            )
        else:
            out, lse = cuda_extension().block_sparse_attention_fwd(
                q_tokens, k_tokens, v_tokens, torch.tensor(cu_q, dtype=torch.int32, device=q.device),
                torch.tensor(cu_k, dtype=torch.int32, device=q.device), max(q_lens, default=0),
                mask.kv_num_blocks, mask.kv_indices, mask.q_block_size, mask.kv_block_size, causal, scale,
            )

    if not varlen:
        batch, sq = q.shape[0], q.shape[2]
        out = out.view(batch, sq, num_heads, -1).transpose(1, 2)
        lse = lse.view(num_heads, batch, sq).transpose(0, 1)
    return (out, lse) if return_lse else out


def skip_threshold_for(kv_len: int, skip_mass: float) -> float:
    """The score gap (natural log) below a row's running max past which a key tile is skipped: ``ln(kv_len /
    skip_mass)``, so the skipped keys of a row hold at most ``skip_mass`` of its mass (0: no skipping)."""
    return math.log(max(kv_len, 1) / skip_mass) if skip_mass > 0 else 0.0


def _as_tensor(values) -> torch.Tensor:
    return values if isinstance(values, torch.Tensor) else torch.tensor(list(values), dtype=torch.int32)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _dense_mask(q_lens, kv_lens, num_heads: int, block: int, device) -> BlockSparseMask:
    """Every block of every row (for the implementations that read masks only; kernels apply causality)."""
    return BlockSparseMask.full(q_len=max(q_lens), kv_len=max(kv_lens), q_block_size=block, kv_block_size=block,
                                causal=False, device=device)


def _gather_pages(k, v, block_table, kv_lens):
    """The sequences' keys of a paged cache in the varlen layout (for implementations without page reads)."""
    page_size = k.shape[1]
    rows = []
    for b, n in enumerate(kv_lens):
        t = torch.arange(n, device=k.device)
        rows.append(block_table[b, t // page_size].long() * page_size + t % page_size)
    rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long, device=k.device)
    cu_k = [0]
    for n in kv_lens:
        cu_k.append(cu_k[-1] + n)
    return k.flatten(0, 1)[rows], v.flatten(0, 1)[rows], cu_k
