"""The vLLM backend's attention on paged KV caches, without vLLM: step planning, page reads and writes, per-group
attention, decode token selection and sparsity statistics. ``backend.py`` wraps it for vLLM; a GPU machine without
vLLM drives it directly (tests/test_vllm_core.py).

Inputs are vLLM's, as plain tensors:

- a layer's page tensor ``kv_cache``: logical ``[num_pages, Hkv, page_size, C]`` in the ``LBNHC`` physical order, so
  ``kv_cache.transpose(1, 2)`` is ``[num_pages, page_size, Hkv, C]`` in memory order. Per token and KV head: K and V
  (``2 * D`` values, or with KV pruning the packed slot of :class:`~sparse_attn.decode.pruned_pages.PrunedSlotFormat`:
  each vector's m largest-magnitude values and keep bitmaps), then with Double Sparsity the key's label (its ``r``
  heavy channels, unpruned): ``C = slot width + label_width``;
- ``block_table [B, max_pages]`` (token t of row b lives in page ``block_table[b, t // page_size]`` at offset
  ``t % page_size``, i.e. slot ``page * page_size + offset``), ``slot_mapping [T]`` (the new tokens' slots; -1 pads),
  ``query_start_loc [B + 1]`` and ``seq_lens [B]`` (context including the new tokens) as host lists.

Rows (requests) of a step are grouped by phase (decode: one query token; prefill: a prompt or a chunk of it, whose
queries are the last ``q_len`` positions of ``seq_len``) and by whether they are shorter than ``dense_below``. A
prefill group (and a decode group with a block pattern) reads its context from the pages into the varlen layout
``[Tk, Hkv, D]`` and runs ``block_sparse_attention`` with the layer's mask. A decode group with token selection
scores every context token in place (exact ``q.K`` on the keys, or ``q[channels] . label`` with Double Sparsity),
keeps the top k per KV group and runs ``sparse_decode_attention`` over the pages, reading only those tokens.

With KV pruning every token is written pruned; a group reads its rows' context unpacked into dense K/V, in which the
step's own new tokens (the forward's key/value arguments) replace their pruned copies: a prompt (or a chunk of one)
attends to itself exactly and each decode step to its own token exactly, as Mustafar's prefill runs on unpruned K/V.
Fixed-size slots leave no room for Mustafar's dense window of recent tokens, so earlier tokens, including earlier
chunks of a chunked prefill, are read pruned. With ``kv_exact_new=False`` the step's own tokens are read pruned too,
so what a token attends to does not depend on which step it shared with which tokens. Token-selection decode then
works on that dense context (exact scores over the pruned keys, or the page's unpruned labels with Double Sparsity).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Sequence

import torch

from ..decode import DoubleSparsityConfig, LabelCache, select_tokens, sparse_decode_attention, write_tokens
from ..decode.paged import flat_slots
from ..decode.double_sparsity import select_tokens_cpu
from ..decode.compressed import check_sparsity
from ..decode.pruned_pages import PrunedSlotFormat
from ..masks import BlockSparseMask, causal_block_bounds
from ..ops import block_sparse_attention
from ..ops.attention import cuda_op_available
from ..ops.extension import block_sparse_attention_cpu as block_sparse_attention_cpp
from ..ops.extension import cpu_kernel_available, write_slots_cpu
from ..patterns import Dense, Pattern
from .config import SparseAttnOptions

__all__ = ["RowGroup", "StepMetadata", "plan_step", "DecodeSelection", "PagedAttentionLayer", "SparsityStats",
           "layer_from_options"]


# ---------------------------------------------------------------------------------------------------- step planning
@dataclass
class RowGroup:
    """Rows of one step that share one attention call: same phase, same dense-or-sparse choice.

    ``token_index`` [Tq] picks the group's query tokens out of the step's tokens (``token_range`` when they are
    contiguous); ``kv_slots`` [Tk] are the page slots of every context token of its rows, row after row (computed on
    first use: token-selection decode never needs them).
    """

    phase: str  # "prefill" or "decode"
    dense: bool  # the rows are shorter than dense_below
    rows: list[int]
    q_lens: list[int]
    kv_lens: list[int]
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    token_index: torch.Tensor
    token_range: tuple[int, int] | None
    block_table: torch.Tensor  # the step's block table (all rows)
    page_size: int
    masks: dict[tuple, object] = field(default_factory=dict)  # position-only masks and counts, shared by layers
    _kv_slots: torch.Tensor | None = None
    _row_pages: tuple[torch.Tensor, torch.Tensor] | None = None
    _new_positions: torch.Tensor | None = None
    _token_pages: torch.Tensor | None = None

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.token_range[0] : self.token_range[1]] if self.token_range else x.index_select(0, self.token_index)

    def put(self, out: torch.Tensor, values: torch.Tensor) -> None:
        if self.token_range:
            out[self.token_range[0] : self.token_range[1]] = values
        else:
            out.index_copy_(0, self.token_index, values)

    @property
    def kv_slots(self) -> torch.Tensor:
        if self._kv_slots is None:
            device = self.block_table.device
            cu_k = [0, *accumulate(self.kv_lens)]
            positions = _ragged_arange([0] * len(self.rows), self.kv_lens, cu_k, device)
            row_of_token = torch.repeat_interleave(
                torch.tensor(self.rows, device=device), torch.tensor(self.kv_lens, device=device)
            )
            pages = self.block_table[row_of_token, positions // self.page_size].long()
            self._kv_slots = pages * self.page_size + positions % self.page_size
        return self._kv_slots

    @property
    def new_positions(self) -> torch.Tensor:
        """Where the step's new tokens (the last ``q_len`` of each row) sit in the ``kv_slots`` order [Tq]."""
        if self._new_positions is None:
            cu_k = self.cu_seqlens_k.tolist()
            starts = [cu_k[i + 1] - q for i, q in enumerate(self.q_lens)]
            cu_q = self.cu_seqlens_q.tolist()
            self._new_positions = _ragged_arange(starts, self.q_lens, cu_q, self.block_table.device)
        return self._new_positions

    def token_pages(self) -> torch.Tensor:
        """int32 ``[n, max kv_len]`` block table that reads the varlen context ``[Tk, Hkv, *]`` (the ``kv_slots``
        order) as pages of one token: row i's token t is page ``cu_seqlens_k[i] + t``."""
        if self._token_pages is None:
            t = torch.arange(max(self.kv_lens), dtype=torch.int32, device=self.block_table.device)
            self._token_pages = self.cu_seqlens_k[:-1, None] + t
        return self._token_pages

    def budgets(self, config: DoubleSparsityConfig) -> tuple[torch.Tensor, int]:
        """Tokens each row keeps under ``config`` (int32 ``[n]``) and their maximum, once per step."""
        key = ("budgets", config)
        if key not in self.masks:
            budgets = [config.token_budget(n) for n in self.kv_lens]
            self.masks[key] = (torch.tensor(budgets, dtype=torch.int32),
                               max(config.max_token_budget(max(self.kv_lens)), 1))
        return self.masks[key]

    def decode_cu_seqlens(self) -> torch.Tensor:
        """cu_seqlens of one query per row (host int32 ``[n + 1]``), once per step."""
        if "decode_cu" not in self.masks:
            self.masks["decode_cu"] = torch.arange(len(self.rows) + 1, dtype=torch.int32)
        return self.masks["decode_cu"]

    def row_pages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' block table ``[n, max_pages]`` and int32 context lengths ``[n]`` (the paged decode inputs)."""
        if self._row_pages is None:
            device = self.block_table.device
            table = self.block_table.index_select(0, torch.tensor(self.rows, device=device))
            self._row_pages = table, torch.tensor(self.kv_lens, dtype=torch.int32, device=device)
        return self._row_pages

    def mask(self, pattern: Pattern, block_size: int, num_heads: int, q, k, scale: float) -> BlockSparseMask:
        if pattern.content_aware:
            return self._build(pattern, block_size, num_heads, q.device, q, k, scale)
        key = (pattern, block_size, num_heads)
        if key not in self.masks:
            self.masks[key] = self._build(pattern, block_size, num_heads, q.device, None, None, scale)
        return self.masks[key]

    def _build(self, pattern, block_size, num_heads, device, q, k, scale) -> BlockSparseMask:
        cu_q = self.cu_seqlens_q.tolist() if q is not None else None
        cu_k = self.cu_seqlens_k.tolist() if k is not None else None
        return pattern.build_mask(
            q_lens=self.q_lens, kv_lens=self.kv_lens, num_heads=num_heads, q_block_size=block_size,
            kv_block_size=block_size, causal=True, device=device, q=q, k=k,
            cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, scale=scale,
        )

    def causal_blocks(self, block_size: int) -> int:
        """Blocks a dense causal mask of one head reads over the group's rows (the density denominator)."""
        key = ("causal_blocks", block_size)
        if key not in self.masks:
            self.masks[key] = sum(int(causal_block_bounds(q, k, block_size, block_size).sum())
                                  for q, k in zip(self.q_lens, self.kv_lens))
        return self.masks[key]

    def unaligned_chunks(self, block_size: int) -> int:
        """Rows whose new tokens do not start on the ``block_size`` grid (computed once per step, not per layer)."""
        key = ("unaligned_chunks", block_size)
        if key not in self.masks:
            self.masks[key] = sum((k - q) % block_size != 0 for q, k in zip(self.q_lens, self.kv_lens))
        return self.masks[key]


@dataclass
class StepMetadata:
    """One step's metadata, shared by every layer."""

    num_actual_tokens: int  # tokens of the step, possibly padded
    num_scheduled_tokens: int  # tokens that belong to a request; rows past it are padding
    slot_mapping: torch.Tensor
    groups: list[RowGroup]


def plan_step(
    query_start_loc: Sequence[int],
    seq_lens: Sequence[int],
    block_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    page_size: int,
    dense_below: int,
    decode_dense_below: int | None = None,
    num_actual_tokens: int | None = None,
) -> StepMetadata:
    """Group the rows of a step (see :class:`RowGroup`): rows shorter than ``dense_below`` (decode rows:
    ``decode_dense_below``, None: the same) run dense. ``query_start_loc`` [B+1] and ``seq_lens`` [B] are host
    lists; ``block_table`` [B, max_pages] and ``slot_mapping`` sit on the device."""
    query_start_loc, seq_lens = list(query_start_loc), list(seq_lens)
    if len(query_start_loc) != len(seq_lens) + 1:
        raise ValueError(f"query_start_loc must have one entry more than seq_lens, got {len(query_start_loc)} and {len(seq_lens)}")
    device = block_table.device
    rows_by_key: dict[tuple[str, bool], list[int]] = {}
    for row, seq_len in enumerate(seq_lens):
        q_len = query_start_loc[row + 1] - query_start_loc[row]
        if q_len == 0:
            continue  # a padding row
        if q_len < 0 or q_len > seq_len:
            raise ValueError(f"row {row}: query length {q_len} must lie in [0, seq_len={seq_len}]")
        decode = q_len == 1
        threshold = decode_dense_below if decode and decode_dense_below is not None else dense_below
        key = ("decode" if decode else "prefill", seq_len < threshold)
        rows_by_key.setdefault(key, []).append(row)

    groups = []
    for (phase, dense), rows in rows_by_key.items():
        q_starts = [query_start_loc[r] for r in rows]
        q_lens = [query_start_loc[r + 1] - query_start_loc[r] for r in rows]
        kv_lens = [seq_lens[r] for r in rows]
        cu_q, cu_k = list(accumulate(q_lens, initial=0)), list(accumulate(kv_lens, initial=0))
        contiguous = all(q_starts[i] + q_lens[i] == q_starts[i + 1] for i in range(len(rows) - 1))
        groups.append(RowGroup(
            phase, dense, rows, q_lens, kv_lens,
            torch.tensor(cu_q, dtype=torch.int32, device=device), torch.tensor(cu_k, dtype=torch.int32, device=device),
            _ragged_arange(q_starts, q_lens, cu_q, device), (q_starts[0], q_starts[0] + cu_q[-1]) if contiguous else None,
            block_table, page_size,
        ))
    scheduled = query_start_loc[-1]
    return StepMetadata(scheduled if num_actual_tokens is None else num_actual_tokens, scheduled, slot_mapping, groups)


def _ragged_arange(starts: list[int], lengths: list[int], offsets: list[int], device) -> torch.Tensor:
    """Concatenation of ``arange(start, start + length)`` over the rows, as one int64 tensor."""
    lengths_t = torch.tensor(lengths, device=device)
    base = torch.repeat_interleave(torch.tensor(starts, device=device) - torch.tensor(offsets[:-1], device=device), lengths_t)
    return base + torch.arange(offsets[-1], device=device)


# ---------------------------------------------------------------------------------------------------- statistics
class SparsityStats:
    """What one layer read, per phase: ``read / full`` is the fraction of dense attention's work done.

    Prefill counts (head, query block, KV block) blocks against the causal blocks; decode counts tokens per KV head
    (token selection) or blocks per head (block patterns). Dense groups count as fully read. Counters stay on the
    device (no synchronisation in the forward pass) until :meth:`as_dict` reads them. ``unaligned_chunks``: sparse
    prompt rows (chunks) that did not start on a mask-block boundary (their query blocks hold other rows than the
    same prompt's blocks cut from its first token; the plugin's scheduler keeps this at 0).
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.read = {"prefill": 0, "decode": 0}
        self.full = {"prefill": 0, "decode": 0}
        self.rows = {"prefill": 0, "decode": 0}
        self.sparse_rows = {"prefill": 0, "decode": 0}
        self.unaligned_chunks = 0

    def add(self, phase: str, rows: int, read, full: int, sparse: bool, unaligned: int = 0) -> None:
        self.read[phase] = self.read[phase] + read
        self.full[phase] += full
        self.rows[phase] += rows
        self.sparse_rows[phase] += rows if sparse else 0
        self.unaligned_chunks += unaligned

    def as_dict(self) -> dict:
        out = {}
        for phase in ("prefill", "decode"):
            read, full = float(self.read[phase]), self.full[phase]
            out[phase] = {"rows": self.rows[phase], "sparse_rows": self.sparse_rows[phase],
                          "density": read / full if full else None}
        out["prefill"]["unaligned_chunks"] = self.unaligned_chunks
        return out


# ---------------------------------------------------------------------------------------------------- one layer
@dataclass(frozen=True)
class DecodeSelection:
    """Token selection for decode rows: ``config`` holds the budget rule; ``channels [Hkv, r]`` are the label
    channels stored in the page (Double Sparsity), None for exact scores over the keys themselves."""

    config: DoubleSparsityConfig
    channels: torch.Tensor | None = field(default=None, compare=False)


@dataclass
class PageViews:
    """``[num_pages, page_size, Hkv, *]`` views of one layer's pages (no copies; writes reach the pages)."""

    kv: torch.Tensor  # [..., slot width]: K and V of each token, dense (K | V) or packed (KV pruning)
    k: torch.Tensor | None  # [..., D] views into kv when it is dense, else None
    v: torch.Tensor | None
    labels: torch.Tensor  # [..., label_width]; width 0 without Double Sparsity

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """``[num_pages * page_size, Hkv, *]``: one row per slot (a view in the token-major LBNHC order)."""
        return x.flatten(0, 1)


class PagedAttentionLayer:
    """One attention layer on paged KV: writes new tokens, attends per row group. Head counts are this rank's.

    ``kv_sparsity``: KV pruning, the fraction of each token's K and V values dropped (0: dense pages); the slot format
    follows from it, the head size and the page dtype (:class:`PrunedSlotFormat`). ``kv_exact_new``: with KV pruning,
    a step reads its own new tokens unpruned (the forward's key/value) rather than as the pages hold them."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float, *,
                 prefill: Pattern = Dense(), decode: Pattern | DecodeSelection = Dense(), block_size: int = 64,
                 label_width: int = 0, kv_sparsity: float = 0.0, kv_exact_new: bool = True,
                 op_backend: str | None = None, layer_index: int | None = None):
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        if isinstance(decode, DecodeSelection):
            r = head_size if decode.channels is None else decode.channels.shape[1]
            if decode.channels is not None:
                if tuple(decode.channels.shape) != (num_kv_heads, r) or r > label_width:
                    raise ValueError(f"decode channels must be [num_kv_heads={num_kv_heads}, r <= label_width="
                                     f"{label_width}], got {tuple(decode.channels.shape)}")
                if int(decode.channels.max()) >= head_size:
                    raise ValueError(f"decode channels reach {int(decode.channels.max())}, the head size is {head_size}")
            decode = DecodeSelection(dataclasses.replace(decode.config, r=r), decode.channels)
        elif not isinstance(decode, Pattern):
            raise ValueError(f"decode must be a Pattern or a DecodeSelection, got {type(decode).__name__}")
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.scale = float(scale)
        self.prefill, self.decode = prefill, decode
        self.block_size, self.label_width, self.op_backend = block_size, label_width, op_backend
        self.kv_sparsity = check_sparsity(kv_sparsity)
        self.kv_exact_new = bool(kv_exact_new)
        self.layer_index = layer_index
        self.stats = SparsityStats()
        self._views_key = None

    @property
    def writes_labels(self) -> bool:
        return isinstance(self.decode, DecodeSelection) and self.decode.channels is not None

    def slot_format(self, dtype: torch.dtype) -> PrunedSlotFormat:
        """How K and V of a token and KV head are stored in pages of ``dtype``."""
        return PrunedSlotFormat.for_sparsity(self.head_size, self.kv_sparsity, dtype)

    def page_views(self, kv_cache: torch.Tensor) -> tuple[PageViews, LabelCache | None]:
        """The K|V / label views of ``kv_cache`` and the label cache decode selection scores (cached per page
        tensor: vLLM allocates a layer's pages once)."""
        key = (kv_cache.data_ptr(), tuple(kv_cache.shape), tuple(kv_cache.stride()), kv_cache.dtype)
        if self._views_key == key:
            return self._views
        d, slot = self.head_size, self.slot_format(kv_cache.dtype)
        width = slot.width + self.label_width
        if kv_cache.dim() != 4 or kv_cache.shape[1] != self.num_kv_heads or kv_cache.shape[3] != width:
            what = f"2*{d}" if not slot.pruned else f"{slot.width} (K and V of {d} pruned to {slot.keep} values)"
            raise ValueError(f"kv_cache must be [num_pages, Hkv={self.num_kv_heads}, page_size, "
                             f"{what}+{self.label_width}], got {tuple(kv_cache.shape)}")
        pages = kv_cache.transpose(1, 2)
        kv = pages[..., : slot.width]
        k, v = (None, None) if slot.pruned else (kv[..., :d], kv[..., d:])
        views = PageViews(kv, k, v, pages[..., slot.width :])
        labels = None
        channels = self.decode.channels if isinstance(self.decode, DecodeSelection) else None
        if channels is not None:
            labels = LabelCache.over(views.labels[..., : channels.shape[1]], channels.to(kv_cache.device))
        elif isinstance(self.decode, DecodeSelection) and not slot.pruned:  # exact scores: keys are their own labels
            labels = LabelCache.over(views.k, torch.arange(d, device=kv_cache.device).expand(self.num_kv_heads, d))
        # Pruned pages without labels: exact scores read the pruned keys themselves (_selected_decode).
        self._views_key, self._views, self._slot = key, (views, labels), slot
        # Dense slots on the CPU: K, V and the label written in one C++ pass over [slot, Hkv, 2D (+ r)] rows.
        self._rows = None
        if not slot.pruned and kv_cache.device.type == "cpu":
            r = channels.shape[1] if self.writes_labels else 0
            self._rows = (flat_slots(pages[..., : slot.width + r]),
                          channels.to(kv_cache.device, torch.int64).contiguous() if r else None)
        return self._views

    def write(self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write the step's new K/V (pruned and packed with KV pruning; and labels) into their slots; slot -1 marks
        padding; key/value may be padded past ``slot_mapping``."""
        views, labels = self.page_views(kv_cache)
        if self._rows is not None and self._rows[0] is not None:
            rows, channels = self._rows
            if write_slots_cpu(rows, slot_mapping, key, value, label_src=None if channels is None else key,
                               channels=channels):
                return
        if self._slot.pruned:
            self._slot.write(views.kv, slot_mapping, key, value)
        else:
            write_tokens(views.kv, slot_mapping, key, value)  # K | V of a slot, one pass
        if self.writes_labels:
            labels.write(key.to(views.labels.dtype), slot_mapping)

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: StepMetadata, output: torch.Tensor,
                key: torch.Tensor | None = None, value: torch.Tensor | None = None) -> torch.Tensor:
        """query ``[T, Hq, D]``; output ``[T, Hq, D]``, written for the first ``num_actual_tokens`` rows. ``key`` /
        ``value`` ``[T, Hkv, D]``: the step's new tokens as written; with KV pruning they are attended unpruned
        (None: read pruned from the pages like the rest of the context)."""
        views, labels = self.page_views(kv_cache)
        exact_new = self._slot.pruned and self.kv_exact_new and key is not None and value is not None
        fresh = (key, value) if exact_new else None
        for group in meta.groups:
            q = group.take(query)
            if group.phase == "decode" and not group.dense and isinstance(self.decode, DecodeSelection):
                out = self._selected_decode(group, q, views, labels, fresh)
            else:
                out = self._masked(group, q, views, fresh)
            group.put(output, out.to(output.dtype))
        output[meta.num_scheduled_tokens : meta.num_actual_tokens].zero_()  # padding rows
        return output

    def _in_kernel(self, q: torch.Tensor) -> bool:
        """Whether pruned slots are unpacked inside the kernels (the C++ CPU ops) rather than gathered first."""
        return q.device.type == "cpu" and self.op_backend in (None, "cpu") and cpu_kernel_available()

    def _fresh(self, group: RowGroup, fresh):
        return (None, None) if fresh is None else (group.take(fresh[0]), group.take(fresh[1]))

    def _context(self, group: RowGroup, views: PageViews, fresh, dtype=None, keys_only: bool = False):
        """The rows' context K (and V) gathered into the varlen layout ``[Tk, Hkv, D]`` (``kv_slots`` order), in
        ``dtype`` (None: the page dtype): what estimators read, and pruned slots for kernels that cannot unpack
        them. Pruned slots are unpacked, and the step's new tokens replace their pruned copies."""
        dtype = dtype or views.kv.dtype
        if not self._slot.pruned:
            k = views.flat(views.k).index_select(0, group.kv_slots).to(dtype)
            return k if keys_only else (k, views.flat(views.v).index_select(0, group.kv_slots).to(dtype))
        k, v = self._slot.unpack(views.flat(views.kv).index_select(0, group.kv_slots))
        if fresh is not None:
            positions = group.new_positions
            k.index_copy_(0, positions, group.take(fresh[0]).to(k.dtype))  # as the page dtype would hold them
            v.index_copy_(0, positions, group.take(fresh[1]).to(v.dtype))
        return k.to(dtype) if keys_only else (k.to(dtype), v.to(dtype))

    def _masked(self, group: RowGroup, q: torch.Tensor, views: PageViews, fresh) -> torch.Tensor:
        """Block-sparse attention over the rows' context, read from the pages in place (content-aware patterns
        gather the keys they estimate from)."""
        pattern = Dense() if group.dense else (self.decode if group.phase == "decode" else self.prefill)
        dense = isinstance(pattern, Dense)
        keys = self._context(group, views, fresh, q.dtype, keys_only=True) if pattern.content_aware else None
        mask = None if dense else group.mask(pattern, self.block_size, self.num_heads, q, keys, self.scale)
        full = group.causal_blocks(self.block_size) * self.num_heads
        unaligned = 0 if dense or group.phase == "decode" else group.unaligned_chunks(self.block_size)
        self.stats.add(group.phase, len(group.rows), full if dense else mask.kv_num_blocks.sum(), full, not dense,
                       unaligned)
        table, kv_lens = group.row_pages()
        if self._in_kernel(q):  # the C++ kernel on the pages (it checks the page ids itself; the rest is vLLM's)
            new_k, new_v = self._fresh(group, fresh)
            k, v = (views.kv, views.kv) if self._slot.pruned else (views.k, views.v)
            out, _ = block_sparse_attention_cpp(
                q.to(views.kv.dtype), k, v, group.cu_seqlens_q, None, mask, True, self.scale, block_table=table,
                kv_lens=kv_lens, q_block_size=self.block_size, slot_keep=self._slot.keep if self._slot.pruned else 0,
                new_k=new_k, new_v=new_v, checked=True)
            return out
        if self._slot.pruned:  # kernels without slot unpacking read the unpacked context
            k, v = self._context(group, views, fresh, q.dtype)
            return block_sparse_attention(q, k, v, mask, causal=True, scale=self.scale, cu_seqlens_q=group.cu_seqlens_q,
                                          cu_seqlens_k=group.cu_seqlens_k, q_block_size=self.block_size,
                                          backend=self.op_backend)
        return block_sparse_attention(q.to(views.k.dtype), views.k, views.v, mask, causal=True, scale=self.scale,
                                      cu_seqlens_q=group.cu_seqlens_q, block_table=table, kv_lens=group.kv_lens,
                                      q_block_size=self.block_size, backend=self.op_backend)

    def _selected_decode(self, group: RowGroup, q: torch.Tensor, views: PageViews, labels: LabelCache | None,
                         fresh) -> torch.Tensor:
        """Decode over the top-k tokens of each KV group, scored on the page's labels (Double Sparsity) or exactly
        on the keys, then attended exactly over the selected tokens, read in place from the pages."""
        block_table, seq_lens = group.row_pages()
        config, max_len = self.decode.config, max(group.kv_lens)
        q = q.to(views.kv.dtype)
        if not self._in_kernel(q):
            if self._slot.pruned:
                return self._unpacked_selected_decode(group, q, views, labels, fresh)
            selection = select_tokens(q, labels, None, block_table, seq_lens, config, max_seq_len=max_len,
                                      backend=self._decode_backend("label_scores_fwd"), check_values=False)
            self._count_decode(group, selection)
            out, _ = sparse_decode_attention(q, views.k, views.v, block_table, seq_lens, selection, scale=self.scale,
                                             backend=self._decode_backend("sparse_decode_attention_fwd"),
                                             check_values=False)
            return out
        # CPU: one selection pass (scores read from the page's labels, or from the keys themselves, pruned slots
        # unpacked) and one attention pass over the selected tokens, both C++ on the pages.
        selection = None
        if max_len >= config.dense_below:
            budgets, width = group.budgets(config)
            if labels is not None:
                source, channels, keep, scales, bits = labels.labels, labels.channels, 0, labels.scales, labels.bits
            else:  # exact scores over the pruned keys
                source, channels, keep, scales, bits = views.kv, self._all_channels(q.device), self._slot.keep, None, 16
            selection = select_tokens_cpu(q, source, channels, block_table, seq_lens, budgets, width, config, max_len,
                                          slot_keep=keep, label_scales=scales, label_bits=bits)
        self._count_decode(group, selection)
        new_k, new_v = self._fresh(group, fresh)
        k, v = (views.kv, views.kv) if self._slot.pruned else (views.k, views.v)
        out, _ = block_sparse_attention_cpp(
            q, k, v, group.decode_cu_seqlens(), None, selection, False, self.scale, block_table=block_table,
            kv_lens=seq_lens, q_block_size=1, slot_keep=self._slot.keep if self._slot.pruned else 0,
            new_k=new_k, new_v=new_v, checked=True)
        return out

    def _all_channels(self, device) -> torch.Tensor:
        d = self.head_size
        return torch.arange(d, device=device).expand(self.num_kv_heads, d)

    def _count_decode(self, group: RowGroup, selection) -> None:
        full = sum(group.kv_lens) * self.num_kv_heads
        self.stats.add("decode", len(group.rows), full if selection is None else selection.kv_num_blocks.sum(), full,
                       True)

    def _unpacked_selected_decode(self, group: RowGroup, q: torch.Tensor, views: PageViews,
                                  labels: LabelCache | None, fresh) -> torch.Tensor:
        """Token-selection decode on pruned pages for kernels that cannot unpack slots: the rows' context unpacked
        (each row's new token exact) and read as pages of one token; scored exactly on it, or on the labels."""
        k, v = self._context(group, views, fresh)
        table = group.token_pages()
        k_pages, v_pages = k[:, None], v[:, None]  # [Tk, 1, Hkv, D]
        label_table, seq_lens = group.row_pages()
        if labels is None:  # exact scores over the (pruned) keys
            d = self.head_size
            labels = LabelCache.over(k_pages, torch.arange(d, device=k.device).expand(self.num_kv_heads, d))
            label_table = table
        selection = select_tokens(q, labels, None, label_table, seq_lens, self.decode.config,
                                  max_seq_len=max(group.kv_lens), backend=self._decode_backend("label_scores_fwd"),
                                  check_values=False)
        out, _ = sparse_decode_attention(q, k_pages, v_pages, table, seq_lens, selection, scale=self.scale,
                                         backend=self._decode_backend("sparse_decode_attention_fwd"), check_values=False)
        self._count_decode(group, selection)
        return out

    def _decode_backend(self, cuda_op: str) -> str | None:
        """``op_backend`` for a decode op; "cuda" names the block-sparse extension op, so a decode op the
        extension lacks runs on the device's default implementation instead."""
        if self.op_backend == "cuda" and not cuda_op_available(cuda_op):
            return None
        return self.op_backend


def layer_from_options(options: SparseAttnOptions, layer_index: int | None, num_heads: int, num_kv_heads: int,
                       head_size: int, scale: float, tp_rank: int = 0, tp_size: int = 1) -> PagedAttentionLayer:
    """The layer ``layer_index`` as the backend's options configure it, on one tensor-parallel rank."""
    prefill, decode = options.layer_settings(layer_index, num_heads, tp_rank, tp_size)
    if isinstance(decode, tuple):
        decode = DecodeSelection(*decode)
    return PagedAttentionLayer(
        num_heads, num_kv_heads, head_size, scale, prefill=prefill, decode=decode, block_size=options.block_size,
        label_width=options.label_width, kv_sparsity=options.kv_sparsity,
        kv_exact_new=options.kv_new_tokens == "exact", op_backend=options.op_backend,
        layer_index=layer_index,
    )
