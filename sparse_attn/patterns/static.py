"""Static patterns: which blocks are read depends on positions only, never on the content of q and k."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validate import check_int
from .base import Pattern, SeqContext


@dataclass(frozen=True)
class Dense(Pattern):
    """Every (causally visible) block: reproduces dense attention exactly, through the same kernels."""

    def keep_blocks(self, seq: SeqContext) -> torch.Tensor:
        return torch.ones(1, seq.num_q_blocks, seq.num_kv_blocks, dtype=torch.bool, device=seq.device)


@dataclass(frozen=True)
class AShape(Pattern):
    """StreamingLLM's A-shape: the first ``sink_tokens`` keys plus a local window of ``local_tokens`` keys.

    At block granularity a KV block is read when it overlaps the sink, or overlaps the window
    ``[first_row - local_tokens + 1, last_row]`` of some row of the query block.
    """

    sink_tokens: int = 128
    local_tokens: int = 1024

    def __post_init__(self):
        check_int("sink_tokens", self.sink_tokens, 0)
        check_int("local_tokens", self.local_tokens, 1)

    def keep_blocks(self, seq: SeqContext) -> torch.Tensor:
        first_row, last_row = seq.q_block_rows()
        first_key, last_key = seq.kv_block_keys()
        sink = (first_key < self.sink_tokens)[None, :]
        local = (last_key[None, :] > first_row[:, None] - self.local_tokens) & (first_key[None, :] <= last_row[:, None])
        return (sink | local).unsqueeze(0)


@dataclass(frozen=True)
class Strided(Pattern):
    """S2-Attention-style sharded heads: head h reads KV blocks j with ``(j + h) % stride == 0``, so ``stride``
    consecutive heads together cover the whole context. With ``local_blocks >= 1`` every head also reads the blocks
    holding its own rows plus ``local_blocks - 1`` blocks before them, so no row is left without keys."""

    stride: int = 4
    local_blocks: int = 1

    def __post_init__(self):
        check_int("stride", self.stride)
        check_int("local_blocks", self.local_blocks, 0)

    def keep_blocks(self, seq: SeqContext) -> torch.Tensor:
        heads = torch.arange(seq.num_heads, device=seq.device)
        j = torch.arange(seq.num_kv_blocks, device=seq.device)
        shard = ((j[None, :] + heads[:, None]) % self.stride == 0)[:, None, :]  # [H, 1, nk]
        if self.local_blocks == 0:
            return shard.expand(-1, seq.num_q_blocks, -1)
        return shard | seq.own_blocks(back=self.local_blocks - 1)[None]
