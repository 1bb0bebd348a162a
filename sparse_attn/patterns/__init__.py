"""Patterns compile methods to the shared BlockSparseMask: static (positions only) and content-aware (q and k)."""

from .base import Pattern, PerHead, SeqContext
from .content import TopKBlocks, VerticalSlash
from .elastic import ElasticSpan
from .head_proxy import HeadProxy
from .static import AShape, Dense, Strided

__all__ = ["Pattern", "PerHead", "SeqContext", "Dense", "AShape", "Strided", "VerticalSlash", "TopKBlocks",
           "ElasticSpan", "HeadProxy"]
