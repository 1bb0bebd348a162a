"""sparse-attn: sparse attention for long-context inference (block-sparse prefill, sparse decode, per-head plans)."""

from .masks import BlockSparseMask
from .ops import block_sparse_attention, dense_attention
from .patterns import AShape, Dense, Pattern, PerHead, Strided, TopKBlocks, VerticalSlash

__version__ = "0.1.0"

__all__ = [
    "BlockSparseMask", "block_sparse_attention", "dense_attention",
    "Pattern", "PerHead", "Dense", "AShape", "Strided", "VerticalSlash", "TopKBlocks",
]
