"""vLLM's scheduler with prefill chunks that start on mask-block boundaries.

Sparse prefill cuts a chunk's queries into blocks of ``block_size`` rows from the chunk's first token and estimates
each block's mask from its own rows. vLLM's scheduler ends a chunk wherever the step's token budget runs out, so under
load the same prompt is cut at different places and its query blocks hold different rows: the answer would depend
on what else the engine was doing. This scheduler ends every prefill chunk but a prompt's last on a multiple of
``block_size``, so every chunk starts on a block boundary (prefix-cache hits already start on page boundaries, a
multiple of the block size): a query block holds the same rows however the prompt was scheduled.

It reuses the scheduler's own hook for block-aligned chunks (the one Mamba's "align" cache mode uses); the plugin
installs it (``scheduler_cls``) when the sparse backend runs a sparse prefill and no other scheduler was chosen.
"""

from __future__ import annotations

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

HOOK = "_mamba_block_aligned_split"


class _BlockAlignedChunks:
    """Mixin over vLLM's Scheduler or AsyncScheduler (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from .config import options_from_vllm_config

        self.sparse_chunk_align = options_from_vllm_config(self.vllm_config).block_size
        # Models with Mamba layers align their chunks themselves ("align" mode); the backend does not serve them.
        self._sparse_aligns = not self.has_mamba_layers
        if self._sparse_aligns:
            self.need_mamba_block_aligned_split = True

    def _mamba_block_aligned_split(self, request, num_new_tokens: int, num_new_local_computed_tokens: int = 0,
                                   num_external_computed_tokens: int = 0) -> int:
        if not self._sparse_aligns:
            return super()._mamba_block_aligned_split(request, num_new_tokens, num_new_local_computed_tokens,
                                                      num_external_computed_tokens)
        step_tokens = self.max_num_scheduled_tokens
        threshold = self.scheduler_config.long_prefill_token_threshold
        if threshold > 0:
            step_tokens = min(step_tokens, threshold)
        return aligned_chunk(request.num_computed_tokens + num_new_local_computed_tokens
                             + num_external_computed_tokens, num_new_tokens,
                             max(request.num_prompt_tokens, request.num_tokens - 1), self.sparse_chunk_align,
                             step_tokens)


def aligned_chunk(start: int, num_new_tokens: int, prefill_end: int, align: int, step_tokens: int) -> int:
    """Tokens to schedule from ``start``: a chunk ending before ``prefill_end`` (the prompt, or the tokens a resumed
    request replays) is cut back to a multiple of ``align``; the last chunk and decode steps are left alone. A chunk
    that starts off the grid (a cache hit that is not block-aligned) ends on it. Where the budget left in this step
    reaches no boundary the request waits for the next step (0), unless no step could (``align`` above
    ``step_tokens``, the most prefill tokens a step takes): then the chunk is not cut."""
    end = start + num_new_tokens
    if start >= prefill_end or end >= prefill_end:
        return num_new_tokens
    aligned_end = end // align * align
    if aligned_end > start:
        return aligned_end - start
    return 0 if align <= step_tokens else num_new_tokens


class BlockAlignedScheduler(_BlockAlignedChunks, Scheduler):
    pass


class BlockAlignedAsyncScheduler(_BlockAlignedChunks, AsyncScheduler):
    pass


def block_aligned_scheduler(*args, **kwargs):
    """What ``scheduler_cls`` names: the aligned form of the scheduler vLLM would have chosen (async or not)."""
    config = kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]
    cls = BlockAlignedAsyncScheduler if config.scheduler_config.async_scheduling else BlockAlignedScheduler
    return cls(*args, **kwargs)


def hook_available() -> bool:
    """Whether this vLLM's scheduler has the block-aligned chunk hook the aligned scheduler overrides."""
    return callable(getattr(Scheduler, HOOK, None))
