"""Attention operators: the dispatching entry point, the CPU implementation, the reference and dense attention."""

from .attention import BACKENDS, block_sparse_attention, resolve_backend
from .dense import dense_attention
from .reference import attention_reference_varlen

__all__ = ["BACKENDS", "block_sparse_attention", "resolve_backend", "dense_attention", "attention_reference_varlen"]
