"""The one sparse representation every method produces and every kernel consumes.

A :class:`BlockSparseMask` answers, for each (sequence, head, query block), which KV blocks are read.
Row ``[b, h, i]`` lists ``kv_num_blocks[b, h, i]`` block ids in ``kv_indices[b, h, i, :]`` (ascending; the tail past
the count is padding and never read). Query block ``i`` holds the local query rows ``[i*Bq, (i+1)*Bq)`` of a
sequence; KV block ``j`` holds the keys ``[j*Bk, (j+1)*Bk)``. Queries are the *last* ``q_len`` positions of a
``kv_len`` context (chunked prefill, decode), so local query row ``m`` sits at absolute position ``kv_len - q_len + m``.

Causality is not baked into the blocks: kernels apply the token-level causal rule on top of the blocks they read.
Builders leave out blocks that causality empties anyway, so work stays proportional to what is read.

Decode selections are the same object with one query row and ``kv_block_size == 1`` (token indices), or a page
size (page indices): one representation across phases, one set of checks.

Batch and head dimensions may be 1 to broadcast (like FlexAttention's BlockMask): a mask shared by all heads is
built once and read through stride-0 views.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["BlockSparseMask", "causal_block_bounds", "num_blocks"]


def num_blocks(length: int, block_size: int) -> int:
    """Blocks needed to cover ``length`` items (ceil division)."""
    return -(-length // block_size)


def causal_block_bounds(q_len: int, kv_len: int, q_block_size: int, kv_block_size: int, device=None) -> torch.Tensor:
    """For each query block, one past the last KV block that any of its rows may see causally.

    The last row of query block i is at absolute position ``kv_len - q_len + min((i+1)*Bq, q_len) - 1``; it sees
    keys up to and including that position. Returns an int64 tensor ``[num_q_blocks]``.
    """
    nq = num_blocks(q_len, q_block_size)
    last_row = torch.clamp(torch.arange(1, nq + 1, device=device) * q_block_size, max=q_len) - 1
    last_key = kv_len - q_len + last_row
    return torch.clamp(last_key // kv_block_size + 1, min=0, max=num_blocks(kv_len, kv_block_size))


def _block_rows_op():
    """The extension's ``block_rows`` (CPU compression of a boolean block matrix), or None where it is not built.
    Imported on first use: masks sit below the operators, so nothing here needs the extension to import."""
    global _BLOCK_ROWS
    if _BLOCK_ROWS is False:
        try:
            from .. import _C
            _BLOCK_ROWS = getattr(_C, "block_rows", None)
        except ImportError:
            _BLOCK_ROWS = None
    return _BLOCK_ROWS


_BLOCK_ROWS = False


@dataclass(frozen=True)
class BlockSparseMask:
    """Block-sparse rows: which KV blocks each (sequence, head, query block) reads.

    Attributes:
        kv_num_blocks: int32 ``[B, H, num_q_blocks]``, blocks kept per row.
        kv_indices: int32 ``[B, H, num_q_blocks, max_kv_blocks]``, ascending block ids, padded past the count.
        q_block_size: query rows per block (Bq).
        kv_block_size: keys per block (Bk); 1 for token-level decode selections.
        q_len: the (maximum) query length the mask was built for.
        kv_len: the (maximum) context length the mask was built for.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    q_block_size: int
    kv_block_size: int
    q_len: int
    kv_len: int
    # Set once the values passed validate() (or were built valid), so a mask planned once is not re-read per run.
    values_checked: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self):
        # Structure only: value checks read the tensors (a device sync), so entry points run them explicitly.
        self.validate(check_values=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_block_bool(
        cls, keep: torch.Tensor, *, q_block_size: int, kv_block_size: int, q_len: int, kv_len: int
    ) -> "BlockSparseMask":
        """Compress a dense boolean block matrix ``keep[B, H, num_q_blocks, num_kv_blocks]`` into block rows.

        Every builder ends here, so the invariants (ascending ids, padding past the count) are made in one place.
        """
        if keep.dim() != 4 or keep.dtype != torch.bool:
            raise ValueError(f"keep must be a bool tensor [B, H, num_q_blocks, num_kv_blocks], got {tuple(keep.shape)} {keep.dtype}")
        nq, nk = num_blocks(q_len, q_block_size), num_blocks(kv_len, kv_block_size)
        if keep.shape[2] != nq or keep.shape[3] != nk:
            raise ValueError(
                f"keep has {keep.shape[2]} x {keep.shape[3]} blocks, but q_len={q_len}, kv_len={kv_len} with blocks "
                f"({q_block_size}, {kv_block_size}) need {nq} x {nk}"
            )
        if keep.device.type == "cpu" and nk and _block_rows_op() is not None:  # the same rows in one C++ pass
            counts, indices = _block_rows_op()(keep)
            return cls(counts, indices, q_block_size, kv_block_size, q_len, kv_len, values_checked=True)
        slot = keep.cumsum(-1, dtype=torch.int32)  # a kept block's place in its row is the kept blocks up to it
        counts = slot[..., -1].contiguous() if nk else torch.zeros(keep.shape[:3], dtype=torch.int32)
        width = max(int(counts.max()) if counts.numel() else 0, 1)
        # Kept block j goes to slot[j] - 1 (so ids ascend); the rest to a spare column past the width, then dropped.
        slot = torch.where(keep, slot - 1, width).to(torch.int64)
        ids = torch.arange(nk, dtype=torch.int32, device=keep.device).expand_as(slot)
        order = torch.zeros(*keep.shape[:3], width + 1, dtype=torch.int32, device=keep.device)
        order.scatter_(-1, slot, ids)
        return cls(counts, order[..., :width].contiguous(), q_block_size, kv_block_size, q_len, kv_len,
                   values_checked=True)

    @classmethod
    def full(cls, *, q_len: int, kv_len: int, q_block_size: int, kv_block_size: int, causal: bool = True,
             device=None) -> "BlockSparseMask":
        """Every block each query block may see (causally, with queries the last q_len positions): the dense mask,
        one row broadcast over batch and heads."""
        nq, nk = num_blocks(q_len, q_block_size), num_blocks(kv_len, kv_block_size)
        if causal:
            counts = causal_block_bounds(q_len, kv_len, q_block_size, kv_block_size, device)
        else:
            counts = torch.full((nq,), nk, dtype=torch.int64, device=device)
        indices = torch.arange(max(nk, 1), dtype=torch.int32, device=device).expand(nq, -1)
        return cls(counts.to(torch.int32).view(1, 1, nq), indices.reshape(1, 1, nq, -1), q_block_size, kv_block_size,
                   q_len, kv_len, values_checked=True)

    @classmethod
    def from_token_indices(cls, indices: torch.Tensor, counts: torch.Tensor, *, kv_len: int) -> "BlockSparseMask":
        """A decode selection: ``indices[B, H, k]`` token positions (ascending within the count), ``counts[B, H]``."""
        if indices.dim() != 3 or counts.dim() != 2 or counts.shape != indices.shape[:2]:
            raise ValueError(f"indices must be [B, H, k] and counts [B, H], got {tuple(indices.shape)} and {tuple(counts.shape)}")
        return cls(counts.to(torch.int32).unsqueeze(-1).contiguous(), indices.to(torch.int32).unsqueeze(2).contiguous(), 1, 1, 1, kv_len)

    # ------------------------------------------------------------------ views
    @property
    def batch(self) -> int:
        return self.kv_num_blocks.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_num_blocks.shape[2]

    @property
    def num_kv_blocks(self) -> int:
        return num_blocks(self.kv_len, self.kv_block_size)

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    def to_block_bool(self) -> torch.Tensor:
        """The dense boolean block matrix ``[B, H, num_q_blocks, num_kv_blocks]`` (inverse of from_block_bool)."""
        width = self.kv_indices.shape[-1]
        valid = torch.arange(width, device=self.device) < self.kv_num_blocks.unsqueeze(-1)
        keep = torch.zeros(*self.kv_num_blocks.shape, self.num_kv_blocks + 1, dtype=torch.bool, device=self.device)
        # Padding slots scatter into an extra column that is dropped.
        target = torch.where(valid, self.kv_indices.long(), self.num_kv_blocks)
        keep.scatter_(-1, target, True)
        return keep[..., : self.num_kv_blocks]

    def to_token_mask(self, q_len: int | None = None, kv_len: int | None = None) -> torch.Tensor:
        """Expand to a boolean token mask ``[B, H, q_len, kv_len]`` (blocks only; causality is not applied)."""
        q_len = self.q_len if q_len is None else q_len
        kv_len = self.kv_len if kv_len is None else kv_len
        keep = self.to_block_bool()
        keep = keep.repeat_interleave(self.q_block_size, dim=2)[:, :, :q_len]
        return keep.repeat_interleave(self.kv_block_size, dim=3)[..., :kv_len]

    def density(self, causal: bool = True) -> float:
        """Fraction of the (causal) block area that is read, averaged over batch and heads."""
        kept = self.kv_num_blocks.double().sum()
        if causal:
            area = causal_block_bounds(self.q_len, self.kv_len, self.q_block_size, self.kv_block_size, self.device).sum()
        else:
            area = torch.tensor(self.num_q_blocks * self.num_kv_blocks)
        return float(kept / (area.double() * self.batch * self.heads)) if area > 0 else 1.0

    def expand(self, batch: int, heads: int) -> "BlockSparseMask":
        """Broadcast a size-1 batch or head dimension (stride-0 views, no copy)."""
        b, h = self.batch, self.heads
        if (b not in (1, batch)) or (h not in (1, heads)):
            raise ValueError(f"mask of batch {b}, heads {h} cannot broadcast to batch {batch}, heads {heads}")
        return BlockSparseMask(
            self.kv_num_blocks.expand(batch, heads, -1),
            self.kv_indices.expand(batch, heads, -1, -1),
            self.q_block_size, self.kv_block_size, self.q_len, self.kv_len, self.values_checked,
        )

    def to(self, device) -> "BlockSparseMask":
        return BlockSparseMask(
            self.kv_num_blocks.to(device), self.kv_indices.to(device),
            self.q_block_size, self.kv_block_size, self.q_len, self.kv_len, self.values_checked,
        )

    # ------------------------------------------------------------------ checks
    def validate(self, check_values: bool = True) -> None:
        """Raise ValueError naming the field that breaks the representation's invariants."""
        n, idx = self.kv_num_blocks, self.kv_indices
        for name, t in (("kv_num_blocks", n), ("kv_indices", idx)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.int32:
                raise ValueError(f"{name} must be int32, got {t.dtype}")
        if n.dim() != 3:
            raise ValueError(f"kv_num_blocks must be [B, H, num_q_blocks], got shape {tuple(n.shape)}")
        if idx.dim() != 4 or idx.shape[:3] != n.shape:
            raise ValueError(f"kv_indices must be [B, H, num_q_blocks, max_kv_blocks] matching kv_num_blocks {tuple(n.shape)}, got {tuple(idx.shape)}")
        if idx.device != n.device:
            raise ValueError(f"kv_indices is on {idx.device} but kv_num_blocks on {n.device}")
        for name in ("q_block_size", "kv_block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("q_len", "kv_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if n.shape[2] != num_blocks(self.q_len, self.q_block_size) and not (self.q_len == 0 and n.shape[2] == 0):
            raise ValueError(
                f"kv_num_blocks has {n.shape[2]} query blocks, but q_len={self.q_len} with q_block_size="
                f"{self.q_block_size} needs {num_blocks(self.q_len, self.q_block_size)}"
            )
        if not check_values or n.numel() == 0:
            return
        if int(n.min()) < 0 or int(n.max()) > idx.shape[-1]:
            raise ValueError(f"kv_num_blocks must lie in [0, {idx.shape[-1]}], got range [{int(n.min())}, {int(n.max())}]")
        valid = torch.arange(idx.shape[-1], device=idx.device) < n.unsqueeze(-1)
        used = idx[valid]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= self.num_kv_blocks):
            raise ValueError(
                f"kv_indices out of range: block ids must lie in [0, {self.num_kv_blocks}) for kv_len={self.kv_len}, "
                f"kv_block_size={self.kv_block_size}; got [{int(used.min())}, {int(used.max())}]"
            )
        if idx.shape[-1] > 1:
            ascending = idx[..., 1:] > idx[..., :-1]
            if not bool((ascending | ~valid[..., 1:]).all()):
                raise ValueError("kv_indices must be strictly ascending within each row's kv_num_blocks entries")
        object.__setattr__(self, "values_checked", True)
