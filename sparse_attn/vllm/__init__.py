"""vLLM integration: the ``sparse`` attention backend (``--attention-backend sparse``).

``plugin.register`` is the ``vllm.general_plugins`` entry point; ``backend`` holds the backend (it imports vLLM);
``paged_core`` is its attention on vLLM's paged KV cache and ``config`` parses its options (neither imports vLLM).
"""

from .config import ADDITIONAL_CONFIG_KEY, ENV_VAR, SparseAttnConfigError, SparseAttnOptions, parse_options
from .plugin import BACKEND_NAME, register

__all__ = [
    "register", "BACKEND_NAME", "ENV_VAR", "ADDITIONAL_CONFIG_KEY",
    "SparseAttnOptions", "SparseAttnConfigError", "parse_options",
]
