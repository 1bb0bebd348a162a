"""MoA's elastic spans: a per-head local window that grows with the context, ``span = alpha + beta * (L - alpha)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validate import check_int, check_real
from .base import Pattern, SeqContext
from .static import AShape

__all__ = ["ElasticSpan"]


@dataclass(frozen=True)
class ElasticSpan(Pattern):
    """Sink tokens plus a local window of ``alpha + beta * (L - alpha)`` keys for a context of ``L`` keys.

    ``beta = 0`` is a fixed window (StreamingLLM's A-shape); ``beta = 1`` reaches the whole context. MoA fits
    (alpha, beta) per head offline so that heads whose reach grows with the input keep growing with it.
    """

    alpha: int = 1024
    beta: float = 0.0
    sink_tokens: int = 64

    def __post_init__(self):
        check_int("alpha", self.alpha)
        check_int("sink_tokens", self.sink_tokens, 0)
        check_real("beta", self.beta, 0, 1)

    def span(self, context_len: int) -> int:
        """Window length in keys for a context of ``context_len`` keys (at least 1)."""
        return max(1, round(self.alpha + self.beta * max(0, context_len - self.alpha)))

    def keep_blocks(self, seq: SeqContext) -> torch.Tensor:
        return AShape(self.sink_tokens, self.span(seq.kv_len)).keep_blocks(seq)
