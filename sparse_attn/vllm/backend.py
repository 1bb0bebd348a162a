"""The vLLM attention backend ``SPARSE``: vLLM's paged KV cache, sparse-attn's masks and ``block_sparse_attention``.

Three parts, each with one job (the split of vLLM's ``triton_attn.py``):

- :class:`SparseAttentionBackend` declares what the backend supports; anything else fails at start-up.
- :class:`SparseAttentionMetadataBuilder` turns vLLM's per-step metadata into row groups (once per step, shared by
  every layer) and gives each layer's impl its index and patterns (once, at start-up).
- :class:`SparseAttentionImpl` writes new K/V into the pages and runs each row group through
  ``block_sparse_attention`` with the mask of the layer's pattern.

Rows (requests) of a step are grouped by phase (decode: one query token; prefill: a prompt or a chunk of it, whose
queries are the last ``q_len`` positions of ``seq_len``) and by whether they are shorter than ``dense_below``. A group
reads its context from the pages through the block table into the varlen layout ``[Tk, Hkv, D]``, so the same op
serves CPU (PyTorch) and CUDA (the project's Triton kernel, chosen by the op's dispatch).

The page of one layer is vLLM's logical ``[num_blocks, Hkv, block_size, 2*D]`` (K | V per token and head) in the
``LBNHC`` physical order, so ``kv_cache.transpose(1, 2)`` is ``[num_blocks, block_size, Hkv, 2*D]`` in memory order
and slot ``s = block * block_size + offset`` is one row of a ``[num_blocks * block_size, Hkv, D]`` view.
"""

from __future__ import annotations

import logging
from itertools import accumulate
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vllm.config import VllmConfig, get_current_vllm_config_or_none, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from ..masks import BlockSparseMask
from ..ops import block_sparse_attention
from ..patterns import Dense, Pattern
from .config import SparseAttnOptions, options_from_vllm_config
from .plugin import BACKEND_NAME

MAX_HEAD_SIZE = 256  # the Triton kernel's limit
logger = logging.getLogger("vllm.sparse_attn")  # under vLLM's logger, so it prints with vLLM's start-up lines


class SparseAttentionBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]  # no fp8 KV cache
    # New K/V are written by do_kv_cache_update, before forward; forward only reads the pages.
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME  # the layer looks its backend up as AttentionBackendEnum[get_name()]

    @staticmethod
    def get_impl_cls() -> type["SparseAttentionImpl"]:
        return SparseAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["SparseAttentionMetadataBuilder"]:
        return SparseAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return 0 < head_size <= MAX_HEAD_SIZE

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBNHC,)  # token-major pages: a slot is one [Hkv, 2*D] row

    # Everything below keeps vLLM's defaults (False / decoder only), stated here so the limits read in one place:
    # MLA, sparse-MLA indexers, sinks, sliding window, non-causal, encoder and cross attention, DCP/PCP are refused
    # by validate_configuration; alibi and logits soft-capping by SparseAttentionImpl.__init__.
    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class RowGroup:
    """Rows of one step that share one ``block_sparse_attention`` call: same phase, same dense-or-pattern choice.

    ``token_index`` [Tq] picks the group's query tokens out of the step's tokens (``token_range`` when they are
    contiguous); ``kv_slots`` [Tk] are the page slots of every context token of its rows, row after row.
    """

    phase: str  # "prefill" or "decode"
    dense: bool  # the rows are shorter than dense_below
    q_lens: list[int]
    kv_lens: list[int]
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    token_index: torch.Tensor
    token_range: tuple[int, int] | None
    kv_slots: torch.Tensor
    masks: dict[tuple, BlockSparseMask] = field(default_factory=dict)  # position-only masks, shared by layers

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.token_range[0] : self.token_range[1]] if self.token_range else x.index_select(0, self.token_index)

    def put(self, out: torch.Tensor, values: torch.Tensor) -> None:
        if self.token_range:
            out[self.token_range[0] : self.token_range[1]] = values
        else:
            out.index_copy_(0, self.token_index, values)

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


@dataclass
class SparseAttentionMetadata:
    num_actual_tokens: int  # tokens of the step, possibly padded
    num_scheduled_tokens: int  # tokens that belong to a request; rows past it are padding
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    groups: list[RowGroup]


def plan_row_groups(
    query_start_loc: list[int],
    seq_lens: list[int],
    block_table: torch.Tensor,
    block_size: int,
    dense_below: int,
) -> list[RowGroup]:
    """Group the rows of a step (see :class:`RowGroup`) and compute each group's token and slot indices.

    ``query_start_loc`` [B+1] and ``seq_lens`` [B] are host lists; ``block_table`` [B, max_blocks] sits on the
    device. A row's context token t lives in slot ``block_table[row, t // block_size] * block_size + t % block_size``.
    """
    device = block_table.device
    rows_by_key: dict[tuple[str, bool], list[int]] = {}
    for row, seq_len in enumerate(seq_lens):
        q_len = query_start_loc[row + 1] - query_start_loc[row]
        if q_len == 0:
            continue  # a padding row
        key = ("decode" if q_len == 1 else "prefill", seq_len < dense_below)
        rows_by_key.setdefault(key, []).append(row)

    groups = []
    for (phase, dense), rows in rows_by_key.items():
        q_starts = [query_start_loc[r] for r in rows]
        q_lens = [query_start_loc[r + 1] - query_start_loc[r] for r in rows]
        kv_lens = [seq_lens[r] for r in rows]
        cu_q, cu_k = list(accumulate(q_lens, initial=0)), list(accumulate(kv_lens, initial=0))
        token_index = _ragged_arange(q_starts, q_lens, cu_q, device)
        contiguous = all(q_starts[i] + q_lens[i] == q_starts[i + 1] for i in range(len(rows) - 1))
        token_range = (q_starts[0], q_starts[0] + cu_q[-1]) if contiguous else None
        positions = _ragged_arange([0] * len(rows), kv_lens, cu_k, device)
        row_of_token = torch.repeat_interleave(
            torch.tensor(rows, device=device), torch.tensor(kv_lens, device=device)
        )
        pages = block_table[row_of_token, positions // block_size].long()
        kv_slots = pages * block_size + positions % block_size
        groups.append(RowGroup(
            phase, dense, q_lens, kv_lens,
            torch.tensor(cu_q, dtype=torch.int32, device=device), torch.tensor(cu_k, dtype=torch.int32, device=device),
            token_index, token_range, kv_slots,
        ))
    return groups


def _ragged_arange(starts: list[int], lengths: list[int], offsets: list[int], device) -> torch.Tensor:
    """Concatenation of ``arange(start, start + length)`` over the rows, as one int64 tensor."""
    lengths_t = torch.tensor(lengths, device=device)
    base = torch.repeat_interleave(torch.tensor(starts, device=device) - torch.tensor(offsets[:-1], device=device), lengths_t)
    return base + torch.arange(offsets[-1], device=device)


class SparseAttentionMetadataBuilder(AttentionMetadataBuilder[SparseAttentionMetadata]):
    # Forward plans rows in Python on host lengths: it runs eagerly between the graph pieces (piecewise mode).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self.options = options_from_vllm_config(vllm_config)
        self._init_reorder_batch_threshold(1)  # decode rows first: groups tend to be contiguous
        configured = 0
        for name, layer in get_layers_from_vllm_config(vllm_config, Attention, layer_names).items():
            if isinstance(layer.impl, SparseAttentionImpl):
                layer.impl.configure(layer_index(name), self.options)
                configured += 1
        o = self.options
        logger.info(
            "%s attention backend: %d layers, prefill %s, decode %s, dense below %d tokens, dense layers %s",
            BACKEND_NAME, configured, o.prefill, o.decode, o.dense_below, sorted(o.dense_layers),
        )

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> SparseAttentionMetadata:
        return build_metadata(common_attn_metadata, self.block_size, self.options.dense_below)


def build_metadata(cm: CommonAttentionMetadata, block_size: int, dense_below: int) -> SparseAttentionMetadata:
    """One step's metadata, shared by every layer of the KV cache group."""
    query_start_loc = cm.query_start_loc_cpu[: cm.num_reqs + 1].tolist()
    seq_lens = cm.seq_lens[: cm.num_reqs].cpu().tolist()  # exact lengths (a sync on GPU, once per step)
    return SparseAttentionMetadata(
        num_actual_tokens=cm.num_actual_tokens,
        num_scheduled_tokens=query_start_loc[-1],
        max_query_len=cm.max_query_len,
        max_seq_len=cm.max_seq_len,
        query_start_loc=cm.query_start_loc,
        seq_lens=cm.seq_lens,
        block_table=cm.block_table_tensor,
        slot_mapping=cm.slot_mapping,
        groups=plan_row_groups(query_start_loc, seq_lens, cm.block_table_tensor, block_size, dense_below),
    )


def _is_set(value) -> bool:
    """Whether an extra layer argument turns a feature on (None, False and -1 are vLLM's "off" values)."""
    return not (value is None or value is False or (type(value) is int and value == -1))


def layer_index(layer_name: str) -> int | None:
    """``model.layers.12.self_attn.attn`` -> 12; None for names that do not carry exactly one index."""
    try:
        return extract_layer_index(layer_name)
    except (AssertionError, ValueError):
        return None


class SparseAttentionImpl(AttentionImpl[SparseAttentionMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **unsupported,
    ) -> None:
        refused = {
            "alibi slopes": alibi_slopes is not None,
            "sliding window": sliding_window is not None,
            "logits soft cap": bool(logits_soft_cap),
            "attention sinks": sinks is not None,
            f"attention type {attn_type!r} (decoder only)": attn_type != AttentionType.DECODER,
            f"kv_cache_dtype {kv_cache_dtype!r}": kv_cache_dtype not in SparseAttentionBackend.supported_kv_cache_dtypes,
        }
        refused.update({f"{name}={value!r}": True for name, value in unsupported.items() if _is_set(value)})
        if any(refused.values()):
            raise ValueError(f"The {BACKEND_NAME} attention backend does not support: "
                             f"{', '.join(k for k, v in refused.items() if v)}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        # Options are checked here too, so a worker started without the front-end check still fails at start-up.
        self.configure(None, options_from_vllm_config(get_current_vllm_config_or_none()))

    def configure(self, index: int | None, options: SparseAttnOptions) -> None:
        """Per-layer state: the layer's index and patterns (called by the metadata builder at start-up)."""
        self.layer_index = index
        self.options = options
        self.prefill_pattern, self.decode_pattern = options.patterns_for_layer(index)

    def do_kv_cache_update(
        self, layer: AttentionLayer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Write the step's new K/V into their slots; slot -1 marks padding. key/value may be padded past
        ``slot_mapping``."""
        key_cache, value_cache = self._slot_views(kv_cache)
        slots = slot_mapping.long()
        valid = slots >= 0
        n = slots.shape[0]
        key_cache[slots[valid]] = key[:n][valid].to(key_cache.dtype)
        value_cache[slots[valid]] = value[:n][valid].to(value_cache.dtype)

    def _slot_views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[num_blocks * block_size, Hkv, D]`` views of the K and V halves (no copy in the LBNHC order)."""
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        shape = (-1, self.num_kv_heads, self.head_size)
        return key_cache.view(shape), value_cache.view(shape)  # view, not reshape: writes must reach the pages

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: SparseAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query ``[T, Hq, D]``; output ``[T, Hq, D]``, written for the first ``num_actual_tokens`` rows."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"The {BACKEND_NAME} attention backend does not fuse output quantization")
        if attn_metadata is None:  # the profiling run
            return output.fill_(0)
        if self.layer_index is None:  # a layer the builder did not see (e.g. one sharing another's KV cache)
            self.configure(layer_index(getattr(layer, "layer_name", "")), self.options)

        key_cache, value_cache = self._slot_views(kv_cache)
        for group in attn_metadata.groups:
            pattern = Dense() if group.dense else (self.decode_pattern if group.phase == "decode" else self.prefill_pattern)
            q = group.take(query)
            k = key_cache.index_select(0, group.kv_slots).to(q.dtype)
            v = value_cache.index_select(0, group.kv_slots).to(q.dtype)
            mask = group.mask(pattern, self.options.block_size, self.num_heads, q, k, self.scale)
            out = block_sparse_attention(
                q, k, v, mask, causal=True, scale=self.scale, cu_seqlens_q=group.cu_seqlens_q,
                cu_seqlens_k=group.cu_seqlens_k, backend=self.options.op_backend,
            )
            group.put(output, out)
        output[attn_metadata.num_scheduled_tokens : attn_metadata.num_actual_tokens].zero_()  # padding rows
        return output
