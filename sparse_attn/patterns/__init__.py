"""Patterns compile methods to the shared BlockSparseMask: static (positions only) and content-aware (q and k)."""

from .base import Pattern, PerHead, SeqContext
from .content import TopKBlocks, VerticalSlash
from .elastic import ElasticSpan
from .head_proxy import HeadProxy
from .static import AShape, Dense, Strided

__all__ = ["Pattern", "PerHead", "SeqContext", "Dense", "AShape", "Strided", "VerticalSlash", "TopKBlocks",
           "ElasticSpan", "HeadProxy", "default_pattern"]


def default_pattern() -> Pattern:
    """The pattern for heads no plan covers: ProxyAttn's content-aware selection with its published defaults
    (cumulative mass 0.95, 1 of 4 query rows, at least 2048 tokens per query block), never a static window, and
    the query blocks of the prompt's last 128 rows read in full (where a prompt asks its question: the rows that
    decide what the answer retrieves, a small share of the causal area). Each head's budget is fitted on 8 query
    blocks spread over the prompt, not on the last one alone: a prompt's final rows often attend to a few places
    while rows inside a long document spread wider, and a budget fitted on the last rows under-serves those. Every
    query head scores the blocks with its own queries (``head_scores``), each block by the attention mass its sampled
    rows give it (``pooling="mean"``), as the shipped plans do: a KV group's mean query blurs heads that attend to
    different places, and on SmolLM2 at 8k tokens the group proxies lost the exact-copy retrieval of a repeated
    licence text (perplexity +3.2% over dense) that per-head scores keep, at the same density, for about three times
    the scoring work (still a few percent of dense attention); with max pooling instead of the mass, per-head
    scores lost a word needle early in 7.5k tokens of Python source."""
    return HeadProxy(gamma=0.95, q_stride=4, min_budget=2048, dense_tail=128, fit_blocks=8, head_scores=True,
                     pooling="mean")
