"""The sparse representation shared by every pattern, estimator and kernel."""

from .block_mask import BlockSparseMask, causal_block_bounds, num_blocks

__all__ = ["BlockSparseMask", "causal_block_bounds", "num_blocks"]
