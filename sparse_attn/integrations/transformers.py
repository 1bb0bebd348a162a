"""Hugging Face transformers (5.x): ``attn_implementation="sparse"``.

Usage::

    import sparse_attn                                    # registers "sparse" with transformers
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sparse")
    sparse_attn.configure(model, sparse_attn.AShape(sink_tokens=64, local_tokens=1024))

Every attention module with a ``layer_idx`` gets its own :class:`SparseAttention` (``module.sparse_attention``);
modules never configured run the content-aware default (head-proxy estimation; dense below 1024 keys). The mask function is transformers' SDPA one, so plain
causal batches arrive with ``attention_mask=None`` and run sparse; batches that need an explicit mask (padding,
packed sequences, chunked prefill over a cache, decode into a static cache) run transformers' dense SDPA with that
mask instead (correct, visibly dense: a warning is logged once).

Sparse decode: ``configure(model, pattern, decode=DoubleSparsity(...) | KVPruning(...))`` gives every layer's
SparseAttention a decode method; its label cache / compressed cache lives on that module beside transformers' KV
cache (a DynamicCache layer holds only keys and values) and follows it by position, resetting on a new prompt
(:mod:`sparse_attn.decode.methods`). :func:`reset_decode_state` frees it; :func:`calibrate_double_sparsity` ranks
each layer's heavy channels on a calibration text. ``configure`` also makes ``model.generate`` keep the KV cache in an
:class:`sparse_attn.InPlaceCache` (:mod:`sparse_attn.integrations.cache`): appended in place, not concatenated.

transformers is imported on first use, so this module (and ``sparse_attn.configure``) imports without it.
"""

from __future__ import annotations

import logging
import os

import torch

from ..decode.methods import DecodeMethod, DoubleSparsity
from ..modules import SparseAttention
from ..patterns import Pattern, default_pattern
from ..planner.shipped import AUTO_PLAN_ENV, announce, find_shipped_plan

__all__ = ["IMPLEMENTATION", "register", "configure", "sparse_attention_forward", "attention_modules",
           "reset_decode_state", "calibrate_double_sparsity"]

IMPLEMENTATION = "sparse"
logger = logging.getLogger(__name__)
_default_attention = SparseAttention(default_pattern())  # unconfigured layers: content-aware, dense when short
_warned_dense_fallback = False


def register() -> None:
    """Make ``attn_implementation="sparse"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if IMPLEMENTATION not in AttentionInterface().valid_keys():  # keep a registration (or a wrapper of it) in place
        AttentionInterface.register(IMPLEMENTATION, sparse_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def sparse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query ``[B, Hq, S, D]``, key/value ``[B, Hkv, Skv, D]`` ->
    (``[B, S, Hq, D]`` contiguous, None). Inference only."""
    if dropout > 0 and module.training:
        raise ValueError(f"dropout={dropout}: sparse attention is for inference; call model.eval() first")
    if kwargs.get("softcap") is not None:
        raise ValueError("softcap is not supported by sparse attention")
    is_causal = kwargs.pop("is_causal", None)
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if attention_mask is not None or kwargs.get("cache") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _warn_dense_fallback()
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    if is_causal and 1 < q_len < kv_len:
        # transformers drops the mask with more keys than queries only for a prefill into an empty static cache:
        # the queries are the first positions and the keys past them are unwritten slots.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    attention = getattr(module, "sparse_attention", None) or _unconfigured_attention(module)
    out = attention(query, key, value, is_causal=is_causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _unconfigured_attention(module: torch.nn.Module) -> SparseAttention:
    """A layer never configured: its layer of the shipped plan matching the model (set on the module, once), else the
    content-aware default. ``SPARSE_ATTN_AUTO_PLAN=0`` keeps the default."""
    config, layer = getattr(module, "config", None), getattr(module, "layer_idx", None)
    if config is None or not isinstance(layer, int) or os.environ.get(AUTO_PLAN_ENV, "1") == "0":
        return _default_attention
    found = find_shipped_plan(config)
    if found is None or not 0 <= layer < found[1].shape.num_layers:
        return _default_attention
    announce(found[0], 'attn_implementation="sparse"')
    module.sparse_attention = SparseAttention.from_plan(found[1], layer)
    return module.sparse_attention


def _warn_dense_fallback() -> None:
    global _warned_dense_fallback
    if not _warned_dense_fallback:
        _warned_dense_fallback = True
        logger.warning(
            "sparse_attn: this batch needs an explicit attention mask (padding, packed sequences, chunked prefill, "
            "static caches); it runs dense SDPA, sparse attention is not applied to it"
        )


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The model's self-attention modules by layer index (modules named ``*Attention`` with an int ``layer_idx``)."""
    found = {}
    for module in model.modules():
        if isinstance(getattr(module, "layer_idx", None), int) and type(module).__name__.endswith("Attention"):
            found.setdefault(module.layer_idx, module)
    return found


def configure(
    model: torch.nn.Module,
    pattern: Pattern | None = None,
    *,
    layers: dict[int, Pattern] | None = None,
    q_block_size: int = 64,
    kv_block_size: int = 64,
    dense_below: int = 1024,
    backend: str | None = None,
    decode: DecodeMethod | None = None,
    plan=None,
    skip_mass: float = 0.0,
    auto_plan: bool = True,
    in_place_cache: bool = True,
) -> torch.nn.Module:
    """Switch ``model`` to sparse attention: ``layers[i]`` for layer i when given, else ``pattern``, else the
    content-aware default (:func:`sparse_attn.patterns.default_pattern`).

    ``decode`` (``DoubleSparsity`` with per-layer channels ``{layer: [Hkv, r]}`` from
    :func:`calibrate_double_sparsity`, or ``KVPruning``) handles the one-query decode steps of every layer.
    ``plan`` (a :class:`sparse_attn.planner.Plan` or the path of a plan file, checked against the model) gives
    every layer its per-head prefill patterns, block sizes and decode method (Double Sparsity or KV pruning where
    the plan chose them); it excludes ``pattern``, ``layers`` and ``decode``. Without any of the four, a plan shipped
    with the package that matches the model (:mod:`sparse_attn.planner.shipped`) is used and the log says so;
    ``auto_plan=False`` keeps the content-aware default instead. ``skip_mass`` turns on softmax
    thresholding in the kernel (see :class:`sparse_attn.SparseAttention`). With ``in_place_cache`` (the default),
    ``model.generate`` without a cache of the caller's makes an :class:`sparse_attn.InPlaceCache` where it would make a
    ``DynamicCache`` (same contents, no per-step concatenation of the whole cache). Returns the model (changed in
    place).
    """
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"model: {type(model).__name__} has no attention module with a layer_idx to configure")
    plan_decode: dict = {}
    if plan is None and pattern is None and not layers and decode is None and auto_plan:
        found = find_shipped_plan(model)
        if found is not None:
            plan = found[1]
            announce(found[0], f"configure({type(model).__name__})")
    if plan is not None:
        given = [name for name, value in (("pattern", pattern), ("layers", layers), ("decode", decode)) if value]
        if given:
            raise ValueError(f"plan: give either a plan or {', '.join(given)}, not both")
        plan = _load_plan(plan, model)
        layers = plan.to_patterns()
        plan_decode = {i: m for i in range(plan.shape.num_layers) if (m := plan.decode_method(i)) is not None}
        q_block_size, kv_block_size = plan.q_block_size, plan.kv_block_size
    layers = dict(layers or {})
    unknown = sorted(set(layers) - set(modules))
    if unknown:
        raise ValueError(f"layers: keys {unknown} are not layer indices of this model (0..{max(modules)})")
    for name, value in [("pattern", pattern)] + [(f"layers[{i}]", p) for i, p in layers.items()]:
        if value is not None and not isinstance(value, Pattern):
            raise ValueError(f"{name} must be a sparse_attn Pattern, got {type(value).__name__}")
    if decode is not None and not isinstance(decode, DecodeMethod):
        raise ValueError(f"decode must be None, DoubleSparsity or KVPruning, got {type(decode).__name__}")
    if isinstance(decode, DoubleSparsity) and not decode.per_layer and len(modules) > 1:
        raise ValueError("decode: DoubleSparsity needs per-layer channels {layer: [Hkv, r]} for a model "
                         "(see calibrate_double_sparsity)")
    layer_decode = {idx: decode.for_layer(idx) for idx in modules} if decode is not None else plan_decode
    for idx, method in layer_decode.items():
        head_dim = getattr(modules[idx], "head_dim", None)
        if isinstance(head_dim, int):
            method.check_head_dim(head_dim)
    register()
    for idx, module in modules.items():
        chosen = layers.get(idx, pattern)
        module.sparse_attention = SparseAttention(
            chosen if chosen is not None else default_pattern(), q_block_size=q_block_size, kv_block_size=kv_block_size,
            dense_below=dense_below, backend=backend, decode=layer_decode.get(idx), skip_mass=skip_mass,
        )
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(IMPLEMENTATION)
    else:
        model.config._attn_implementation = IMPLEMENTATION
    _generate_with_in_place_cache(model, in_place_cache)
    return model


def _generate_with_in_place_cache(model: torch.nn.Module, enabled: bool) -> None:
    """Make ``model.generate`` create an :class:`InPlaceCache` where it would create its default ``DynamicCache`` (a
    cache the caller passes, or another ``cache_implementation``, is left alone); ``enabled=False`` undoes it."""
    prepare = getattr(type(model), "_prepare_cache_for_generation", None)
    if prepare is None:  # not a transformers generation model
        return
    if not enabled:
        model.__dict__.pop("_prepare_cache_for_generation", None)
        return
    from transformers import DynamicCache

    from .cache import InPlaceCache

    def prepare_in_place(generation_config, model_kwargs, *args, **kwargs):
        result = prepare(model, generation_config, model_kwargs, *args, **kwargs)
        made = model_kwargs.get("past_key_values")
        if type(made) is DynamicCache and not getattr(made, "_is_user_defined", False) and not made.offloading:
            model_kwargs["past_key_values"] = InPlaceCache(model.config.get_text_config(decoder=True))
        return result

    model._prepare_cache_for_generation = prepare_in_place


def _load_plan(plan, model):
    from ..planner import Plan, load_plan

    if isinstance(plan, Plan):
        plan.check_model(model)
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return load_plan(plan, model)
    raise ValueError(f"plan must be a sparse_attn.planner.Plan or a path to a plan file, got {type(plan).__name__}")


def reset_decode_state(model: torch.nn.Module) -> None:
    """Drop every layer's decode state (label / compressed cache). A new prompt resets it anyway (its prefill
    does not continue the absorbed context); call this to free the memory after generation."""
    for module in attention_modules(model).values():
        attention = getattr(module, "sparse_attention", None)
        if attention is not None:
            attention.reset_decode_state()


@torch.no_grad()
def calibrate_double_sparsity(model: torch.nn.Module, tokenizer_or_input_ids, *, r: int = 16, mode: str = "qk",
                              tokens: int = 2048) -> dict[int, torch.Tensor]:
    """Double Sparsity's heavy channels of every layer, ``{layer: LongTensor [Hkv, r]}``, ranked on the post-RoPE
    q/k of one calibration sequence (:func:`sparse_attn.decode.calibrate_heavy_channels`).

    ``tokenizer_or_input_ids``: token ids ``[S]`` / ``[1, S]`` to calibrate on, or a tokenizer, which tokenizes
    ``tokens`` tokens of the licence texts found on the machine (``default_calibration_texts``): calibration text
    never comes from the prompts being evaluated.
    """
    from ..decode import calibrate_heavy_channels
    from ..planner.calibrate import calibration_prompts, default_calibration_texts, recording_qk

    if isinstance(tokenizer_or_input_ids, torch.Tensor):
        ids = tokenizer_or_input_ids.reshape(-1)
        if ids.numel() == 0 or ids.is_floating_point():
            raise ValueError(f"tokenizer_or_input_ids: token ids must be a non-empty integer tensor, got {ids.dtype} {tuple(ids.shape)}")
    else:
        if not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"tokens must be a positive int, got {tokens!r}")
        ids = calibration_prompts(tokenizer_or_input_ids, default_calibration_texts(), tokens, 1)[0]
    channels: dict[int, torch.Tensor] = {}

    def on_layer(layer, q, k, v, scale):
        q_tokens, k_tokens = q[0].transpose(0, 1), k[0].transpose(0, 1)  # [S, H, D]
        channels[layer] = calibrate_heavy_channels(q_tokens, k_tokens, r, mode).cpu()

    with recording_qk(model, on_layer):
        model(ids[None].to(next(model.parameters()).device), use_cache=False)
    missing = sorted(set(attention_modules(model)) - set(channels))
    if missing:
        raise ValueError(f"model: layers {missing} never reported q/k (not dispatched through AttentionInterface)")
    return channels
