"""Sparse decode: attention over paged KV caches that reads only selected tokens, and Double Sparsity selection."""

from .attention import decode_attention_reference, merge_attention_states, sparse_decode_attention
from .double_sparsity import (
    DoubleSparsityConfig,
    LabelCache,
    calibrate_heavy_channels,
    label_scores,
    select_tokens,
    topk_token_indices,
)
from .paged import as_paged_cache, gather_tokens, split_vllm_kv_cache, token_slots, write_tokens

__all__ = [
    "sparse_decode_attention", "merge_attention_states", "decode_attention_reference",
    "DoubleSparsityConfig", "LabelCache", "calibrate_heavy_channels", "select_tokens", "label_scores",
    "topk_token_indices",
    "as_paged_cache", "split_vllm_kv_cache", "token_slots", "gather_tokens", "write_tokens",
]

from .kv_pruning import KVPruningConfig, pruned_decode_attention  # noqa: E402
from .compressed import CompressedKVCache  # noqa: E402
from .pruned_pages import PrunedSlotFormat  # noqa: E402
from .methods import DecodeMethod, DoubleSparsity, KVPruning  # noqa: E402

__all__ += ["KVPruningConfig", "pruned_decode_attention", "CompressedKVCache", "DecodeMethod", "DoubleSparsity",
            "KVPruning", "PrunedSlotFormat"]
