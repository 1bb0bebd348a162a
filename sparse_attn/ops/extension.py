"""Typed wrappers over the compiled extension ``sparse_attn._C`` (csrc/): the lowest layer of the package.

They check every argument and raise ValueError naming it before anything reaches C++, and raise RuntimeError with
the fix when the extension is missing. Callers that have run the checks already (the dispatching entry points) pass
``checked=True``. This module imports nothing else of the package but the mask type and the shared checks, so every
layer above may use it.

The extension's CPU ops are always built by ``pip install --no-build-isolation -e .``; its CUDA kernels only with a
CUDA torch and nvcc (``sparse_attn._C.with_cuda``).
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Sequence

import torch

from . import checks

if TYPE_CHECKING:
    from ..masks import BlockSparseMask

NOT_BUILT = (
    "sparse_attn._C (the C++/CUDA extension) is not built: reinstall with "
    "`pip install --no-build-isolation -e .` from the repository root, with torch installed first"
)


@functools.cache
def cuda_extension():
    """The compiled C++/CUDA extension, or None where it was not built."""
    try:
        return importlib.import_module("sparse_attn._C")
    except ImportError:
        return None


def extension_available(op: str | None = None) -> bool:
    """Whether the extension is importable (and provides ``op``, when given)."""
    ext = cuda_extension()
    return ext is not None and (op is None or hasattr(ext, op))


def cuda_op_available(op: str) -> bool:
    """Whether the extension was built with CUDA and provides ``op``."""
    ext = cuda_extension()
    return ext is not None and hasattr(ext, op) and getattr(ext, "with_cuda", True)


def cpu_kernel_available() -> bool:
    """Whether the extension provides the C++ CPU attention kernel that the "cpu" backend prefers for CPU tensors."""
    return extension_available("block_sparse_attention_cpu")


def extension():
    """The extension module; RuntimeError with the build command when it is missing."""
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError(NOT_BUILT)
    return ext


def check_device(name: str, t: torch.Tensor) -> None:
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


def write_slots_cpu(dst: torch.Tensor, slots: torch.Tensor, *srcs: torch.Tensor, label_src: torch.Tensor | None = None,
                    channels: torch.Tensor | None = None) -> bool:
    """``dst[slots[i]] = cat(src[i] for src in srcs, -1)`` for ``slots[i] >= 0`` in place, by the C++ op (dst
    ``[S, H, W]`` and each src ``[T >= n, H, W_j]`` of one dtype on the CPU, unit stride along the last axis). With
    ``label_src [T >= n, H, D]`` and ``channels`` int64 ``[H, r]``, the last ``r`` columns of head ``h`` take
    ``label_src[i, h, channels[h]]`` (a key's Double Sparsity label, written in the same pass); the widths sum to W.
    Returns False, writing nothing, where the op does not apply (no extension, other strides or dtypes): the caller
    writes another way."""
    ext = cuda_extension()
    if ext is None or not hasattr(ext, "write_slots") or dst.dim() != 3 or (dst.shape[2] > 1 and dst.stride(2) != 1):
        return False
    for src in srcs:
        if src.dim() != 3 or src.dtype != dst.dtype or (src.shape[2] > 1 and src.stride(2) != 1):
            return False
    if label_src is not None and (label_src.dim() != 3 or label_src.dtype != dst.dtype):
        return False
    ext.write_slots(dst, slots.long(), list(srcs), label_src, channels)
    return True


def write_pruned_slots_cpu(dst: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: int) -> bool:
    """Prune ``k, v [T >= n, H, D]`` to their ``keep`` largest magnitudes and pack them into ``dst[slots[i]]``
    (``[S, H, W]``, the layout of :class:`sparse_attn.decode.PrunedSlotFormat`; ``slots[i] < 0`` skipped), by the
    C++ op. Returns False, writing nothing, where the op does not apply (no extension, other strides or dtypes)."""
    ext = cuda_extension()
    if (ext is None or not hasattr(ext, "write_pruned_slots") or dst.dim() != 3 or k.dim() != 3
            or not (k.dtype == v.dtype == dst.dtype) or dst.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1):
        return False
    ext.write_pruned_slots(dst, slots.long(), k, v, int(keep))
    return True


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
    check_device("scores", scores)
    k = _int_arg("k", k, 1)
    sink, recent = _int_arg("sink", sink, 0), _int_arg("recent", recent, 0)
    if sink + recent > k:
        raise ValueError(f"sink + recent ({sink + recent}) must not exceed k ({k})")
    batch = scores.shape[0]
    lengths = _lengths_arg("lengths", lengths, batch, scores.device, upper=scores.shape[2])
    if budgets is not None:
        budgets = _lengths_arg("budgets", budgets, batch, scores.device, upper=k)
    return extension().topk_tokens(scores.float().contiguous(), lengths, k, sink, recent, budgets)


def _int32(values: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return values.to(torch.int32) if isinstance(values, torch.Tensor) else _int32_of(tuple(values))


@functools.lru_cache(maxsize=256)
def _int32_of(values: tuple[int, ...]) -> torch.Tensor:
    """Host lengths as an int32 tensor, shared by the calls that pass the same ones (every layer of a step; the
    kernels only read it)."""
    return torch.tensor(values, dtype=torch.int32)


def block_sparse_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: Sequence[int] | torch.Tensor,
    cu_seqlens_k: Sequence[int] | torch.Tensor | None,
    mask: BlockSparseMask | None,
    causal: bool,
    scale: float | None,
    *,
    block_table: torch.Tensor | None = None,
    kv_lens: Sequence[int] | torch.Tensor | None = None,
    page_size: int = 0,
    q_block_size: int = 64,
    skip_threshold: float = 0.0,
    slot_keep: int = 0,
    new_k: torch.Tensor | None = None,
    new_v: torch.Tensor | None = None,
    checked: bool = False,
    return_stats: bool = False,
):
    """The C++ CPU kernel for block-sparse attention; same results as the PyTorch op
    :func:`sparse_attn.ops.cpu.block_sparse_attention_cpu` (varlen q ``[Tq, Hq, D]``, cu_seqlens as lists or
    tensors, mask broadcastable to ``[B, Hq]``; None reads every key: dense, in blocks of ``q_block_size`` queries).

    Keys are varlen ``k/v [Tk, Hkv, D]`` with ``cu_seqlens_k``, or read in place from pages: ``k/v [num_pages,
    page_size, Hkv, D]`` (any strides, e.g. views of vLLM's pages) with ``block_table [B, max_pages]`` and
    ``kv_lens [B]`` (key t of sequence b in page ``block_table[b, t // page_size]``, ``cu_seqlens_k`` None).

    ``slot_keep`` > 0: the cached rows are KV-pruned slots (:class:`sparse_attn.decode.PrunedSlotFormat` with
    ``keep = slot_keep``; pass the slot tensor as both k and v), unpacked as the kernel reads them. ``new_k/new_v
    [Tq, Hkv, D]``: the step's own tokens (aligned with q), read for each sequence's last q_len positions instead of
    the cache (e.g. unpruned where the cache holds them pruned). The mask may also hold one row per KV head
    (``[B, Hkv, nq, W]``: a GQA group shares its selection).

    Returns out ``[Tq, Hq, D]`` in q's dtype and lse ``[Hq, Tq]`` fp32 (natural log; 0 and -inf for rows that read
    no key); with ``return_stats`` also int64 ``[tiles, skipped tiles]``. Work follows the kept blocks: a flash-style
    loop over each row's KV blocks with an online softmax and fp32 accumulation; rows of few queries over long
    contexts (decode) are split over the threads and merged exactly. ``skip_threshold`` > 0 skips key tiles whose
    scores all lie that far (natural log) below their rows' running maxima (approximate; 0: exact). ``scale=None``
    means ``head_dim ** -0.5``. ``checked=True`` skips the Python argument checks, for entry points that ran them.
    """
    if q.device.type != "cpu":
        raise ValueError(f"q must be a CPU tensor for the C++ CPU kernel, got {q.device}")
    cu_q_t = _int32(cu_seqlens_q)
    paged = block_table is not None
    if paged:
        if cu_seqlens_k is not None or kv_lens is None:
            raise ValueError("paged keys take block_table and kv_lens, not cu_seqlens_k")
        if k.dim() != 4 or v.shape != k.shape:
            raise ValueError(f"paged k/v must be [num_pages, page_size, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
        page_size = k.shape[1]
        k, v = k.flatten(0, 1), v.flatten(0, 1)  # views: rows of slots (a copy only where pages are not strided alike)
        if block_table.dtype != torch.int32:
            block_table = block_table.to(torch.int32)
        kv_lens_t, cu_k_t = _int32(kv_lens), None
    else:
        cu_k_t, kv_lens_t = _int32(cu_seqlens_k), None
    if not checked:
        if slot_keep == 0:
            checks.check_qkv(q, k, v, varlen=True)
        cu_q = checks.check_cu_seqlens("cu_seqlens_q", cu_q_t, q.shape[0], q.device)
        q_lens = [b - a for a, b in zip(cu_q, cu_q[1:])]
        if paged:
            kv = kv_lens_t.tolist()
        else:
            cu_k = checks.check_cu_seqlens("cu_seqlens_k", cu_k_t, k.shape[0], q.device)
            kv = [b - a for a, b in zip(cu_k, cu_k[1:])]
        checks.check_lengths(q_lens, kv, causal)
        if mask is not None:
            checks.check_mask(mask, len(q_lens), q.shape[1], max(q_lens), max(kv), q.device)
    scale = checks.check_scale(scale, q.shape[-1])
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    bq, bk = (mask.q_block_size, mask.kv_block_size) if mask is not None else (q_block_size, q_block_size)
    out, lse, stats = extension().block_sparse_attention_cpu(
        q, k, v, cu_q_t, cu_k_t, kv_lens_t, block_table, page_size,
        None if mask is None else mask.kv_num_blocks, None if mask is None else mask.kv_indices,
        bq, bk, bool(causal), scale, float(skip_threshold), int(slot_keep), new_k, new_v,
    )
    return (out, lse, stats) if return_stats else (out, lse)


def pooled_block_scores_cpu(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, kv_block_size: int, scale: float,
                            causal: bool, mean: bool, products: str = "auto") -> torch.Tensor:
    """The C++ kernel behind :func:`sparse_attn.patterns.head_proxy.pooled_block_probs` on CPU tensors (same
    arguments; fp32/fp16/bf16): softmax probabilities of sampled rows pooled per block, computed tile by tile.

    ``products`` chooses the score products: ``"fp32"`` is exact (the exponentials, a degree-4 polynomial, are
    within 2.7e-6 relative); ``"bf16"`` (CPUs with AVX512-BF16) scores q (scaled
    to log2 units) and k rounded to bf16 with fp32 sums; ``"int16"`` (CPUs with AVX512-VNNI) scores rows quantized
    to 16-bit integers with one scale per row (about 12 bits of the row's largest value at head dim 64) with int32
    sums; both run twice the products per instruction of fp32, for head dims that are multiples of 32. ``"auto"``
    (the default) takes bf16, else int16, else fp32 (:func:`estimate_products` says which). An estimate, not an
    attention output, so the rounding only matters where two blocks tie to about 3 digits (bf16 on SmolLM2's layers
    at 7.5k tokens moved 0.2% of the selected blocks and left the attention error against dense unchanged to 4
    digits)."""
    return extension().pooled_block_scores(q, k, pos.to(torch.int32), int(kv_block_size), float(scale), bool(causal),
                                           bool(mean), str(products))


def estimate_products(head_dim: int) -> str:
    """The score products :func:`pooled_block_scores_cpu` uses on this CPU under ``products="auto"``: ``"bf16"``,
    ``"int16"`` or ``"fp32"`` (``"fp32"`` where the extension is not built)."""
    if not extension_available("pooled_block_scores"):
        return "fp32"
    return extension().estimate_products(int(head_dim))


def select_blocks_cpu(scores: torch.Tensor, budgets: torch.Tensor, proxy_of_head: torch.Tensor, bounds: torch.Tensor,
                      diag: torch.Tensor, tail_from: int) -> torch.Tensor:
    """The C++ block selection behind :meth:`sparse_attn.patterns.head_proxy.HeadProxy.select` on CPU tensors: scores
    fp32 ``[P, nq, nk]``, per query head its budget in blocks and its proxy ``[Hq]``, per query block its visible
    blocks (``j < bounds[i]``) and the block kept beside the sink (``diag[i]``, -1 none) ``[nq]``; query blocks from
    ``tail_from`` on keep every block. Returns bool ``[Hq, nq, nk]``; equal scores rank the lower block first."""
    return extension().select_blocks(scores.float(), budgets.to(torch.int64), proxy_of_head.to(torch.int64),
                                     bounds.to(torch.int64), diag.to(torch.int64), int(tail_from))


def select_block_rows_cpu(scores: torch.Tensor, budgets: torch.Tensor, proxy_of_head: torch.Tensor,
                          bounds: torch.Tensor, diag: torch.Tensor, tail_from: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_blocks_cpu`'s selection as block rows, clipped to the visible blocks ``j < bounds[i]``: int32
    ``counts [Hq, nq]`` and ``indices [Hq, nq, W]`` (ascending, zero past each count, W the largest count), without
    the boolean block matrix."""
    return extension().select_block_rows(scores.float(), budgets.to(torch.int64), proxy_of_head.to(torch.int64),
                                         bounds.to(torch.int64), diag.to(torch.int64), int(tail_from))


def decode_select_cpu(q: torch.Tensor, labels: torch.Tensor, channels: torch.Tensor, block_table: torch.Tensor,
                      kv_lens: torch.Tensor, budgets: torch.Tensor, width: int, *, sink: int, recent: int,
                      per_group: bool = True, reduce_max: bool = True, slot_keep: int = 0,
                      label_scales: torch.Tensor | None = None, label_bits: int = 16
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode token selection read from pages in place (the C++ op ``decode_select``): q ``[B, Hq, D]``; ``labels``
    ``[num_pages, page_size, Hkv, W]`` (any strides, e.g. a view of a KV page) holding each token's label (its r
    channels of K, or the key itself for exact scores; with ``slot_keep`` > 0 pruned K slots, unpacked); ``channels``
    ``[Hkv, r]``; ``block_table [B, max_pages]``, ``kv_lens [B]``, ``budgets [B]`` (tokens kept, <= width).

    Returns int32 ``indices [B, H, width]`` (ascending, zero-padded past the count) and ``counts [B, H]``, H = Hkv
    with ``per_group`` (the group's scores reduced by max or sum) else Hq: the sink tokens, the recent tokens and the
    best-scoring others. Quantized labels (``label_bits`` 8: int8 codes; 4: uint8, two codes per byte, as
    :class:`~sparse_attn.decode.double_sparsity.LabelCache` stores them) are scored as ``code * scale`` with
    ``label_scales [num_pages, page_size, Hkv]`` fp16."""
    return extension().decode_select(
        q, labels.flatten(0, 1), channels.to(torch.int64), block_table.to(torch.int32), labels.shape[1],
        kv_lens.to(torch.int32), budgets.to(torch.int32), int(width), int(sink), int(recent), int(slot_keep),
        bool(per_group), bool(reduce_max), None if label_scales is None else label_scales.flatten(0, 1),
        int(label_bits),
    )
