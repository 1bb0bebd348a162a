"""The vLLM attention backend ``SPARSE``: the vLLM side of :mod:`.paged_core` (which holds the attention itself).

Three parts, each with one job (the split of vLLM's ``triton_attn.py``):

- :class:`SparseAttentionBackend` declares what the backend supports (anything else fails at start-up) and sizes the
  KV page (``customize_spec``): narrower with KV pruning (each token's K and V pruned to a fixed number of values and
  packed with keep bitmaps), wider with Double Sparsity (the label channels), so vLLM's KV memory accounting counts
  exactly what the pages hold and allocates as many blocks as fit.
- :class:`SparseAttentionMetadataBuilder` turns vLLM's per-step metadata into row groups (once per step, shared by
  every layer) and gives each layer's impl its index, patterns and decode selection (once, at start-up, sliced to
  this tensor-parallel rank's heads).
- :class:`SparseAttentionImpl` hands the writes and the forward pass to its :class:`.paged_core.PagedAttentionLayer`.

What each layer read is counted (:class:`.paged_core.SparsityStats`): logged every ``STATS_LOG_SECONDS`` and returned
by ``llm.collective_rpc("sparse_attn_stats")`` (the plugin installs :class:`SparsityStatsExtension` as the worker
extension when none is set).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
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

from .config import SparseAttnOptions, options_from_vllm_config
from .paged_core import PagedAttentionLayer, StepMetadata, layer_from_options, plan_step
from .plugin import BACKEND_NAME

MAX_HEAD_SIZE = 256  # the Triton kernel's limit
STATS_LOG_SECONDS = 30.0
logger = logging.getLogger("vllm.sparse_attn")  # under vLLM's logger, so it prints with vLLM's start-up lines

#: The options this process's layers were built with (customize_spec runs outside vLLM's config context).
_process_options: SparseAttnOptions | None = None
#: Configured layers of this process, by layer name (what the statistics read).
_layers: dict[str, "SparseAttentionImpl"] = {}


def _options(vllm_config=None) -> SparseAttnOptions:
    global _process_options
    vllm_config = vllm_config or get_current_vllm_config_or_none()
    if vllm_config is not None or _process_options is None:
        _process_options = options_from_vllm_config(vllm_config)
    return _process_options


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
        return (KVCacheLayout.LBNHC,)  # token-major pages: a slot is one [Hkv, C] row

    @classmethod
    def customize_spec(cls, spec):
        """The page holds per token and KV head: K and V (``2 * D`` values; with KV pruning a slot of ``2 * m``
        kept values and two D-bit keep bitmaps), then with Double Sparsity the key's label (r channels of K). Values
        are in the cache dtype; vLLM sizes the KV cache (the number of blocks) for this page."""
        options = _options()
        if not options.label_width and not options.kv_sparsity:
            return spec
        what = "add Double Sparsity labels to" if options.label_width else "prune"
        if spec.state_content_bytes is not None:
            raise ValueError(f"The {BACKEND_NAME} attention backend cannot {what} a packed KV page (a quantized KV "
                             "cache)")
        if spec.head_size_v != spec.head_size:
            raise ValueError(f"The {BACKEND_NAME} attention backend cannot {what} a KV page whose K and V sizes "
                             f"differ ({spec.head_size} and {spec.head_size_v})")
        try:
            width = options.page_width(spec.head_size, spec.dtype)
        except ValueError as e:  # a cache dtype that cannot hold pruned values
            raise ValueError(f"The {BACKEND_NAME} attention backend cannot {what} this KV cache: {e}") from None
        return replace(spec, state_content_bytes=width * spec.dtype.itemsize)

    # Everything below keeps vLLM's defaults (False / decoder only), stated here so the limits read in one place:
    # MLA, sparse-MLA indexers, sinks, sliding window, non-causal, encoder and cross attention, DCP/PCP are refused
    # by validate_configuration; alibi and logits soft-capping by SparseAttentionImpl.__init__.
    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


class SparseAttentionMetadataBuilder(AttentionMetadataBuilder[StepMetadata]):
    # Forward plans rows in Python on host lengths and selects a data-dependent number of tokens: it runs eagerly
    # between the graph pieces (vLLM downgrades full CUDA graphs to piecewise for this backend).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.page_size = kv_cache_spec.block_size
        self.options = _options(vllm_config)
        self._init_reorder_batch_threshold(1)  # decode rows first: groups tend to be contiguous
        tp_rank, tp_size = _tensor_parallel()
        configured = []
        for name, layer in get_layers_from_vllm_config(vllm_config, Attention, layer_names).items():
            if isinstance(layer.impl, SparseAttentionImpl):
                layer.impl.configure(layer_index(name), self.options, tp_rank, tp_size)
                _layers[name] = layer.impl
                configured.append(layer.impl.core)
        selecting = sum(not _is_pattern(c.decode) for c in configured)
        logger.info(
            "%s attention backend: %d layers (rank %d of %d, %d query / %d KV heads each), %s; %d layers select "
            "decode tokens, page label width %d",
            BACKEND_NAME, len(configured), tp_rank, tp_size, configured[0].num_heads if configured else 0,
            configured[0].num_kv_heads if configured else 0, self.options.describe(), selecting,
            self.options.label_width,
        )
        spec = kv_cache_spec
        if self.options.kv_sparsity and hasattr(spec, "head_size") and hasattr(spec, "dtype"):
            slot = self.options.slot_format(spec.head_size, spec.dtype)
            logger.info("%s attention backend: KV pruning keeps %d of %d values of each token's K and V per KV head: "
                        "%d bytes per token and KV head instead of %d (%.3f of dense); page slot of %d %s values",
                        BACKEND_NAME, slot.keep, slot.head_dim, slot.nbytes, slot.dense_nbytes,
                        slot.nbytes / slot.dense_nbytes, self.options.page_width(spec.head_size, spec.dtype),
                        spec.dtype)
        elif self.options.kv_pruning_source and self.options.kv_pruning_source.startswith("the plan"):
            logger.warning("%s attention backend: %s", BACKEND_NAME, self.options.kv_pruning_source)
        self._last_log = time.monotonic()

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> StepMetadata:
        if time.monotonic() - self._last_log > STATS_LOG_SECONDS:
            self._last_log = time.monotonic()
            _log_stats()
        return build_metadata(common_attn_metadata, self.page_size, self.options.dense_below,
                              self.options.decode_dense_below)


def build_metadata(cm: CommonAttentionMetadata, page_size: int, dense_below: int,
                   decode_dense_below: int | None = None) -> StepMetadata:
    """One step's metadata, shared by every layer of the KV cache group."""
    query_start_loc = cm.query_start_loc_cpu[: cm.num_reqs + 1].tolist()
    seq_lens = cm.seq_lens[: cm.num_reqs].cpu().tolist()  # exact lengths (a sync on GPU, once per step)
    return plan_step(query_start_loc, seq_lens, cm.block_table_tensor, cm.slot_mapping, page_size=page_size,
                     dense_below=dense_below, decode_dense_below=decode_dense_below,
                     num_actual_tokens=cm.num_actual_tokens)


def _is_pattern(decode) -> bool:
    from ..patterns import Pattern

    return isinstance(decode, Pattern)


def _tensor_parallel() -> tuple[int, int]:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (AssertionError, RuntimeError):  # no distributed state (a bare unit test)
        return 0, 1


def _is_set(value) -> bool:
    """Whether an extra layer argument turns a feature on (None, False and -1 are vLLM's "off" values)."""
    return not (value is None or value is False or (type(value) is int and value == -1))


def layer_index(layer_name: str) -> int | None:
    """``model.layers.12.self_attn.attn`` -> 12; None for names that do not carry exactly one index."""
    try:
        return extract_layer_index(layer_name)
    except (AssertionError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------- statistics
def sparsity_stats(reset: bool = False) -> dict:
    """What this process's layers read so far: ``{"layers": {index: {"prefill": {...}, "decode": {...}}},
    "prefill": {...}, "decode": {...}}`` where each phase has ``rows``, ``sparse_rows`` and ``density`` (fraction
    of dense attention's blocks / tokens read; None when no row ran), and prefill ``unaligned_chunks`` (sparse
    prompt chunks not starting on a mask-block boundary, summed over layers). Keys are strings (it crosses vLLM's
    RPC)."""
    layers, totals, unaligned = {}, {phase: [0.0, 0, 0, 0] for phase in ("prefill", "decode")}, 0
    for name, impl in sorted(_layers.items(), key=lambda item: (layer_index(item[0]) is None, layer_index(item[0]) or 0)):
        stats = impl.core.stats
        layers[str(impl.core.layer_index if impl.core.layer_index is not None else name)] = stats.as_dict()
        for phase, total in totals.items():
            total[0] += float(stats.read[phase])
            total[1] += stats.full[phase]
            total[2] += stats.rows[phase]
            total[3] += stats.sparse_rows[phase]
        unaligned += stats.unaligned_chunks
        if reset:
            stats.reset()
    out = {"layers": layers}
    for phase, (read, full, rows, sparse_rows) in totals.items():
        out[phase] = {"rows": rows, "sparse_rows": sparse_rows, "density": read / full if full else None}
    out["prefill"]["unaligned_chunks"] = unaligned
    return out


def _log_stats() -> None:
    stats = sparsity_stats()
    parts = []
    for phase in ("prefill", "decode"):
        densities = [layer[phase]["density"] for layer in stats["layers"].values() if layer[phase]["density"] is not None]
        if densities:
            parts.append(f"{phase} density {stats[phase]['density']:.3f} (layers {min(densities):.3f}.."
                         f"{max(densities):.3f}; {stats[phase]['sparse_rows']} of {stats[phase]['rows']} layer-rows sparse)")
    if parts:
        logger.info("%s attention: %s", BACKEND_NAME, "; ".join(parts))


class SparsityStatsExtension:
    """Worker extension: ``llm.collective_rpc("sparse_attn_stats")`` returns :func:`sparsity_stats` of every
    worker (one dict per tensor-parallel rank)."""

    def sparse_attn_stats(self, reset: bool = False) -> dict:
        return sparsity_stats(reset)

    def sparse_attn_layers(self) -> dict:
        """Each configured layer's prefill pattern and decode selection on this rank (for inspection)."""
        out = {}
        for name, impl in _layers.items():
            core = impl.core
            decode = core.decode
            entry = {"prefill": repr(core.prefill), "num_heads": core.num_heads, "num_kv_heads": core.num_kv_heads,
                     "kv_sparsity": core.kv_sparsity}
            if _is_pattern(decode):
                entry["decode"] = repr(decode)
            else:
                entry["decode"] = repr(decode.config)
                entry["channels"] = None if decode.channels is None else decode.channels.tolist()
            out[str(core.layer_index if core.layer_index is not None else name)] = entry
        return out


# ---------------------------------------------------------------------------------------------------- the impl
class SparseAttentionImpl(AttentionImpl[StepMetadata]):
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
        self.configure(None, _options(), *_tensor_parallel())

    def configure(self, index: int | None, options: SparseAttnOptions, tp_rank: int = 0, tp_size: int = 1) -> None:
        """Per-layer state: the layer's patterns and decode selection (called by the metadata builder at start-up,
        when the layer index is known)."""
        self.options = options
        self._tp = (tp_rank, tp_size)
        self.core: PagedAttentionLayer = layer_from_options(
            options, index, self.num_heads, self.num_kv_heads, self.head_size, self.scale, tp_rank, tp_size
        )

    @property
    def layer_index(self) -> int | None:
        return self.core.layer_index

    def do_kv_cache_update(
        self, layer: AttentionLayer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Write the step's new K/V (and Double Sparsity labels) into their slots; slot -1 marks padding."""
        self.core.write(kv_cache, key, value, slot_mapping)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: StepMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query ``[T, Hq, D]``; output ``[T, Hq, D]``, written for the first ``num_actual_tokens`` rows."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"The {BACKEND_NAME} attention backend does not fuse output quantization")
        if attn_metadata is None:  # the profiling run
            return output.fill_(0)
        if self.core.layer_index is None:  # a layer the builder did not see (e.g. one sharing another's KV cache)
            index = layer_index(getattr(layer, "layer_name", ""))
            if index is not None:
                self.configure(index, self.options, *self._tp)
        # The step's new K/V: attended unpruned with KV pruning (a layer sharing another's KV cache did not write them).
        own = self.kv_sharing_target_layer_name is None
        return self.core.forward(query, kv_cache, attn_metadata, output, key if own else None, value if own else None)
