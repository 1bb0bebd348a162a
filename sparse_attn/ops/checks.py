"""Input checks for the attention entry points: every bad input fails here with the argument named, never in a kernel."""

from __future__ import annotations

import torch

from ..masks import BlockSparseMask, num_blocks

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, varlen: bool, dtypes=KERNEL_DTYPES) -> None:
    """q/k/v: ``[B, H, S, D]`` (padded) or ``[T, H, D]`` (varlen); same dtype and device; Hq divisible by Hkv."""
    rank = 3 if varlen else 4
    layout = "[T, H, D] with cu_seqlens" if varlen else "[B, H, S, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must have rank {rank} ({layout}), got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: {', '.join(str(d) for d in dtypes)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share a dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; q, k and v must share a device")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    head_dim = -1
    if q.shape[head_dim] != k.shape[head_dim]:
        raise ValueError(f"q head_dim {q.shape[-1]} != k head_dim {k.shape[-1]}")
    if q.shape[-1] == 0:
        raise ValueError("head_dim must be positive")
    head_axis = -2 if varlen else 1
    hq, hkv = q.shape[head_axis], k.shape[head_axis]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"number of query heads ({hq}) must be a positive multiple of the number of KV heads ({hkv})")
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(f"q batch {q.shape[0]} != k batch {k.shape[0]}")


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device) -> list[int]:
    """cu_seqlens: int32 [B+1], starting at 0, non-decreasing, ending at the token count. Returns it as a list."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor [batch + 1], got {getattr(cu, 'shape', type(cu).__name__)}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    values = cu.tolist()
    if values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {values[:8]}{'...' if len(values) > 8 else ''}")
    if values[-1] != total:
        raise ValueError(f"{name} ends at {values[-1]} but the tensor holds {total} tokens")
    return values


def check_paged(block_table, kv_lens: list[int], batch: int, page_size: int, num_pages: int, device, *,
                check_values: bool = True) -> None:
    """Paged keys: ``block_table`` an integer ``[B, max_pages]`` tensor on ``device`` whose pages cover every
    sequence (``kv_lens`` per sequence, a host list) and (``check_values``, CPU tensors) whose used entries lie in
    ``[0, num_pages)``."""
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be a [B={batch}, max_pages] tensor, got "
                         f"{tuple(getattr(block_table, 'shape', ()))}")
    if block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table must be int32 or int64, got {block_table.dtype}")
    if block_table.device != device:
        raise ValueError(f"block_table is on {block_table.device} but q is on {device}")
    if len(kv_lens) != batch:
        raise ValueError(f"kv_lens has {len(kv_lens)} entries for a batch of {batch}")
    capacity = block_table.shape[1] * page_size
    if any(n < 0 or n > capacity for n in kv_lens):
        raise ValueError(f"kv_lens must lie in [0, {capacity}] (block_table pages x page_size), got {kv_lens}")
    if check_values and device.type == "cpu" and batch:
        used = torch.arange(block_table.shape[1]) < torch.tensor([-(-n // page_size) for n in kv_lens])[:, None]
        pages = block_table[used]
        if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= num_pages):
            raise ValueError(f"block_table entries of used pages must lie in [0, {num_pages}), got "
                             f"[{int(pages.min())}, {int(pages.max())}]")


def check_lengths(q_lens: list[int], kv_lens: list[int], causal: bool) -> None:
    if len(q_lens) != len(kv_lens):
        raise ValueError(f"cu_seqlens_q describes {len(q_lens)} sequences but cu_seqlens_k {len(kv_lens)}")
    if causal:
        for b, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
            if ql > kl:
                raise ValueError(
                    f"sequence {b}: q_len {ql} > kv_len {kl}; with causal=True the queries are the last q_len "
                    f"positions of the context, so q_len <= kv_len"
                )


def check_mask(mask: BlockSparseMask, batch: int, heads: int, max_q_len: int, max_kv_len: int, device: torch.device) -> None:
    if not isinstance(mask, BlockSparseMask):
        raise ValueError(f"mask must be a BlockSparseMask, got {type(mask).__name__}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but q is on {device}")
    if mask.batch not in (1, batch):
        raise ValueError(f"mask batch {mask.batch} must be 1 or the batch size {batch}")
    if mask.heads not in (1, heads):
        raise ValueError(f"mask heads {mask.heads} must be 1 or the number of query heads {heads}")
    if mask.num_q_blocks < num_blocks(max_q_len, mask.q_block_size):
        raise ValueError(
            f"mask has {mask.num_q_blocks} query blocks of {mask.q_block_size}, too few for q_len {max_q_len}"
        )
    if mask.kv_len < max_kv_len:
        raise ValueError(f"mask was built for kv_len {mask.kv_len}, but the context holds {max_kv_len} keys")
    if not mask.values_checked:  # masks from the builders are valid by construction; others are read once
        mask.validate(check_values=True)


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    scale = float(scale)
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return scale
