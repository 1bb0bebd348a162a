"""The attention entry point and the one place that chooses an implementation (Triton, CUDA, CPU or reference).

The "cpu" backend runs the C++ kernel (``sparse_attn._C``) on CPU tensors where the extension is built, else the
PyTorch op of ``cpu.py``, which stays importable on its own as a second implementation.

Two input layouts, one semantics:
- padded, like ``scaled_dot_product_attention``: q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]``;
- varlen (ragged batches), like flash-attn: q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]`` with ``cu_seqlens_q/k [B+1]``.
Queries are the last q_len positions of each sequence's context (chunked prefill and decode), GQA maps query head h
to KV head ``h // (Hq // Hkv)``, and rows that read no key return 0 (log-sum-exp -inf).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from ..masks import BlockSparseMask
from . import checks
from .cpu import block_sparse_attention_cpu
from .reference import attention_reference_varlen

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


@functools.cache
def cuda_extension():
    """The compiled C++/CUDA extension, or None where it was not built."""
    try:
        return importlib.import_module("sparse_attn._C")
    except ImportError:
        return None


def cuda_op_available(op: str) -> bool:
    """Whether the extension was built with CUDA and provides ``op``."""
    ext = cuda_extension()
    return ext is not None and hasattr(ext, op) and getattr(ext, "with_cuda", True)


def cpu_kernel_available() -> bool:
    """Whether the extension provides the C++ CPU kernel that the "cpu" backend prefers for CPU tensors."""
    ext = cuda_extension()
    return ext is not None and hasattr(ext, "block_sparse_attention_cpu")


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
    mask: BlockSparseMask,
    *,
    causal: bool = True,
    scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Attention that reads only the KV blocks ``mask`` keeps (see the module docstring for layouts).

    Returns ``out`` shaped like q (q's dtype), and with ``return_lse`` also the fp32 log-sum-exp, ``[B, Hq, Sq]``
    (padded) or ``[Hq, Tq]`` (varlen), which lets partial results over disjoint key sets be merged exactly.
    """
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    checks.check_qkv(q, k, v, varlen=varlen)
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("varlen inputs need both cu_seqlens_q and cu_seqlens_k")
        cu_q = checks.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
        cu_k = checks.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
        q_tokens, k_tokens, v_tokens = q, k, v
    else:
        batch, sq, skv = q.shape[0], q.shape[2], k.shape[2]
        cu_q, cu_k = [i * sq for i in range(batch + 1)], [i * skv for i in range(batch + 1)]
        # [B, H, S, D] -> [B*S, H, D]; free for tensors that came from a [B, S, H, D] projection.
        q_tokens, k_tokens, v_tokens = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (q, k, v))
    q_lens = [b - a for a, b in zip(cu_q, cu_q[1:])]
    kv_lens = [b - a for a, b in zip(cu_k, cu_k[1:])]
    checks.check_lengths(q_lens, kv_lens, causal)
    batch, num_heads = len(q_lens), q_tokens.shape[1]
    checks.check_mask(mask, batch, num_heads, max(q_lens, default=0), max(kv_lens, default=0), q.device)
    scale = checks.check_scale(scale, q.shape[-1])

    name = resolve_backend(backend, q.device)
    mask = mask.expand(batch, num_heads)
    if name == "reference":
        out, lse = attention_reference_varlen(q_tokens, k_tokens, v_tokens, cu_q, cu_k, mask, causal, scale)
        out = out.to(q.dtype)
    elif name == "cpu":
        # The C++ kernel where it is built and the tensors are on the CPU; else the PyTorch op (any device). The
        # kernel has no backward, so inputs that need gradients also take the PyTorch op (autograd runs through it).
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if q.device.type == "cpu" and not needs_grad and cpu_kernel_available():
            from .extension import block_sparse_attention_cpu as cpu_kernel  # lazy: extension.py imports this module

            out, lse = cpu_kernel(q_tokens, k_tokens, v_tokens, cu_q, cu_k, mask, causal, scale, checked=True)
        else:
            out, lse = block_sparse_attention_cpu(q_tokens, k_tokens, v_tokens, cu_q, cu_k, mask, causal, scale)
    else:
        cu_q_t = torch.tensor(cu_q, dtype=torch.int32, device=q.device)
        cu_k_t = torch.tensor(cu_k, dtype=torch.int32, device=q.device)
        impl = triton_kernels().block_sparse_attention_fwd if name == "triton" else cuda_extension().block_sparse_attention_fwd
        out, lse = impl(
            q_tokens, k_tokens, v_tokens, cu_q_t, cu_k_t, max(q_lens, default=0),
            mask.kv_num_blocks, mask.kv_indices, mask.q_block_size, mask.kv_block_size, causal, scale,
        )

    if not varlen:
        batch, sq = q.shape[0], q.shape[2]
        out = out.view(batch, sq, num_heads, -1).transpose(1, 2)
        lse = lse.view(num_heads, batch, sq).transpose(0, 1)
    return (out, lse) if return_lse else out
