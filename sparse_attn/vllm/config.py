"""Options of the vLLM ``sparse`` attention backend, parsed and validated once at start-up.

Two sources, both JSON objects of the same shape: the environment variable ``SPARSE_ATTN_VLLM_CONFIG`` and
``additional_config={"sparse_attn": {...}}`` (``--additional-config`` on the command line); keys given in
``additional_config`` override the same keys from the environment. Example::

    {"prefill": {"pattern": "a_shape", "sink_tokens": 64, "local_tokens": 512},
     "decode": {"pattern": "dense"},
     "dense_below": 1024, "dense_layers": [0, 1], "block_size": 64}

- ``prefill`` / ``decode``: a pattern name (see ``PATTERNS``) with its keyword arguments, or just the name.
  ``prefill`` defaults to dense; ``decode`` defaults to the prefill pattern.
- ``dense_below``: rows whose context (cached plus new tokens) is shorter run dense.
- ``dense_layers``: layer indices that always run dense.
- ``block_size``: query and KV block size of the masks (a power of two >= 16, what the Triton kernel tiles by).
- ``op_backend``: implementation of ``block_sparse_attention`` (``auto``, ``triton``, ``cuda``, ``cpu``, ``reference``).

This module does not import vLLM, so the options can be checked (and tested) without it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from ..ops import BACKENDS
from ..patterns import AShape, Dense, Pattern, Strided, TopKBlocks, VerticalSlash

ENV_VAR = "SPARSE_ATTN_VLLM_CONFIG"
ADDITIONAL_CONFIG_KEY = "sparse_attn"

#: Pattern names accepted in the options, and the keyword arguments each takes (tensor fields are not options).
PATTERNS: dict[str, type[Pattern]] = {
    "dense": Dense,
    "a_shape": AShape,
    "strided": Strided,
    "vertical_slash": VerticalSlash,
    "top_k_blocks": TopKBlocks,
}
_NOT_OPTIONS = {"scores"}
_KEYS = ("prefill", "decode", "dense_below", "dense_layers", "block_size", "op_backend")


class SparseAttnConfigError(ValueError):
    """An invalid option; the message names the option and where it came from."""


@dataclass(frozen=True)
class SparseAttnOptions:
    prefill: Pattern = Dense()
    decode: Pattern = Dense()
    dense_below: int = 0
    dense_layers: frozenset[int] = frozenset()
    block_size: int = 64
    op_backend: str | None = None

    def patterns_for_layer(self, layer_index: int | None) -> tuple[Pattern, Pattern]:
        """(prefill pattern, decode pattern) of one layer."""
        if layer_index is not None and layer_index in self.dense_layers:
            return Dense(), Dense()
        return self.prefill, self.decode


def _option_names(cls: type[Pattern]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in _NOT_OPTIONS]


def build_pattern(spec: Any, where: str) -> Pattern:
    """A pattern from ``"name"`` or ``{"pattern": "name", **kwargs}``."""
    if isinstance(spec, str):
        spec = {"pattern": spec}
    if not isinstance(spec, Mapping) or "pattern" not in spec:
        raise SparseAttnConfigError(f"{where} must be a pattern name or an object with a 'pattern' key, got {spec!r}")
    kwargs = dict(spec)
    name = kwargs.pop("pattern")
    if name not in PATTERNS:
        raise SparseAttnConfigError(f"{where}.pattern: unknown pattern {name!r}; choose one of {sorted(PATTERNS)}")
    cls = PATTERNS[name]
    allowed = _option_names(cls)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise SparseAttnConfigError(f"{where}: pattern {name!r} takes {allowed or 'no options'}, got unknown {unknown}")
    try:
        return cls(**kwargs)
    except ValueError as e:  # the pattern's own range checks
        raise SparseAttnConfigError(f"{where}: {e}") from None


def _non_negative_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SparseAttnConfigError(f"{where} must be an int >= 0, got {value!r}")
    return value


def parse_options(raw: Mapping[str, Any] | None, source: str = "options") -> SparseAttnOptions:
    """Validate a JSON-like mapping into :class:`SparseAttnOptions`; errors name the option and ``source``."""
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise SparseAttnConfigError(f"sparse_attn options ({source}) must be a JSON object, got {type(raw).__name__}")
    where = f"sparse_attn options ({source})"
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise SparseAttnConfigError(f"{where}: unknown option(s) {unknown}; known: {list(_KEYS)}")
    prefill = build_pattern(raw["prefill"], f"{where}: prefill") if "prefill" in raw else Dense()
    decode = build_pattern(raw["decode"], f"{where}: decode") if "decode" in raw else prefill
    dense_below = _non_negative_int(raw.get("dense_below", 0), f"{where}: dense_below")
    layers = raw.get("dense_layers", [])
    if not isinstance(layers, (list, tuple)):
        raise SparseAttnConfigError(f"{where}: dense_layers must be a list of layer indices, got {layers!r}")
    dense_layers = frozenset(_non_negative_int(i, f"{where}: dense_layers[{n}]") for n, i in enumerate(layers))
    block_size = raw.get("block_size", 64)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise SparseAttnConfigError(f"{where}: block_size must be a power of two >= 16, got {block_size!r}")
    op_backend = raw.get("op_backend")
    if op_backend is not None and op_backend not in BACKENDS + ("auto",):
        raise SparseAttnConfigError(f"{where}: op_backend must be one of {('auto',) + BACKENDS}, got {op_backend!r}")
    return SparseAttnOptions(prefill, decode, dense_below, dense_layers, block_size, op_backend)


def options_from_vllm_config(vllm_config: Any) -> SparseAttnOptions:
    """The options of a vLLM run: ``$SPARSE_ATTN_VLLM_CONFIG`` overlaid with ``additional_config['sparse_attn']``."""
    merged: dict[str, Any] = {}
    sources = []
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            from_env = json.loads(env)
        except json.JSONDecodeError as e:
            raise SparseAttnConfigError(f"${ENV_VAR} is not valid JSON: {e}") from None
        if not isinstance(from_env, dict):
            raise SparseAttnConfigError(f"${ENV_VAR} must be a JSON object, got {type(from_env).__name__}")
        merged.update(from_env)
        sources.append(f"${ENV_VAR}")
    additional = getattr(vllm_config, "additional_config", None)
    if isinstance(additional, Mapping) and ADDITIONAL_CONFIG_KEY in additional:
        given = additional[ADDITIONAL_CONFIG_KEY]
        if not isinstance(given, Mapping):
            raise SparseAttnConfigError(
                f"additional_config['{ADDITIONAL_CONFIG_KEY}'] must be a JSON object, got {type(given).__name__}"
            )
        merged.update(given)
        sources.append(f"additional_config['{ADDITIONAL_CONFIG_KEY}']")
    return parse_options(merged, " + ".join(sources) or "defaults")
