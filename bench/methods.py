"""The prefill methods the harness compares, defined once: every part (accuracy, attention-mass recall, end-to-end
transformers and vLLM runs, the demo's choices) runs the same settings under the same names.

A method is a planner :class:`~sparse_attn.planner.calibrate.Candidate` (pattern class name and parameters), so the
calibration profiler measures exactly the pattern the model runs; :func:`vllm_options` turns it into the vLLM
backend's ``additional_config`` form where the backend knows the pattern.
"""

from __future__ import annotations

import dataclasses
from sparse_attn.planner.calibrate import Candidate

#: name -> setting. ``dense`` is the baseline (transformers' SDPA, vLLM's own backend); ``dense_kernel`` is our
#: Dense() pattern through the sparse path (what the machinery costs at 100% density).
PREFILL_METHODS: dict[str, Candidate] = {
    "dense": Candidate.of("Dense"),
    "dense_kernel": Candidate.of("Dense"),
    # ProxyAttn's published defaults (gamma 0.95, 1 of 4 query rows, at least 2048 tokens per query block, group
    # proxies ranked by their max probability) and the prompt's last 128 rows read in full.
    "head_proxy": Candidate.of("HeadProxy", gamma=0.95, q_stride=4, min_budget=2048, dense_tail=128),
    # The default for heads no plan covers (patterns.default_pattern()): the same budget rule fitted on 8 query
    # blocks, every query head its own proxy, blocks ranked by their attention mass.
    "no_plan_default": Candidate.of("HeadProxy", gamma=0.95, q_stride=4, min_budget=2048, dense_tail=128, fit_blocks=8,
                                    head_scores=True, pooling="mean"),
    # The estimator planner plans use: every query head its own proxy, mean-pooled block mass, a fixed budget of
    # 1/8 of the context (the density does not depend on the text).
    "head_proxy_per_head": Candidate.of("HeadProxy", gamma=1.0, q_stride=4, min_budget=0.125, max_budget=0.125,
                                        head_scores=True, pooling="mean"),
    # MInference's estimate from the last 64 queries; the published 1000 / 6096 keep everything below ~8k tokens,
    # so the harness uses the budget the estimator tests use at 2-8k.
    "vertical_slash": Candidate.of("VerticalSlash", vertical=128, slash=512, last_q=64),
    # Static sink + window (StreamingLLM): cheap, blind to content (misses what lies outside the window).
    "a_shape": Candidate.of("AShape", sink_tokens=64, local_tokens=512),
}

#: Methods compared by default (dense_kernel is opt-in: it measures overhead, not a trade-off).
DEFAULT_METHODS = ("dense", "head_proxy", "vertical_slash", "a_shape")

_RUNTIME_FIELDS = {"scores", "stats", "backend"}


def resolve(names: str | list[str] | tuple[str, ...]) -> dict[str, Candidate]:
    """``"dense,a_shape"`` or a list of names -> {name: Candidate}; ValueError naming unknown methods."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PREFILL_METHODS))
    if unknown or not names:
        raise ValueError(f"methods: unknown {unknown or 'empty list'}; known: {sorted(PREFILL_METHODS)}")
    return {name: PREFILL_METHODS[name] for name in names}


def vllm_options(candidate: Candidate) -> tuple[dict | None, str | None]:
    """``({"pattern": vllm_name, **params}, None)`` for the vLLM backend's options, or ``(None, reason)`` when the
    backend's option parser does not know this pattern (the vLLM backend lists its own pattern names)."""
    from sparse_attn.vllm.config import PATTERNS, SparseAttnConfigError, build_pattern

    pattern = candidate.build()
    name = next((n for n, cls in PATTERNS.items() if cls is type(pattern)), None)
    if name is None:
        return None, f"the vLLM backend has no {type(pattern).__name__} option (known: {sorted(PATTERNS)})"
    params = {f.name: getattr(pattern, f.name) for f in dataclasses.fields(pattern) if f.name not in _RUNTIME_FIELDS}
    spec = {"pattern": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}}
    try:
        build_pattern(spec, "method")
    except SparseAttnConfigError as error:
        return None, str(error)
    return spec, None
