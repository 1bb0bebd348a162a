"""sparse-attn: sparse attention for long-context inference (block-sparse prefill, sparse decode, per-head plans)."""

import importlib.util as _importlib_util

from .integrations.transformers import configure
from .masks import BlockSparseMask
from .modules import SparseAttention
from .ops import block_sparse_attention, dense_attention
from .patterns import AShape, Dense, Pattern, PerHead, Strided, TopKBlocks, VerticalSlash

__version__ = "0.1.0"

__all__ = [
    "BlockSparseMask", "block_sparse_attention", "dense_attention",
    "Pattern", "PerHead", "Dense", "AShape", "Strided", "VerticalSlash", "TopKBlocks",
    "SparseAttention", "configure",
]


# Register attn_implementation="sparse" with transformers where it is installed; a missing or broken transformers
# must never break `import sparse_attn`.
if _importlib_util.find_spec("transformers") is not None:
    try:
        from .integrations.transformers import register as _register_transformers

        _register_transformers()
    except Exception as _error:  # noqa: BLE001
        import warnings as _warnings

        _warnings.warn(f"sparse_attn: transformers integration not registered ({_error!r})", stacklevel=2)

from .patterns import ElasticSpan, HeadProxy  # noqa: E402

__all__ += ["ElasticSpan", "HeadProxy"]

from .decode import DoubleSparsity, DoubleSparsityConfig, KVPruning, KVPruningConfig  # noqa: E402
from .integrations.transformers import calibrate_double_sparsity, reset_decode_state  # noqa: E402

__all__ += ["DoubleSparsity", "DoubleSparsityConfig", "KVPruning", "KVPruningConfig", "calibrate_double_sparsity",
            "reset_decode_state"]


def __getattr__(name):
    if name == "InPlaceCache":  # needs transformers: imported on first use
        from .integrations.cache import InPlaceCache

        return InPlaceCache
    raise AttributeError(f"module 'sparse_attn' has no attribute {name!r}")
