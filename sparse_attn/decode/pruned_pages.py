"""KV-cache pruning in fixed-size page slots, for serving engines whose KV page holds one slot per token and KV head.

Every token's K and V vectors (per KV head) keep the same number ``m = keep_count(D, sparsity)`` of values, chosen by
the per-token magnitude selection of :mod:`sparse_attn.decode.compressed` (largest |x|, ties to the lower channel), so
a pruned token fits a slot of fixed size and the engine's page shrinks: its allocator fits more tokens in the same
memory. A slot holds, in the cache dtype::

    [ K's m kept values | V's m kept values | K's keep bitmap, V's keep bitmap (ceil(D/8) bytes each) | padding ]

Values are in channel order; bit ``i`` of bitmap byte ``j`` is set when channel ``8j + i`` was kept (a kept value may
itself be 0: the bitmap marks what was kept). The two bitmaps are padded to a whole number of cache elements.

Why a bitmap and not m channel ids (uint8 for D <= 256): the bitmap costs D bits per vector where ids cost m bytes, so
it is smaller whenever more than 1/8 of the channels are kept (D=64, fp16, sparsity 0.5: 144 B per token and head
against 192 B with ids and 256 B dense); and it reads just as simply: bits -> keep mask, its cumsum ranks each kept
channel among the values, one gather (:func:`sparse_attn.decode.compressed.decompress_tokens`), where ids need a
scatter. It is Mustafar's format (64-channel tiles with a 64-bit bitmap each), stored bytewise so the bitmap needs no
8-byte alignment inside the page.

With ``m == D`` nothing is pruned and the slot is the dense ``K | V`` layout, bit for bit, without bitmaps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.extension import write_pruned_slots_cpu
from .compressed import CACHE_DTYPES, TILE, check_sparsity, compress_tokens, decompress_tokens, keep_count, num_tiles
from .paged import flat_slots, write_tokens

__all__ = ["PrunedSlotFormat"]


def _byte_shifts(device) -> torch.Tensor:
    return 8 * torch.arange(TILE // 8, device=device)


@dataclass(frozen=True)
class PrunedSlotFormat:
    """The slot of one token and KV head: ``head_dim`` channels per vector, ``keep`` values kept of each of K and V,
    stored in ``dtype`` (the cache dtype). :meth:`pack` / :meth:`unpack` convert between dense K/V and slots."""

    head_dim: int
    keep: int
    dtype: torch.dtype

    def __post_init__(self):
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or not 1 <= self.head_dim <= 256:
            raise ValueError(f"head_dim must be an int in [1, 256], got {self.head_dim!r}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or not 1 <= self.keep <= self.head_dim:
            raise ValueError(f"keep must be an int in [1, head_dim={self.head_dim}], got {self.keep!r}")
        if self.dtype not in CACHE_DTYPES:
            raise ValueError(f"dtype must be one of {CACHE_DTYPES} (a quantized cache cannot be pruned), "
                             f"got {self.dtype}")

    @classmethod
    def for_sparsity(cls, head_dim: int, sparsity: float, dtype: torch.dtype) -> "PrunedSlotFormat":
        """The slot that keeps ``keep_count(head_dim, sparsity)`` values per vector (round((1 - s) * D), >= 1)."""
        check_sparsity(sparsity)
        return cls(head_dim, keep_count(head_dim, sparsity), dtype)

    @property
    def pruned(self) -> bool:
        return self.keep < self.head_dim

    @property
    def bitmap_bytes(self) -> int:
        """Bytes of one vector's keep bitmap."""
        return -(-self.head_dim // 8)

    @property
    def bitmap_width(self) -> int:
        """Cache elements holding the K and V bitmaps (0 when nothing is pruned)."""
        return -(-2 * self.bitmap_bytes // self.dtype.itemsize) if self.pruned else 0

    @property
    def width(self) -> int:
        """Cache elements per slot (``2 * head_dim`` when nothing is pruned)."""
        return 2 * self.keep + self.bitmap_width

    @property
    def nbytes(self) -> int:
        """Bytes per slot, i.e. per token and KV head."""
        return self.width * self.dtype.itemsize

    @property
    def dense_nbytes(self) -> int:
        """Bytes the same token and head take unpruned."""
        return 2 * self.head_dim * self.dtype.itemsize

    def _check(self, x: torch.Tensor, name: str, last: int) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != last:
            raise ValueError(f"{name} must be a tensor [..., {last}], got {getattr(x, 'shape', type(x).__name__)}")

    def pack(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Prune and pack ``k, v [..., head_dim]`` (cast to the cache dtype first): slots ``[..., width]``."""
        self._check(k, "k", self.head_dim)
        self._check(v, "v", self.head_dim)
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        k, v = k.to(self.dtype), v.to(self.dtype)
        if not self.pruned:
            return torch.cat([k, v], -1)
        k_bitmaps, k_values = compress_tokens(k, self.keep)
        v_bitmaps, v_values = compress_tokens(v, self.keep)
        raw = torch.zeros(*k.shape[:-1], self.bitmap_width * self.dtype.itemsize, dtype=torch.uint8, device=k.device)
        raw[..., : self.bitmap_bytes] = self._to_bytes(k_bitmaps)
        raw[..., self.bitmap_bytes : 2 * self.bitmap_bytes] = self._to_bytes(v_bitmaps)
        return torch.cat([k_values, v_values, raw.view(self.dtype)], -1)

    def write(self, pages: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Pack ``k, v [T >= n, Hkv, head_dim]`` into slots ``slot_mapping [n]`` (< 0: skipped) of ``pages
        [num_pages, page_size, Hkv, width]``: one C++ pass on CPU pages, else :meth:`pack` and a scatter."""
        n = slot_mapping.shape[0]
        k, v = k[:n].to(self.dtype), v[:n].to(self.dtype)
        if self.pruned and pages.device.type == "cpu" and slot_mapping.device.type == "cpu":
            flat = flat_slots(pages)
            self._check(k, "k", self.head_dim)
            if flat is not None and flat.shape[-1] == self.width and write_pruned_slots_cpu(flat, slot_mapping, k, v,
                                                                                            self.keep):
                return
        write_tokens(pages, slot_mapping, self.pack(k, v))

    def unpack(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``k, v [..., head_dim]`` (pruned entries 0) from slots ``[..., width]`` (any leading shape)."""
        self._check(slots, "slots", self.width)
        if slots.dtype != self.dtype:
            raise ValueError(f"slots must be {self.dtype} (the cache dtype), got {slots.dtype}")
        m = self.keep
        if not self.pruned:
            return slots[..., :m], slots[..., m:]
        raw = slots[..., 2 * m :].contiguous().view(torch.uint8)
        k_bitmaps = self._from_bytes(raw[..., : self.bitmap_bytes])
        v_bitmaps = self._from_bytes(raw[..., self.bitmap_bytes : 2 * self.bitmap_bytes])
        return (decompress_tokens(k_bitmaps, slots[..., :m], self.head_dim),
                decompress_tokens(v_bitmaps, slots[..., m : 2 * m], self.head_dim))

    def _to_bytes(self, bitmaps: torch.Tensor) -> torch.Tensor:
        """int64 tile bitmaps ``[..., tiles]`` -> bytes ``[..., bitmap_bytes]`` (byte j: channels 8j..8j+7)."""
        raw = (bitmaps[..., None] >> _byte_shifts(bitmaps.device)) & 0xFF  # arithmetic shift, masked to the byte
        return raw.flatten(-2)[..., : self.bitmap_bytes].to(torch.uint8)

    def _from_bytes(self, raw: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_to_bytes`: int64 tile bitmaps ``[..., tiles]``."""
        tiles = num_tiles(self.head_dim)
        padded = torch.zeros(*raw.shape[:-1], tiles * TILE // 8, dtype=torch.int64, device=raw.device)
        padded[..., : raw.shape[-1]] = raw
        # Disjoint byte lanes: their (wrapping) int64 sum is their bitwise OR, the sign byte included.
        return (padded.view(*raw.shape[:-1], tiles, TILE // 8) << _byte_shifts(raw.device)).sum(-1)
