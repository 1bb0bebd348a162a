"""PyTorch modules: drop-in replacements for dense attention."""

from .sparse_attention import SparseAttention

__all__ = ["SparseAttention"]
