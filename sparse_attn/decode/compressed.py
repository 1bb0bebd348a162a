"""Mustafar-style KV-cache pruning: per-token magnitude pruning and a bitmap-compressed cache.

Pruning: each token's K (and V) vector over head_dim keeps its ``keep = round((1 - sparsity) * D)`` entries of
largest magnitude (at least 1; ties go to the lower channel); the rest become zero.

Compressed format (one per K and V, tokens stored in "slots"):

- a token's head_dim vector is cut into 64-element tiles (one for D=64, two for D=128; a last partial tile uses
  the low bits), each with a 64-bit bitmap: ``bitmaps`` int64 ``[slots * tiles]``, bit i of tile c set <=> channel
  ``64c + i`` was kept;
- ``values`` ``[slots * keep]``: slot s's kept entries in channel order at ``[s * keep, (s + 1) * keep)``. Every
  token keeps exactly ``keep`` entries, so tokens sit at a fixed stride and tile c's values start after the
  popcounts of tiles 0..c-1 (a kept entry may itself be 0: the bitmap marks what was kept, not what is non-zero);
- ``offsets`` int64 ``[B, Hkv]``: the slot of (sequence b, KV head h)'s first compressed token (token t is slot
  ``offsets[b, h] + t``; its values start at ``(offsets[b, h] + t) * keep``), and ``lengths`` int32 ``[B]``: the
  compressed tokens of each sequence.

The newest tokens stay dense in a recent window (``[B, Hkv, W, D]`` plus ``recent_lengths`` int32 ``[B]``); a
sequence's context is its compressed tokens followed by its recent ones. :class:`CompressedKVCache` grows this
layout as tokens arrive, compressing the tokens that leave the window in batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..ops.checks import check_scale

if TYPE_CHECKING:
    from .kv_pruning import KVPruningConfig

TILE = 64
CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def num_tiles(head_dim: int) -> int:
    """64-element tiles per token vector."""
    return -(-head_dim // TILE)


def check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def keep_count(head_dim: int, sparsity: float) -> int:
    """Entries kept per token vector: round((1 - sparsity) * head_dim), half up, at least 1."""
    check_sparsity(sparsity)
    return max(1, min(head_dim, math.floor((1.0 - sparsity) * head_dim + 0.5)))


def magnitude_keep_indices(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Channels of the ``keep`` largest |x| along the last dim, ascending (int64 ``[..., keep]``).

    A stable sort makes ties go to the lower channel, so pruning and compression always agree on the kept set.
    """
    order = torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices[..., :keep]
    return order.sort(dim=-1).values


def compress_tokens(x: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune every vector of ``x [..., D]`` to its ``keep`` largest |x| and pack it.

    Returns ``bitmaps`` int64 ``[..., tiles]`` and ``values`` ``[..., keep]`` (x's dtype, channel order).
    """
    dim = x.shape[-1]
    channels = magnitude_keep_indices(x, keep)
    values = x.gather(-1, channels)
    kept = torch.zeros(*x.shape[:-1], num_tiles(dim) * TILE, dtype=torch.bool, device=x.device)
    kept.scatter_(-1, channels, True)
    bit = torch.ones(TILE, dtype=torch.int64, device=x.device) << torch.arange(TILE, device=x.device)
    # Distinct powers of two: their (wrapping) int64 sum is their bitwise OR, bit 63 included.
    bitmaps = (kept.view(*x.shape[:-1], num_tiles(dim), TILE).long() * bit).sum(-1)
    return bitmaps, values


def tile_masks(bitmaps: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Bool ``[..., head_dim]``: which channels a token's tiles ``bitmaps [..., tiles]`` keep."""
    bits = (bitmaps.unsqueeze(-1) >> torch.arange(TILE, device=bitmaps.device)) & 1
    return bits.flatten(-2)[..., :head_dim].bool()


def decompress_tokens(bitmaps: torch.Tensor, values: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`compress_tokens`: dense ``[..., head_dim]`` with zeros where entries were pruned."""
    kept = tile_masks(bitmaps, head_dim)
    rank = (kept.cumsum(-1) - 1).clamp(0, values.shape[-1] - 1)  # a kept channel's place among the token's values
    return torch.where(kept, values.gather(-1, rank), torch.zeros((), dtype=values.dtype, device=values.device))


@dataclass(frozen=True)
class CompressedKV:
    """The compressed part of a batch's KV cache (format in the module docstring). Flat buffers may hold unused
    capacity; only the slots ``offsets[b, h] + t`` for ``t < lengths[b]`` are read."""

    k_bitmaps: torch.Tensor
    k_values: torch.Tensor
    v_bitmaps: torch.Tensor
    v_values: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    head_dim: int
    k_keep: int
    v_keep: int

    @property
    def batch(self) -> int:
        return self.offsets.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.offsets.shape[1]

    @property
    def tiles(self) -> int:
        return num_tiles(self.head_dim)

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    @property
    def num_slots(self) -> int:
        """Token slots the flat buffers hold (the fewest of K's and V's)."""
        return min(self.k_bitmaps.numel() // self.tiles, self.k_values.numel() // self.k_keep,
                   self.v_bitmaps.numel() // self.tiles, self.v_values.numel() // self.v_keep)

    def validate(self, check_values: bool = True) -> None:
        """Raise ValueError naming the field that breaks the format. Value checks read the tensors (a sync)."""
        if not isinstance(self.head_dim, int) or not 1 <= self.head_dim <= 256:
            raise ValueError(f"head_dim must be an int in [1, 256], got {self.head_dim!r}")
        for name in ("k_keep", "v_keep"):
            keep = getattr(self, name)
            if not isinstance(keep, int) or not 1 <= keep <= self.head_dim:
                raise ValueError(f"{name} must be an int in [1, head_dim={self.head_dim}], got {keep!r}")
        for name, dtypes in (("k_bitmaps", (torch.int64,)), ("v_bitmaps", (torch.int64,)),
                             ("k_values", CACHE_DTYPES), ("v_values", CACHE_DTYPES)):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in dtypes:
                raise ValueError(f"{name} must be a 1-D tensor of dtype {' or '.join(map(str, dtypes))}, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device} but offsets is on {self.device}")
        if self.k_values.dtype != self.v_values.dtype:
            raise ValueError(f"k_values is {self.k_values.dtype} but v_values is {self.v_values.dtype}")
        if self.offsets.dim() != 2 or self.offsets.dtype != torch.int64:
            raise ValueError(f"offsets must be int64 [B, Hkv], got {self.offsets.dtype} {tuple(self.offsets.shape)}")
        lengths = self.lengths
        if lengths.shape != (self.batch,) or lengths.dtype != torch.int32 or lengths.device != self.device:
            raise ValueError(f"lengths must be int32 [B={self.batch}] on {self.device}, got "
                             f"{lengths.dtype} {tuple(lengths.shape)} on {lengths.device}")
        if not check_values or self.offsets.numel() == 0:
            return
        if int(self.lengths.min()) < 0 or int(self.offsets.min()) < 0:
            raise ValueError("lengths and offsets must be non-negative")
        end = int((self.offsets + self.lengths.long()[:, None]).max())  # one past the last slot read
        if int(self.lengths.max()) > 0 and end > self.num_slots:
            raise ValueError(f"offsets + lengths reach slot {end}, but the buffers hold {self.num_slots} slots")

    def slots(self, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ids ``[B, Hkv, max_len]`` (clamped into the buffers) and which of them are real tokens."""
        t = torch.arange(max_len, device=self.device)
        valid = t < self.lengths.long()[:, None]  # [B, max_len]
        slot = (self.offsets[:, :, None] + t).clamp(max=max(self.num_slots - 1, 0))
        return slot, valid[:, None, :].expand_as(slot)

    def decompress_padded(self, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense K and V ``[B, Hkv, max_len, D]`` (zeros past each sequence's length) and the validity mask."""
        if max_len is None:
            max_len = int(self.lengths.max()) if self.batch else 0
        slot, valid = self.slots(max_len)
        out = []
        sides = ((self.k_bitmaps, self.k_values, self.k_keep), (self.v_bitmaps, self.v_values, self.v_keep))
        for bitmaps, values, keep in sides:
            if max_len == 0 or bitmaps.numel() == 0:
                out.append(torch.zeros(*slot.shape, self.head_dim, dtype=values.dtype, device=self.device))
                continue
            tile_ids = slot[..., None] * self.tiles + torch.arange(self.tiles, device=self.device)
            value_ids = slot[..., None] * keep + torch.arange(keep, device=self.device)
            dense = decompress_tokens(bitmaps[tile_ids], values[value_ids], self.head_dim)
            out.append(dense.masked_fill(~valid[..., None], 0))
        return out[0], out[1], valid


def compress_kv(k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, *, k_keep: int, v_keep: int) -> CompressedKV:
    """Compress a padded batch ``k/v [B, Hkv, L, D]`` (the first ``lengths[b]`` tokens of each sequence) into the
    tightly packed format: (sequence, head) regions back to back, offsets their starts."""
    batch, heads, _, dim = k.shape
    lens = [int(n) for n in lengths.tolist()]
    k_parts, v_parts, starts, slot = [], [], [], 0
    for b, n in enumerate(lens):
        for h in range(heads):
            k_parts.append(compress_tokens(k[b, h, :n], k_keep))
            v_parts.append(compress_tokens(v[b, h, :n], v_keep))
            starts.append(slot)
            slot += n

    def flat(parts, i, dtype):
        return torch.cat([p[i].reshape(-1) for p in parts]) if parts else torch.zeros(0, dtype=dtype, device=k.device)

    return CompressedKV(
        flat(k_parts, 0, torch.int64), flat(k_parts, 1, k.dtype),
        flat(v_parts, 0, torch.int64), flat(v_parts, 1, v.dtype),
        torch.tensor(starts, dtype=torch.int64, device=k.device).view(batch, heads),
        torch.tensor(lens, dtype=torch.int32, device=k.device), dim, k_keep, v_keep,
    )


def check_decode_inputs(q, compressed, k_recent, v_recent, recent_lengths, scale, *, check_values: bool = True) -> float:
    """Check a compressed-cache decode call; raise ValueError naming the bad argument. Returns the scale.

    Values (lengths, offsets) are read only for CPU tensors (on a GPU that would synchronise every step), and only
    with ``check_values`` (callers that built them, e.g. :class:`CompressedKVCache`, skip it).
    """
    check_values = check_values and q.device.type == "cpu"
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.dtype not in CACHE_DTYPES:
        raise ValueError(f"q must be a [B, Hq, D] tensor of dtype {CACHE_DTYPES}, got "
                         f"{getattr(q, 'dtype', type(q).__name__)} {tuple(getattr(q, 'shape', ()))}")
    if not isinstance(compressed, CompressedKV):
        raise ValueError(f"compressed must be a CompressedKV, got {type(compressed).__name__}")
    batch, q_heads, dim = q.shape
    if compressed.device != q.device:
        raise ValueError(f"compressed is on {compressed.device} but q is on {q.device}")
    compressed.validate(check_values=check_values)
    if compressed.batch != batch or compressed.head_dim != dim:
        raise ValueError(f"compressed holds batch {compressed.batch}, head_dim {compressed.head_dim}; "
                         f"q has {batch}, {dim}")
    if compressed.k_values.dtype != q.dtype:
        raise ValueError(f"compressed values are {compressed.k_values.dtype} but q is {q.dtype}")
    kv_heads = compressed.kv_heads
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"number of query heads ({q_heads}) must be a positive multiple of the KV heads ({kv_heads})")
    for name, t in (("k_recent", k_recent), ("v_recent", v_recent)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[:2] != (batch, kv_heads) or t.shape[3] != dim:
            raise ValueError(f"{name} must be [B={batch}, Hkv={kv_heads}, W, D={dim}], "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must be {q.dtype} on {q.device}, got {t.dtype} on {t.device}")
    if v_recent.shape != k_recent.shape:
        raise ValueError(f"v_recent {tuple(v_recent.shape)} must match k_recent {tuple(k_recent.shape)}")
    rec = recent_lengths
    if not isinstance(rec, torch.Tensor) or rec.shape != (batch,) or rec.is_floating_point():
        raise ValueError(f"recent_lengths must be an integer tensor [B={batch}], got {getattr(rec, 'shape', rec)}")
    if rec.device != q.device:
        raise ValueError(f"recent_lengths is on {rec.device} but q is on {q.device}")
    if check_values and batch and not 0 <= int(rec.min()) <= int(rec.max()) <= k_recent.shape[2]:
        raise ValueError(f"recent_lengths must lie in [0, {k_recent.shape[2]}] (the window of k_recent)")
    return check_scale(scale, dim)


def compressed_decode_attention(
    q: torch.Tensor,
    compressed: CompressedKV,
    k_recent: torch.Tensor,
    v_recent: torch.Tensor,
    recent_lengths: torch.Tensor,
    *,
    scale: float | None = None,
    max_context: int | None = None,
    checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of ``q [B, Hq, D]`` over each sequence's compressed tokens followed by its dense recent
    window (``k_recent/v_recent [B, Hkv, W, D]``, ``recent_lengths [B]``), on the compressed tiles, by the compiled
    operator (``sparse_attn._C.compressed_decode_attention``, CPU or CUDA).

    Returns ``out [B, Hq, D]`` (q's dtype) and ``lse`` fp32 ``[B, Hq]`` (-inf and out 0 for an empty context).
    ``max_context`` (>= every context length; GPU only) sizes the split grid without reading the lengths.
    ``checked=True``: the caller ran :func:`check_decode_inputs` (and passes its scale).
    """
    from ..ops.extension import _int_arg, check_device, extension

    if not checked:
        scale = check_decode_inputs(q, compressed, k_recent, v_recent, recent_lengths, scale)
    check_device("q", q)
    max_context = _int_arg("max_context", 0 if max_context is None else max_context, 0)
    c = compressed
    return extension().compressed_decode_attention(
        q.contiguous(), c.k_bitmaps, c.k_values, c.k_keep, c.v_bitmaps, c.v_values, c.v_keep, c.offsets, c.lengths,
        k_recent.contiguous(), v_recent.contiguous(), recent_lengths.to(torch.int32), scale, max_context,
    )


def context_tokens(compressed: CompressedKV, k_recent: torch.Tensor, v_recent: torch.Tensor,
                   recent_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Every sequence's full context, decompressed, in the varlen layout: k/v ``[Tk, Hkv, D]`` and cu_seqlens_k."""
    k_comp, v_comp, _ = compressed.decompress_padded()
    keys, values, cu = [], [], [0]
    for b, (n_comp, n_rec) in enumerate(zip(compressed.lengths.tolist(), recent_lengths.tolist())):
        keys.append(torch.cat([k_comp[b, :, :n_comp], k_recent[b, :, :n_rec].to(k_comp.dtype)], 1).transpose(0, 1))
        values.append(torch.cat([v_comp[b, :, :n_comp], v_recent[b, :, :n_rec].to(v_comp.dtype)], 1).transpose(0, 1))
        cu.append(cu[-1] + n_comp + n_rec)
    return torch.cat(keys), torch.cat(values), cu


def compressed_decode_attention_torch(
    q: torch.Tensor, compressed: CompressedKV, k_recent: torch.Tensor, v_recent: torch.Tensor,
    recent_lengths: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch decode on the compressed cache (any device): decompress, then one fp32 softmax over each context.

    q ``[B, Hq, D]``; returns out ``[B, Hq, D]`` (q's dtype) and lse fp32 ``[B, Hq]`` (-inf for empty contexts).
    """
    batch, q_heads, dim = q.shape
    kv_heads = compressed.kv_heads
    k_comp, v_comp, comp_valid = compressed.decompress_padded()
    window = torch.arange(k_recent.shape[2], device=q.device) < recent_lengths.long()[:, None]  # [B, W]
    keys = torch.cat([k_comp.float(), k_recent.float()], 2)  # [B, Hkv, Lc + W, D]
    values = torch.cat([v_comp.float(), v_recent.float()], 2)
    valid = torch.cat([comp_valid[:, 0], window], 1)[:, None, None, :]  # [B, 1, 1, Lc + W]

    qg = q.float().view(batch, kv_heads, q_heads // kv_heads, dim)  # GQA: query head h reads KV head h // group
    scores = torch.einsum("bhgd,bhnd->bhgn", qg, keys) * scale
    scores = scores.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf for empty contexts
    probs = torch.exp(scores - lse.clamp(min=torch.finfo(torch.float32).min).unsqueeze(-1)).masked_fill(~valid, 0.0)
    out = torch.einsum("bhgn,bhnd->bhgd", probs, values)
    return out.reshape(batch, q_heads, dim).to(q.dtype), lse.reshape(batch, q_heads)


class CompressedKVCache:
    """A growing KV cache for a batch of sequences: the newest tokens dense, older ones pruned and compressed.

    Tokens are appended to a dense window; once it holds ``recent_tokens + compress_every`` tokens, all but the
    newest ``recent_tokens`` are pruned (per token, over head_dim) and compressed at once. Compressed tokens live in
    per-(sequence, KV head) regions of ``capacity`` slots (doubled when full), so :meth:`compressed` is a view.
    ``prune_keys=False`` / ``prune_values=False`` keep every entry of K / V (keep = head_dim, bitmaps all ones).
    """

    def __init__(self, config: KVPruningConfig, num_kv_heads: int, head_dim: int, *, batch_size: int = 1,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu"):
        for name, value in (("num_kv_heads", num_kv_heads), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(head_dim, int) or not 1 <= head_dim <= 256:
            raise ValueError(f"head_dim must be an int in [1, 256], got {head_dim!r}")
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"dtype must be one of {CACHE_DTYPES}, got {dtype}")
        self.config = config
        self.batch_size, self.num_kv_heads, self.head_dim = batch_size, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.k_keep = keep_count(head_dim, config.sparsity) if config.prune_keys else head_dim
        self.v_keep = keep_count(head_dim, config.sparsity) if config.prune_values else head_dim
        window = config.recent_tokens + config.compress_every
        self.k_recent = torch.zeros(batch_size, num_kv_heads, window, head_dim, dtype=dtype, device=self.device)
        self.v_recent = torch.zeros_like(self.k_recent)
        self.recent_lengths = [0] * batch_size
        self.comp_lengths = [0] * batch_size
        self.capacity = 0
        self._alloc(0)

    # ------------------------------------------------------------------ storage
    def _alloc(self, capacity: int) -> None:
        shape = (self.batch_size, self.num_kv_heads, capacity)
        tiles, old = num_tiles(self.head_dim), self.capacity
        new = {
            "k_bitmaps": torch.zeros(*shape, tiles, dtype=torch.int64, device=self.device),
            "k_values": torch.zeros(*shape, self.k_keep, dtype=self.dtype, device=self.device),
            "v_bitmaps": torch.zeros(*shape, tiles, dtype=torch.int64, device=self.device),
            "v_values": torch.zeros(*shape, self.v_keep, dtype=self.dtype, device=self.device),
        }
        for name, buf in new.items():
            if old:
                buf[:, :, :old] = getattr(self, name)
            setattr(self, name, buf)
        self.capacity = capacity
        self._offsets = None

    def _compress(self, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k/v [Hkv, n, D]`` to sequence b's compressed tokens."""
        start, n = self.comp_lengths[b], k.shape[1]
        if start + n > self.capacity:
            self._alloc(max(start + n, 2 * self.capacity))
        self.k_bitmaps[b, :, start:start + n], self.k_values[b, :, start:start + n] = compress_tokens(k, self.k_keep)
        self.v_bitmaps[b, :, start:start + n], self.v_values[b, :, start:start + n] = compress_tokens(v, self.v_keep)
        self.comp_lengths[b] = start + n

    def _append_one(self, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n, t = self.recent_lengths[b], k.shape[1]
        recent, window = self.config.recent_tokens, self.k_recent.shape[2]
        in_place = n + t <= window
        if in_place:  # the new tokens fit the window: written in place
            self.k_recent[b, :, n:n + t] = k
            self.v_recent[b, :, n:n + t] = v
            k_win, v_win, total = self.k_recent[b], self.v_recent[b], n + t
        else:  # a long append (a prompt): the window and the new tokens together
            k_win = torch.cat([self.k_recent[b, :, :n], k.to(self.dtype)], 1)
            v_win = torch.cat([self.v_recent[b, :, :n], v.to(self.dtype)], 1)
            total = k_win.shape[1]
        if total >= window:  # every token that leaves the window, in one batch; the newest `recent` stay dense
            self._compress(b, k_win[:, : total - recent], v_win[:, : total - recent])
            k_keep, v_keep = k_win[:, total - recent:total].clone(), v_win[:, total - recent:total].clone()
            self.k_recent[b, :, :recent], self.v_recent[b, :, :recent] = k_keep, v_keep
            total = recent
        elif not in_place:
            self.k_recent[b, :, :total], self.v_recent[b, :, :total] = k_win, v_win
        self.recent_lengths[b] = total

    def append(self, k: torch.Tensor, v: torch.Tensor, seq: int | None = None) -> None:
        """Append ``k/v [Hkv, T, D]`` to sequence ``seq`` (may be omitted when batch_size is 1), or
        ``[B, Hkv, T, D]`` to every sequence."""
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.shape != v.shape:
            raise ValueError(f"k and v must be tensors of the same shape, "
                             f"got {getattr(k, 'shape', k)} and {getattr(v, 'shape', v)}")
        if k.dim() == 4:
            if seq is not None or k.shape[0] != self.batch_size:
                raise ValueError(f"a batched append needs k [B={self.batch_size}, Hkv, T, D] and no seq, "
                                 f"got {tuple(k.shape)}")
            seqs = list(range(self.batch_size))
        elif k.dim() == 3:
            if seq is None and self.batch_size != 1:
                raise ValueError("seq is required when appending [Hkv, T, D] to a batch of several sequences")
            seq = 0 if seq is None else seq
            if not isinstance(seq, int) or not 0 <= seq < self.batch_size:
                raise ValueError(f"seq must be an int in [0, {self.batch_size}), got {seq!r}")
            seqs, k, v = [seq], k[None], v[None]
        else:
            raise ValueError(f"k must be [Hkv, T, D] or [B, Hkv, T, D], got shape {tuple(k.shape)}")
        if k.shape[1] != self.num_kv_heads or k.shape[3] != self.head_dim:
            raise ValueError(f"k must have {self.num_kv_heads} KV heads and head_dim {self.head_dim}, "
                             f"got {tuple(k.shape)}")
        for i, b in enumerate(seqs):
            self._append_one(b, k[i].to(self.device), v[i].to(self.device))

    # ------------------------------------------------------------------ views
    @property
    def lengths(self) -> list[int]:
        """Tokens held per sequence (compressed + recent)."""
        return [c + r for c, r in zip(self.comp_lengths, self.recent_lengths)]

    def compressed(self) -> CompressedKV:
        """The compressed tokens as a :class:`CompressedKV` (views of the storage, no copy)."""
        heads = self.num_kv_heads
        if self._offsets is None:  # slot of (sequence, head)'s first token: one region of `capacity` slots each
            slots = torch.arange(self.batch_size * heads, dtype=torch.int64, device=self.device) * self.capacity
            self._offsets = slots.view(-1, heads)
        lengths = torch.tensor(self.comp_lengths, dtype=torch.int32, device=self.device)
        return CompressedKV(self.k_bitmaps.view(-1), self.k_values.view(-1), self.v_bitmaps.view(-1),
                            self.v_values.view(-1), self._offsets, lengths, self.head_dim, self.k_keep, self.v_keep)

    def recent(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The dense window: k/v ``[B, Hkv, W, D]`` and recent_lengths int32 ``[B]``."""
        return self.k_recent, self.v_recent, torch.tensor(self.recent_lengths, dtype=torch.int32, device=self.device)

    def decompress(self, seq: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence ``seq``'s whole cache as dense k/v ``[Hkv, L, D]`` (pruned entries are 0)."""
        n = self.comp_lengths[seq]
        k = decompress_tokens(self.k_bitmaps[seq, :, :n], self.k_values[seq, :, :n], self.head_dim)
        v = decompress_tokens(self.v_bitmaps[seq, :, :n], self.v_values[seq, :, :n], self.head_dim)
        r = self.recent_lengths[seq]
        return torch.cat([k, self.k_recent[seq, :, :r]], 1), torch.cat([v, self.v_recent[seq, :, :r]], 1)

    # ------------------------------------------------------------------ memory
    @property
    def nbytes(self) -> int:
        """Bytes the cache's tokens occupy: bitmaps and packed values of the compressed tokens, the dense window's
        tokens, and the offsets and lengths (unused capacity is not counted; see :attr:`allocated_nbytes`)."""
        item = torch.empty(0, dtype=self.dtype).element_size()
        per_token = 2 * num_tiles(self.head_dim) * 8 + (self.k_keep + self.v_keep) * item
        compressed = sum(self.comp_lengths) * self.num_kv_heads * per_token
        dense = sum(self.recent_lengths) * self.num_kv_heads * 2 * self.head_dim * item
        metadata = self.batch_size * self.num_kv_heads * 8 + 2 * self.batch_size * 4  # offsets, two length vectors
        return compressed + dense + metadata

    @property
    def allocated_nbytes(self) -> int:
        """Bytes of every buffer the cache holds, unused capacity included."""
        bufs = (self.k_bitmaps, self.k_values, self.v_bitmaps, self.v_values, self.k_recent, self.v_recent)
        return sum(t.numel() * t.element_size() for t in bufs)

    @property
    def dense_nbytes(self) -> int:
        """Bytes the same tokens take in a dense cache of this dtype."""
        item = torch.empty(0, dtype=self.dtype).element_size()
        return sum(self.lengths) * self.num_kv_heads * 2 * self.head_dim * item

    def memory_report(self) -> dict:
        return {"stored_bytes": self.nbytes, "dense_bytes": self.dense_nbytes,
                "ratio": self.nbytes / self.dense_nbytes if self.dense_nbytes else float("nan")}
