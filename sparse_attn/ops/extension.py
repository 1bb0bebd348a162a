"""Typed wrappers over the compiled extension ``sparse_attn._C`` (csrc/): they check every argument and raise
ValueError naming it before anything reaches C++, and raise RuntimeError with the fix when the extension is missing.

The extension's CPU ops are always built by ``pip install --no-build-isolation -e .``; its CUDA kernels only with
a CUDA torch and nvcc (``sparse_attn._C.with_cuda``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import checks
from .attention import cuda_extension

if TYPE_CHECKING:
    from ..decode.compressed import CompressedKV
    from ..masks import BlockSparseMask

NOT_BUILT = (
    "sparse_attn._C (the C++/CUDA extension) is not built: reinstall with "
    "`pip install --no-build-isolation -e .` from the repository root, with torch installed first"
)


def extension_available(op: str | None = None) -> bool:
    """Whether the extension is importable (and provides ``op``, when given)."""
    ext = cuda_extension()
    return ext is not None and (op is None or hasattr(ext, op))


def extension():
    """The extension module; RuntimeError with the build command when it is missing."""
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError(NOT_BUILT)
    return ext


def _check_device(name: str, t: torch.Tensor) -> None:
    if t.is_cuda and not getattr(extension(), "with_cuda", False):
        raise ValueError(f"{name} is a CUDA tensor but sparse_attn._C was built without CUDA kernels")


def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _lengths_arg(name: str, t, batch: int, device: torch.device, upper: int | None = None) -> torch.Tensor:
    """An int32 ``[batch]`` tensor on ``device``; its values are checked (>= 0, <= upper) for CPU tensors only, since
    reading them from a GPU would synchronise."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must be a 1-D tensor [{batch}], got {getattr(t, 'shape', type(t).__name__)}")
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")
    if t.device.type == "cpu" and batch:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or (upper is not None and hi > upper):
            raise ValueError(f"{name} must lie in [0, {upper if upper is not None else 'inf'}], got [{lo}, {hi}]")
    return t.to(torch.int32).contiguous()


def topk_tokens(
    scores: torch.Tensor,
    lengths: torch.Tensor,
    k: int,
    *,
    sink: int = 0,
    recent: int = 0,
    budgets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (b, h) of ``scores [B, H, L]``, ``k`` (or ``budgets[b] <= k``) of the first ``lengths[b]`` tokens: all
    of them if they fit, else the sink tokens ``[0, sink)``, the recent tokens ``[len - recent, len)`` and the
    highest-scoring others (ties: the lower index; NaN ranks lowest).

    Returns ``indices`` int32 ``[B, H, k]`` (ascending, zero-padded past the count) and ``counts`` int32 ``[B, H]``
    (``min(len, budget)`` when the budget covers sink + recent). Scores are compared in fp32.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3 or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor [B, H, L], got "
                         f"{getattr(scores, 'dtype', type(scores).__name__)} {tuple(getattr(scores, 'shape', ()))}")
    _check_device("scores", scores)
    k = _int_arg("k", k, 1)
    sink, recent = _int_arg("sink", sink, 0), _int_arg("recent", recent, 0)
    if sink + recent > k:
        raise ValueError(f"sink + recent ({sink + recent}) must not exceed k ({k})")
    batch = scores.shape[0]
    lengths = _lengths_arg("lengths", lengths, batch, scores.device, upper=scores.shape[2])
    if budgets is not None:
        budgets = _lengths_arg("budgets", budgets, batch, scores.device, upper=k)
    return extension().topk_tokens(scores.float().contiguous(), lengths, k, sink, recent, budgets)


def compressed_decode_attention(
    q: torch.Tensor,
    compressed: CompressedKV,
    k_recent: torch.Tensor,
    v_recent: torch.Tensor,
    recent_lengths: torch.Tensor,
    *,
    scale: float | None = None,
    max_context: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of ``q [B, Hq, D]`` over each sequence's compressed tokens followed by its dense recent
    window (``k_recent/v_recent [B, Hkv, W, D]``, ``recent_lengths [B]``), on the compressed tiles.

    Returns ``out [B, Hq, D]`` (q's dtype) and ``lse`` fp32 ``[B, Hq]`` (-inf and out 0 for an empty context).
    ``max_context`` (>= every context length; GPU only) sizes the split grid without reading the lengths.
    """
    from ..decode.compressed import check_decode_inputs

    scale = check_decode_inputs(q, compressed, k_recent, v_recent, recent_lengths, scale)
    _check_device("q", q)
    if max_context is None:
        max_context = 0  # the CUDA op then reads the lengths itself
    _int_arg("max_context", max_context, 0)
    c = compressed
    return extension().compressed_decode_attention(
        q.contiguous(), c.k_bitmaps, c.k_values, c.k_keep, c.v_bitmaps, c.v_values, c.v_keep, c.offsets, c.lengths,
        k_recent.contiguous(), v_recent.contiguous(), recent_lengths.to(torch.int32), scale, max_context,
    )


def block_sparse_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: list[int] | torch.Tensor,
    cu_seqlens_k: list[int] | torch.Tensor,
    mask: BlockSparseMask,
    causal: bool,
    scale: float | None,
    *,
    checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ CPU kernel for block-sparse attention; same arguments and results as the PyTorch op
    :func:`sparse_attn.ops.cpu.block_sparse_attention_cpu` (varlen q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]``, cu_seqlens
    as lists, mask broadcastable to ``[B, Hq]``).

    Returns out ``[Tq, Hq, D]`` in q's dtype and lse ``[Hq, Tq]`` fp32 (natural log; 0 and -inf for rows that read no
    key). Work follows the kept blocks: a flash-style loop over each row's KV blocks with an online softmax and fp32
    accumulation. Tensors are read in place with any token and head strides (a non-unit stride along head_dim is
    copied first); ``scale=None`` means ``head_dim ** -0.5``. ``checked=True`` skips the Python argument checks, for
    the entry point (:func:`sparse_attn.ops.attention.block_sparse_attention`) that has run them already.
    """
    if q.device.type != "cpu":
        raise ValueError(f"q must be a CPU tensor for the C++ CPU kernel, got {q.device}")
    cu_q_t, cu_k_t = (torch.as_tensor(cu, dtype=torch.int32) for cu in (cu_seqlens_q, cu_seqlens_k))
    if not checked:
        checks.check_qkv(q, k, v, varlen=True)
        cu_q = checks.check_cu_seqlens("cu_seqlens_q", cu_q_t, q.shape[0], q.device)
        cu_k = checks.check_cu_seqlens("cu_seqlens_k", cu_k_t, k.shape[0], q.device)
        q_lens = [b - a for a, b in zip(cu_q, cu_q[1:])]
        kv_lens = [b - a for a, b in zip(cu_k, cu_k[1:])]
        checks.check_lengths(q_lens, kv_lens, causal)
        checks.check_mask(mask, len(q_lens), q.shape[1], max(q_lens), max(kv_lens), q.device)
    scale = checks.check_scale(scale, q.shape[-1])
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return extension().block_sparse_attention_cpu(
        q, k, v, cu_q_t, cu_k_t, mask.kv_num_blocks, mask.kv_indices, mask.q_block_size, mask.kv_block_size,
        bool(causal), scale,
    )
