"""Triton kernels of sparse-attn (installed as sparse_attn.triton_kernels)."""
