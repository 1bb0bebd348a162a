"""Triton kernels of sparse-attn (installed as sparse_attn.triton_kernels)."""

from .block_sparse_attention import block_sparse_attention_fwd

__all__ = ["block_sparse_attention_fwd"]
from .decode_attention import decode_attention_fwd
from .label_scores import label_scores_fwd

__all__ += ["decode_attention_fwd", "label_scores_fwd"]

from .proxy_scores import pooled_block_probs_fwd

__all__ += ["pooled_block_probs_fwd"]
