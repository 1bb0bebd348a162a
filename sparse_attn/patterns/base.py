"""Patterns: the small abstraction every method compiles to a :class:`BlockSparseMask`.

A pattern says, for one sequence, which (query block, KV block) pairs each head reads, as a boolean block matrix
``[H or 1, num_q_blocks, num_kv_blocks]``. :meth:`Pattern.build_mask` runs it per sequence of a (ragged) batch, clips
the blocks that causality empties, and compresses the result into block rows: clipping and compression live here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..masks import BlockSparseMask, causal_block_bounds, num_blocks


@dataclass(frozen=True)
class SeqContext:
    """One sequence as a pattern sees it. ``q``/``k`` are ``[len, H, D]`` slices (None for static patterns' callers)."""

    q_len: int
    kv_len: int
    num_heads: int
    q_block_size: int
    kv_block_size: int
    causal: bool
    device: torch.device
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    scale: float | None = None

    @property
    def num_q_blocks(self) -> int:
        return num_blocks(self.q_len, self.q_block_size)

    @property
    def num_kv_blocks(self) -> int:
        return num_blocks(self.kv_len, self.kv_block_size)

    @property
    def q_offset(self) -> int:
        """Absolute position of the first query row (queries are the last q_len positions of the context)."""
        return self.kv_len - self.q_len

    def q_block_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute positions of the first and last query row of each query block, ``[num_q_blocks]`` each."""
        i = torch.arange(self.num_q_blocks, device=self.device)
        first = i * self.q_block_size + self.q_offset
        last = torch.clamp((i + 1) * self.q_block_size, max=self.q_len) - 1 + self.q_offset
        return first, last

    def kv_block_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last key position of each KV block, ``[num_kv_blocks]`` each."""
        j = torch.arange(self.num_kv_blocks, device=self.device)
        return j * self.kv_block_size, torch.clamp((j + 1) * self.kv_block_size, max=self.kv_len) - 1

    def own_blocks(self, back: int = 0) -> torch.Tensor:
        """``[num_q_blocks, num_kv_blocks]``: the KV blocks holding the query block's own rows (first_row // Bk to
        last_row // Bk; several when Bq > Bk or the query offset is not block-aligned), extended ``back`` blocks."""
        first_row, last_row = self.q_block_rows()
        j = torch.arange(self.num_kv_blocks, device=self.device)[None, :]
        return (j >= (first_row // self.kv_block_size - back)[:, None]) & (j <= (last_row // self.kv_block_size)[:, None])

    def causal_keep(self) -> torch.Tensor:
        """``[num_q_blocks, num_kv_blocks]``: blocks holding at least one key some row of the query block may see."""
        bound = causal_block_bounds(self.q_len, self.kv_len, self.q_block_size, self.kv_block_size, self.device)
        return torch.arange(self.num_kv_blocks, device=self.device)[None, :] < bound[:, None]

    def require_qk(self, pattern: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q is None or self.k is None:
            raise ValueError(f"{pattern} is content-aware: build_mask needs q and k")
        return self.q, self.k


class Pattern:
    """Base class: subclasses implement :meth:`keep_blocks` for one sequence."""

    #: True when keep_blocks reads q and k (so callers must pass them).
    content_aware: bool = False

    def keep_blocks(self, seq: SeqContext) -> torch.Tensor:
        """Boolean ``[H or 1, num_q_blocks, num_kv_blocks]`` for one sequence (before causal clipping)."""
        raise NotImplementedError

    def block_rows(self, seq: SeqContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Optionally, the mask rows of :meth:`keep_blocks` made directly, clipped to the blocks a causal query
        block can see: int32 ``counts [H or 1, num_q_blocks]`` and ``indices [H or 1, num_q_blocks, W]`` (ascending,
        zero past each count). None (the default): :meth:`build_mask` compresses :meth:`keep_blocks` instead."""
        return None

    def check_heads(self, num_heads: int, num_kv_heads: int) -> None:
        """Raise ValueError naming the parameter where the pattern cannot run on layers of ``num_heads`` query heads
        and ``num_kv_heads`` KV heads (per-head values of another count, groups that do not divide the KV heads):
        callers that know the model check this when they are configured, before the first prompt."""

    def build_mask(
        self,
        *,
        q_lens: int | Sequence[int],
        kv_lens: int | Sequence[int],
        num_heads: int,
        q_block_size: int = 64,
        kv_block_size: int = 64,
        causal: bool = True,
        device: torch.device | str = "cpu",
        q: torch.Tensor | None = None,
        k: torch.Tensor | None = None,
        cu_seqlens_q: Sequence[int] | None = None,
        cu_seqlens_k: Sequence[int] | None = None,
        scale: float | None = None,
    ) -> BlockSparseMask:
        """Build the mask for a batch. Lengths are per sequence (an int means a batch of one).

        Content-aware patterns need q ``[Tq, Hq, D]`` and k ``[Tk, Hkv, D]`` in the varlen layout with
        ``cu_seqlens_q/k`` (host lists or tensors); for a batch of one they may be omitted.
        """
        q_lens = [q_lens] if isinstance(q_lens, int) else list(q_lens)
        kv_lens = [kv_lens] if isinstance(kv_lens, int) else list(kv_lens)
        if len(q_lens) != len(kv_lens) or not q_lens:
            raise ValueError(f"q_lens and kv_lens must describe the same, non-empty batch; got {q_lens} and {kv_lens}")
        for name, v in (("q_block_size", q_block_size), ("kv_block_size", kv_block_size), ("num_heads", num_heads)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if causal and any(ql > kl for ql, kl in zip(q_lens, kv_lens)):
            raise ValueError(f"causal masks need q_len <= kv_len per sequence, got q_lens {q_lens}, kv_lens {kv_lens}")
        if self.content_aware and (q is None or k is None):
            raise ValueError(f"{type(self).__name__} is content-aware: build_mask needs q and k")
        device = torch.device(device) if q is None else q.device
        cu_q = _offsets(cu_seqlens_q, q_lens)
        cu_k = _offsets(cu_seqlens_k, kv_lens)

        max_q, max_kv = max(q_lens), max(kv_lens)
        nq, nk = num_blocks(max_q, q_block_size), num_blocks(max_kv, kv_block_size)
        rows = []
        for b, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
            seq = SeqContext(
                ql, kl, num_heads, q_block_size, kv_block_size, causal, device,
                None if q is None else q[cu_q[b] : cu_q[b] + ql],
                None if k is None else k[cu_k[b] : cu_k[b] + kl],
                scale,
            )
            fast = self.block_rows(seq)
            if fast is not None:
                rows.append(fast)
                continue
            keep = self.keep_blocks(seq)
            if keep.dim() != 3 or keep.shape[1:] != (seq.num_q_blocks, seq.num_kv_blocks) or keep.shape[0] not in (1, num_heads):
                raise ValueError(
                    f"{type(self).__name__}.keep_blocks returned {tuple(keep.shape)}, expected "
                    f"[1 or {num_heads}, {seq.num_q_blocks}, {seq.num_kv_blocks}]"
                )
            if causal:
                keep = keep & seq.causal_keep()
            if keep.shape[1:] != (nq, nk):  # a shorter sequence of a ragged batch
                keep = torch.nn.functional.pad(keep, (0, nk - keep.shape[2], 0, nq - keep.shape[1]))
            rows.append(keep)
        heads = max(r[0].shape[0] if isinstance(r, tuple) else r.shape[0] for r in rows)
        if not any(isinstance(r, tuple) for r in rows):
            keep = rows[0][None] if len(rows) == 1 else torch.stack([r.expand(heads, -1, -1) for r in rows])
            return BlockSparseMask.from_block_bool(
                keep, q_block_size=q_block_size, kv_block_size=kv_block_size, q_len=max_q, kv_len=max_kv
            )
        return _stack_rows(rows, heads, nq, q_block_size, kv_block_size, max_q, max_kv)


def _stack_rows(rows: list, heads: int, nq: int, q_block_size: int, kv_block_size: int, q_len: int,
                kv_len: int) -> BlockSparseMask:
    """One batch mask from per-sequence block rows ``(counts [H', nq_b], indices [H', nq_b, W_b])`` or boolean
    blocks ``[H', nq, nk]`` (causally clipped): rows padded to the batch's query blocks and widest row."""
    as_rows = []
    for r in rows:
        as_rows.append(r if isinstance(r, tuple) else _bool_rows(r, q_block_size, kv_block_size, q_len, kv_len))
    width = max(idx.shape[-1] for _, idx in as_rows)
    counts = torch.zeros(len(rows), heads, nq, dtype=torch.int32, device=as_rows[0][0].device)
    indices = torch.zeros(len(rows), heads, nq, width, dtype=torch.int32, device=counts.device)
    for b, (cnt, idx) in enumerate(as_rows):
        counts[b, :, : cnt.shape[1]] = cnt
        indices[b, :, : idx.shape[1], : idx.shape[2]] = idx
    return BlockSparseMask(counts, indices, q_block_size, kv_block_size, q_len, kv_len, values_checked=True)


def _bool_rows(keep: torch.Tensor, q_block_size: int, kv_block_size: int, q_len: int,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean blocks ``[H', nq, nk]`` (causally clipped) as block rows ``(counts [H', nq], indices [H', nq, W])``."""
    mask = BlockSparseMask.from_block_bool(keep[None], q_block_size=q_block_size, kv_block_size=kv_block_size,
                                           q_len=q_len, kv_len=kv_len)
    return mask.kv_num_blocks[0], mask.kv_indices[0]


def _offsets(cu: Sequence[int] | torch.Tensor | None, lens: list[int]) -> list[int]:
    if cu is None:
        out = [0]
        for n in lens:
            out.append(out[-1] + n)
        return out
    return cu.tolist() if isinstance(cu, torch.Tensor) else list(cu)


@dataclass(frozen=True)
class PerHead(Pattern):
    """A different pattern per query head: how a plan mixes methods inside one layer."""

    patterns: tuple[Pattern, ...]

    def __post_init__(self):
        object.__setattr__(self, "patterns", tuple(self.patterns))
        if not self.patterns or not all(isinstance(p, Pattern) for p in self.patterns):
            raise ValueError("PerHead needs a non-empty sequence of Pattern objects")

    @property
    def content_aware(self) -> bool:  # type: ignore[override]
        return any(p.content_aware for p in self.patterns)

    def check_heads(self, num_heads: int, num_kv_heads: int) -> None:
        if len(self.patterns) != num_heads:
            raise ValueError(f"PerHead has {len(self.patterns)} patterns but the layer has {num_heads} query heads")
        for pattern in {id(p): p for p in self.patterns}.values():
            pattern.check_heads(num_heads, num_kv_heads)

    def keep_blocks(self, seq: SeqContext) -> torch.Tensor:
        if len(self.patterns) != seq.num_heads:
            raise ValueError(f"PerHead has {len(self.patterns)} patterns but the layer has {seq.num_heads} query heads")
        rows, computed = [], {}  # a pattern object shared by several heads runs once
        for h, pattern in enumerate(self.patterns):
            if id(pattern) not in computed:
                computed[id(pattern)] = pattern.keep_blocks(seq)
            keep = computed[id(pattern)]
            rows.append(keep[h if keep.shape[0] > 1 else 0])
        return torch.stack(rows)

    def block_rows(self, seq: SeqContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's row from its pattern: the pattern's own block rows where it makes them, else its
        keep_blocks, causally clipped and compressed."""
        if len(self.patterns) != seq.num_heads:
            raise ValueError(f"PerHead has {len(self.patterns)} patterns but the layer has {seq.num_heads} query heads")
        computed = {}  # a pattern object shared by several heads runs once
        for pattern in self.patterns:
            if id(pattern) in computed:
                continue
            rows = pattern.block_rows(seq)
            if rows is None:
                keep = pattern.keep_blocks(seq)
                if seq.causal:
                    keep = keep & seq.causal_keep()
                rows = _bool_rows(keep, seq.q_block_size, seq.kv_block_size, seq.q_len, seq.kv_len)
            computed[id(pattern)] = rows
        picked = []
        for h, pattern in enumerate(self.patterns):
            counts, indices = computed[id(pattern)]
            j = h if counts.shape[0] > 1 else 0
            picked.append((counts[j], indices[j]))
        width = max(idx.shape[-1] for _, idx in picked)
        counts = torch.stack([c for c, _ in picked])
        indices = torch.stack([torch.nn.functional.pad(idx, (0, width - idx.shape[-1])) for _, idx in picked])
        return counts, indices
