"""Options of the vLLM ``sparse`` attention backend, parsed and validated once at start-up.

Two sources, both JSON objects of the same shape: the environment variable ``SPARSE_ATTN_VLLM_CONFIG`` and
``additional_config={"sparse_attn": {...}}`` (``--additional-config`` on the command line); keys given in
``additional_config`` override the same keys from the environment. Example::

    {"prefill": {"pattern": "a_shape", "sink_tokens": 64, "local_tokens": 512},
     "decode": {"pattern": "top_k", "budget_fraction": 0.125},
     "dense_below": 1024, "dense_layers": [0, 1], "block_size": 64}

- ``prefill``: a block pattern name (see ``PATTERNS``) with its keyword arguments, or just the name. Default
  ``head_proxy`` (ProxyAttn: content-aware blocks, per-head budgets reaching 95% of the attention mass, at least
  2048 tokens per query block).
- ``decode``: ``top_k`` (default: the tokens of highest exact q.K score per KV group), ``double_sparsity`` (the same
  selection scored on a label cache of r heavy channels stored in the KV pages; channels from ``plan`` or a
  ``channels`` file), or a block pattern name.
- ``plan``: a planner plan file (``sparse-attn-plan calibrate``): per-layer, per-head prefill patterns and per-layer
  decode (Double Sparsity where the plan chose it, dense elsewhere unless ``decode`` is given).
- ``auto_plan``: without ``plan`` and ``prefill``, a plan shipped with the package that matches the served model
  (:mod:`sparse_attn.planner.shipped`: head counts and configuration fingerprint) is used, and the log says so;
  ``false`` turns that off (default true).
- ``dense_below``: rows whose context (cached plus new tokens) is shorter run dense: one int for both phases, or
  ``{"prefill": n, "decode": m}`` (default: prompt rows from 2048 tokens, decode rows from 4096, as
  ``DoubleSparsityConfig`` decodes in transformers). Below 4k tokens a decode step's KV bytes are a small part of what
  it reads (SmolLM2 at 3k: the cache is a fifth of the weights' bytes), so selecting tokens saves little there and
  risks what it misses: a number copied digit by digit needs the needle's next token each step.
- ``dense_layers``: layer indices that always run dense.
- ``block_size``: query and KV block size of the masks (a power of two in 16..1024: the Triton kernel tiles by it, the
  C++ kernels size their scratch by it).
- ``op_backend``: implementation of the attention ops (``auto``, ``triton``, ``cuda``, ``cpu``, ``reference``).
- ``kv_pruning``: ``{"sparsity": s, "new_tokens": "exact"}``, s in [0, 1): every layer stores each token's K and V per
  KV head pruned to its ``round((1 - s) * D)`` largest-magnitude values plus keep bitmaps, in a smaller KV page, so
  vLLM fits more tokens in the same KV memory (:mod:`sparse_attn.decode.pruned_pages`); attention reads the pruned
  context. ``new_tokens`` says how a step reads its own new tokens: ``"exact"`` (the default) unpruned, so a prompt
  attends to itself exactly (as Mustafar prefills), but a token then attends to an earlier one exactly or pruned
  depending on whether they fell in one step, which chunked prefill, prefix-cache hits and preemption move: answers
  can depend on scheduling. ``"cached"`` reads every token as the page holds it, the step's own too (as vLLM's
  quantized KV caches are read), so answers do not depend on scheduling. Without the option a plan's per-layer
  ``kv_pruning`` entries apply: vLLM gives every layer one page format, so the page is sized by the smallest sparsity
  of any layer (a layer without an entry keeps every value, so then nothing is pruned) and every layer keeps that
  many values. ``dense_layers`` choose attention patterns, not
  storage: their KV is pruned too. ``s = 0`` keeps the dense page, bit for bit.

This module does not import vLLM, so the options can be checked (and tested) without it.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .._validate import MAX_BLOCK_SIZE, check_int, check_real, shown
from ..decode import DoubleSparsityConfig
from ..decode.compressed import check_sparsity
from ..decode.pruned_pages import PrunedSlotFormat
from ..ops import BACKENDS
from ..patterns import AShape, Dense, ElasticSpan, HeadProxy, Pattern, Strided, TopKBlocks, VerticalSlash, default_pattern
from ..planner.plan import ModelShape, Plan, PlanError, load_plan, read_bounded, tensor_parallel_heads
from ..planner.shipped import announce, find_shipped_plan

ENV_VAR = "SPARSE_ATTN_VLLM_CONFIG"
ADDITIONAL_CONFIG_KEY = "sparse_attn"
DEFAULT_DENSE_BELOW = 2048
#: Decode rows (one query token) with a shorter context read every token by default.
DEFAULT_DECODE_DENSE_BELOW = 4096
#: How a step reads its own new tokens with KV pruning (the first is the default).
KV_NEW_TOKENS = ("exact", "cached")

#: Block pattern names accepted in the options, and the keyword arguments each takes (runtime fields are not options).
PATTERNS: dict[str, type[Pattern]] = {
    "dense": Dense,
    "a_shape": AShape,
    "elastic": ElasticSpan,
    "strided": Strided,
    "vertical_slash": VerticalSlash,
    "top_k_blocks": TopKBlocks,
    "head_proxy": HeadProxy,
}
_NOT_OPTIONS = {"scores", "stats", "backend"}
_KEYS = ("prefill", "decode", "plan", "auto_plan", "dense_below", "dense_layers", "block_size", "op_backend",
         "kv_pruning")
CALIBRATE_HINT = (
    "calibrate them with `sparse-attn-plan calibrate --model MODEL --out plan.json` and pass {\"plan\": \"plan.json\"}, "
    "or save sparse_attn.calibrate_double_sparsity(model, tokenizer) with torch.save and pass "
    "{\"decode\": {\"pattern\": \"double_sparsity\", \"channels\": \"channels.pt\"}}"
)


class SparseAttnConfigError(ValueError):
    """An invalid option; the message names the option and where it came from."""


# ---------------------------------------------------------------------------------------------------- decode settings
@dataclass(frozen=True)
class TopKDecode:
    """Decode rows read, per KV group, the ``k`` tokens of highest exact ``q.K`` score (max over the group's query
    heads), sink and recent tokens always among them; ``k = max(min_budget, ceil(budget_fraction * L))`` for a
    context of L tokens (or ``budget``). No calibration; scoring reads every key once, attention only the k tokens."""

    budget_fraction: float = 1 / 8
    min_budget: int = 256
    budget: int | None = None
    sink_tokens: int = 16
    recent_tokens: int = 64

    def __post_init__(self):
        if self.budget_fraction is not None:  # (None: DoubleSparsityDecode's "the plan's")
            check_real("budget_fraction", self.budget_fraction, 0, 1, low_open=True)
        self.config(1)  # DoubleSparsityConfig's range checks

    def config(self, r: int, budget_fraction: float | None = None) -> DoubleSparsityConfig:
        """The selection rule for labels of ``r`` channels. Rows shorter than the backend's ``dense_below`` never
        get here, so the selection itself has no dense threshold."""
        return DoubleSparsityConfig(
            r=r, budget=self.budget, budget_fraction=budget_fraction or self.budget_fraction or 1 / 8,
            min_budget=self.min_budget, sink_tokens=self.sink_tokens, recent_tokens=self.recent_tokens, dense_below=0,
        )


@dataclass(frozen=True)
class DoubleSparsityDecode(TopKDecode):
    """:class:`TopKDecode` scored on labels: each key restricted to its KV head's ``r`` heavy channels, stored next
    to K and V in the KV page. ``channels``: a channels file (None: the plan's); ``r``: keep the first (heaviest)
    ``r`` channels (None: all of them); ``budget_fraction`` None: the plan's per-layer value, else 1/8."""

    budget_fraction: float | None = None
    channels: str | None = None
    r: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.r is not None:
            check_int("r", self.r)
        if self.channels is not None and (not isinstance(self.channels, str) or not self.channels):
            raise ValueError(f"channels must be a file path, got {shown(self.channels)}")


DECODE_METHODS: dict[str, type[TopKDecode]] = {"top_k": TopKDecode, "double_sparsity": DoubleSparsityDecode}
#: ``decode`` when a plan is given without one: each layer follows the plan.
PLAN_DECODE = "plan"


# ---------------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class SparseAttnOptions:
    prefill: Pattern = field(default_factory=default_pattern)
    decode: Pattern | TopKDecode | str = TopKDecode()
    dense_below: int = DEFAULT_DENSE_BELOW
    dense_layers: frozenset[int] = frozenset()
    block_size: int = 64
    op_backend: str | None = None
    plan_path: str | None = None
    #: KV pruning of every layer's page (0: dense pages) and where it came from.
    kv_sparsity: float = 0.0
    kv_pruning_source: str | None = field(default=None, compare=False)
    #: With KV pruning: the step's own new tokens read unpruned ("exact") or as the page holds them ("cached").
    kv_new_tokens: str = KV_NEW_TOKENS[0]
    #: Decode rows (one query token) whose context is shorter run dense (``dense_below`` for prompt rows).
    decode_dense_below: int = DEFAULT_DECODE_DENSE_BELOW
    #: Loaded once; ``channels[layer]`` LongTensor [Hkv (all ranks), r] from a channels file.
    plan: Plan | None = field(default=None, compare=False, repr=False)
    channels: dict[int, torch.Tensor] | None = field(default=None, compare=False, repr=False)
    _per_rank: dict = field(default_factory=dict, compare=False, repr=False)

    def describe(self) -> str:
        decode = self.decode if isinstance(self.decode, (Pattern, TopKDecode)) else "from the plan"
        prefill = f"from plan {self.plan_path}" if self.plan is not None else self.prefill
        text = (f"prefill {prefill}, decode {decode}, dense below {self.dense_below} tokens "
                f"({self.decode_dense_below} for decode rows), "
                f"dense layers {sorted(self.dense_layers)}, block size {self.block_size}")
        if self.kv_sparsity or self.kv_pruning_source:
            text += (f", KV pruning sparsity {self.kv_sparsity:g} ({self.kv_pruning_source}; "
                     f"new tokens {self.kv_new_tokens})")
        return text

    def slot_format(self, head_size: int, dtype: torch.dtype) -> PrunedSlotFormat:
        """How every layer stores K and V of a token and KV head (dense ``K | V`` without KV pruning)."""
        return PrunedSlotFormat.for_sparsity(head_size, self.kv_sparsity, dtype)

    def page_width(self, head_size: int, dtype: torch.dtype) -> int:
        """Values of ``dtype`` per token and KV head in every layer's page: K and V (pruned and packed with KV
        pruning), then the Double Sparsity labels."""
        return self.slot_format(head_size, dtype).width + self.label_width

    def sparse_prefill(self, max_model_len: int) -> bool:
        """Whether any prompt row of a run whose contexts reach ``max_model_len`` tokens can read a sparse mask."""
        if self.dense_below >= max_model_len:
            return False
        if self.plan is None:
            return not isinstance(self.prefill, Dense)
        return any(setting.pattern != "Dense" for layer, settings in enumerate(self.plan.heads)
                   if layer not in self.dense_layers for setting in settings)

    @property
    def label_width(self) -> int:
        """Label channels stored per token and KV head in the KV page (the largest r of any Double Sparsity layer;
        0 without Double Sparsity). Every layer's page has the same width: vLLM gives all layers one page format."""
        widths = [r for r in self._ds_r_per_layer().values() if r]
        return max(widths, default=0)

    def _ds_r_per_layer(self) -> dict[int, int]:
        """{layer: r} of the layers whose decode is Double Sparsity (all layers the plan or channels file lists)."""
        if isinstance(self.decode, DoubleSparsityDecode):
            if self.channels is not None:
                return {i: self.decode.r or c.shape[1] for i, c in self.channels.items()}
            return {i: self.decode.r or ds["r"] for i, ds in _plan_double_sparsity(self.plan).items()}
        if self.decode == PLAN_DECODE:
            return {i: ds["r"] for i, ds in _plan_double_sparsity(self.plan).items()}
        return {}

    def layer_settings(self, layer: int | None, num_heads: int, tp_rank: int = 0, tp_size: int = 1):
        """(prefill Pattern, decode) of one layer on one tensor-parallel rank holding ``num_heads`` query heads.

        decode is a Pattern (block-mask decode) or ``(DoubleSparsityConfig, channels)`` (token selection) with
        channels LongTensor ``[KV heads of this rank, r]``, or None for exact q.K scores (r = the head size).
        """
        if layer is not None and layer in self.dense_layers:
            return Dense(), Dense()
        plan, patterns = self._rank_plan(tp_rank, tp_size)
        if plan is None:
            prefill = self.prefill
        else:
            prefill = patterns[layer] if layer is not None else Dense()
        decode = self.decode
        if not (isinstance(decode, DoubleSparsityDecode) or decode == PLAN_DECODE):
            return prefill, ((decode.config(1), None) if isinstance(decode, TopKDecode) else decode)
        if layer is None:
            return prefill, Dense()
        if self.channels is not None:
            if layer not in self.channels:
                raise SparseAttnConfigError(f"sparse_attn option decode.channels ({self.decode.channels}): no "
                                            f"channels for layer {layer}: calibrate channels for this model")
            rows = self.channels[layer]
            _, kv_heads = tensor_parallel_heads(num_heads * tp_size, rows.shape[0], tp_rank, tp_size)
            setting = {"channels": rows[kv_heads.start : kv_heads.stop], "budget_fraction": None}
        else:
            setting = _plan_double_sparsity(plan).get(layer)
        if setting is None:
            return prefill, Dense()  # the plan keeps this layer's decode dense
        method = decode if isinstance(decode, DoubleSparsityDecode) else DoubleSparsityDecode()
        channels = torch.as_tensor(setting["channels"], dtype=torch.int64)
        r = method.r or channels.shape[1]
        return prefill, (method.config(r, method.budget_fraction or setting.get("budget_fraction")), channels[:, :r])

    def _rank_plan(self, tp_rank: int, tp_size: int):
        """(the plan's part for this rank, its per-layer patterns), computed once per rank."""
        if self.plan is None:
            return None, None
        key = (tp_rank, tp_size)
        if key not in self._per_rank:
            plan = self.plan if tp_size == 1 else self.plan.for_tensor_parallel_rank(tp_rank, tp_size)
            self._per_rank[key] = (plan, plan.to_patterns())
        return self._per_rank[key]

    def check_model(self, shape: ModelShape) -> None:
        """Raise SparseAttnConfigError where the plan or the channels file does not fit the served model."""
        if self.plan is not None:
            try:
                self.plan.check_model(shape)
            except PlanError as error:
                raise SparseAttnConfigError(f"sparse_attn option plan ({self.plan_path}): {error}") from None
        if self.channels is not None:
            where = f"sparse_attn option decode.channels ({self.decode.channels})"
            missing = sorted(set(range(shape.num_layers)) - set(self.channels) - set(self.dense_layers))
            if missing:
                raise SparseAttnConfigError(f"{where}: no channels for layers {missing} of the model's "
                                            f"{shape.num_layers}: calibrate channels for this model")
            for layer, rows in sorted(self.channels.items()):
                if rows.shape[0] != shape.num_kv_heads or int(rows.max()) >= shape.head_dim:
                    raise SparseAttnConfigError(
                        f"{where}: layer {layer} has channels for {rows.shape[0]} KV heads with ids up to "
                        f"{int(rows.max())}, the model has {shape.num_kv_heads} KV heads of size {shape.head_dim}: "
                        "calibrate channels for this model")
        bad = sorted(i for i in self.dense_layers if i >= shape.num_layers)
        if bad:
            raise SparseAttnConfigError(f"sparse_attn option dense_layers: {bad} out of range (the model has "
                                        f"{shape.num_layers} layers)")
        for name, pattern in (("prefill", self.prefill), ("decode", self.decode)):
            if isinstance(pattern, Pattern):
                try:
                    pattern.check_heads(shape.num_heads, shape.num_kv_heads)
                except ValueError as error:
                    raise SparseAttnConfigError(
                        f"sparse_attn option {name}: {error} (the model has {shape.num_heads} query heads and "
                        f"{shape.num_kv_heads} KV heads)") from None


def _plan_double_sparsity(plan: Plan | None) -> dict[int, dict]:
    """{layer: the plan's double_sparsity entry} for the layers where the plan chose it."""
    if plan is None or plan.decode is None:
        return {}
    return {i: entry["double_sparsity"] for i, entry in enumerate(plan.decode) if entry and "double_sparsity" in entry}


# ---------------------------------------------------------------------------------------------------- parsing
def _option_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in _NOT_OPTIONS]


def _split_spec(spec: Any, where: str) -> tuple[str, dict]:
    if isinstance(spec, str):
        spec = {"pattern": spec}
    if not isinstance(spec, Mapping) or "pattern" not in spec:
        raise SparseAttnConfigError(f"{where} must be a pattern name or an object with a 'pattern' key, got {spec!r}")
    kwargs = dict(spec)
    return kwargs.pop("pattern"), kwargs


def _construct(cls: type, name: str, kwargs: dict, where: str):
    allowed = _option_names(cls)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise SparseAttnConfigError(f"{where}: pattern {name!r} takes {allowed or 'no options'}, got unknown {unknown}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
    except (TypeError, ValueError) as e:  # the pattern's own range checks
        raise SparseAttnConfigError(f"{where}: {e}") from None


def build_pattern(spec: Any, where: str) -> Pattern:
    """A block pattern from ``"name"`` or ``{"pattern": "name", **kwargs}``."""
    name, kwargs = _split_spec(spec, where)
    if not isinstance(name, str) or name not in PATTERNS:
        raise SparseAttnConfigError(f"{where}.pattern: unknown pattern {name!r}; choose one of {sorted(PATTERNS)}")
    return _construct(PATTERNS[name], name, kwargs, where)


def build_decode(spec: Any, where: str) -> Pattern | TopKDecode:
    """A decode setting: ``top_k`` / ``double_sparsity`` (token selection) or a block pattern."""
    name, kwargs = _split_spec(spec, where)
    if isinstance(name, str) and name in DECODE_METHODS:
        return _construct(DECODE_METHODS[name], name, kwargs, where)
    if not isinstance(name, str) or name not in PATTERNS:
        raise SparseAttnConfigError(
            f"{where}.pattern: unknown decode {name!r}; choose one of {sorted(DECODE_METHODS) + sorted(PATTERNS)}")
    return _construct(PATTERNS[name], name, kwargs, where)


def _non_negative_int(value: Any, where: str) -> int:
    try:
        return check_int(where, value, 0)
    except ValueError as e:
        raise SparseAttnConfigError(str(e)) from None


def _block_size(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
        raise SparseAttnConfigError(f"{where} must be a power of two >= 16, got {shown(value)}")
    if value > MAX_BLOCK_SIZE:
        raise SparseAttnConfigError(f"{where} must be a power of two in [16, {MAX_BLOCK_SIZE}], got {shown(value)}")
    return value


@functools.lru_cache(maxsize=8)
def _load_plan(path: str, stamp: tuple) -> Plan:
    return load_plan(path)


@functools.lru_cache(maxsize=8)
def _load_channels(path: str, stamp: tuple) -> dict[int, torch.Tensor]:
    """A channels file: ``torch.save`` of ``{layer: LongTensor [Hkv, r]}`` (what
    :func:`sparse_attn.calibrate_double_sparsity` returns), or JSON ``{"layer": [[channel, ...] per KV head]}``."""
    data = read_bounded(path, "channels file")
    if path.endswith(".json"):
        raw = json.loads(data.decode("utf-8"))
    else:
        raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError("expected a non-empty mapping {layer: channels [Hkv, r]}")
    channels = {}
    for layer, rows in raw.items():
        rows = torch.as_tensor(rows)
        if rows.dim() != 2 or 0 in rows.shape or rows.is_floating_point() or rows.is_complex() or int(rows.min()) < 0:
            raise ValueError(f"layer {layer}: expected non-negative integer channel ids [Hkv, r], got {rows.dtype} "
                             f"{tuple(rows.shape)}")
        if any(len(set(row)) != len(row) for row in rows.tolist()):
            raise ValueError(f"layer {layer}: a KV head lists a channel twice")
        channels[int(layer)] = rows.long()
    if len({c.shape[1] for c in channels.values()}) != 1:
        raise ValueError("every layer must list the same number of channels r")
    return channels


def _file_stamp(path: str, where: str) -> tuple:
    try:
        info = os.stat(path)
    except OSError as e:
        raise SparseAttnConfigError(f"{where}: cannot read {path!r}: {e.strerror}") from None
    return info.st_mtime_ns, info.st_size


def parse_options(raw: Mapping[str, Any] | None, source: str = "options") -> SparseAttnOptions:
    """Validate a JSON-like mapping into :class:`SparseAttnOptions` (loading the plan or channels file it names);
    errors name the option and ``source``."""
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise SparseAttnConfigError(f"sparse_attn options ({source}) must be a JSON object, got {type(raw).__name__}")
    where = f"sparse_attn options ({source})"
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise SparseAttnConfigError(f"{where}: unknown option(s) {unknown}; known: {list(_KEYS)}")
    if not isinstance(raw.get("auto_plan", True), bool):
        raise SparseAttnConfigError(f"{where}: auto_plan must be true or false, got {raw['auto_plan']!r}")

    plan = plan_path = None
    if raw.get("plan") is not None:
        plan_path = raw["plan"]
        if not isinstance(plan_path, str) or not plan_path:
            raise SparseAttnConfigError(f"{where}: plan must be a file path, got {shown(plan_path)}")
        plan_path = os.path.abspath(os.path.expanduser(plan_path))
        try:
            plan = _load_plan(plan_path, _file_stamp(plan_path, f"{where}: plan"))
        except PlanError as e:
            raise SparseAttnConfigError(f"{where}: plan: {e}") from None
        if "prefill" in raw:
            raise SparseAttnConfigError(f"{where}: give either plan or prefill: the plan sets every layer's prefill "
                                        "patterns")
        if plan.q_block_size != plan.kv_block_size:
            raise SparseAttnConfigError(f"{where}: plan: blocks.q ({plan.q_block_size}) and blocks.kv "
                                        f"({plan.kv_block_size}) differ; the backend uses one block size")

    prefill = build_pattern(raw["prefill"], f"{where}: prefill") if "prefill" in raw else default_pattern()
    if "decode" in raw:
        decode = build_decode(raw["decode"], f"{where}: decode")
    else:
        decode = PLAN_DECODE if plan is not None else TopKDecode()

    channels = None
    if isinstance(decode, DoubleSparsityDecode):
        if decode.channels is not None:
            path = os.path.abspath(os.path.expanduser(decode.channels))
            try:
                channels = _load_channels(path, _file_stamp(path, f"{where}: decode.channels"))
            except SparseAttnConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
                raise SparseAttnConfigError(f"{where}: decode.channels: {path} is not a channels file: {e}") from None
            if decode.r is not None and decode.r > next(iter(channels.values())).shape[1]:
                raise SparseAttnConfigError(f"{where}: decode.r={decode.r} exceeds the {next(iter(channels.values())).shape[1]} "
                                            "channels per KV head in the channels file")
        elif not _plan_double_sparsity(plan):
            source_of = "the plan has no Double Sparsity layer" if plan is not None else "no plan or channels file"
            raise SparseAttnConfigError(f"{where}: decode 'double_sparsity' needs heavy channels ({source_of}): "
                                        + CALIBRATE_HINT)
        elif decode.r is not None and decode.r > min(ds["r"] for ds in _plan_double_sparsity(plan).values()):
            raise SparseAttnConfigError(f"{where}: decode.r={decode.r} exceeds the plan's r of some layer")

    dense_below, decode_dense_below = _dense_below(raw, where)
    layers = raw.get("dense_layers", [])
    if not isinstance(layers, (list, tuple)):
        raise SparseAttnConfigError(f"{where}: dense_layers must be a list of layer indices, got {layers!r}")
    dense_layers = frozenset(_non_negative_int(i, f"{where}: dense_layers[{n}]") for n, i in enumerate(layers))
    if plan is not None:
        plan_blocks = _block_size(plan.q_block_size, f"{where}: plan: blocks.q")
        if raw.get("block_size", plan_blocks) != plan_blocks:
            raise SparseAttnConfigError(f"{where}: block_size {raw['block_size']} differs from the plan's block size "
                                        f"{plan_blocks}")
    block_size = _block_size(raw.get("block_size", 64 if plan is None else plan.q_block_size), f"{where}: block_size")
    op_backend = raw.get("op_backend")
    if op_backend is not None and op_backend not in BACKENDS + ("auto",):
        raise SparseAttnConfigError(f"{where}: op_backend must be one of {('auto',) + BACKENDS}, got {op_backend!r}")
    kv_sparsity, kv_source = _kv_pruning(raw.get("kv_pruning"), plan, where)
    kv_new_tokens = (raw.get("kv_pruning") or {}).get("new_tokens", KV_NEW_TOKENS[0])  # checked by _kv_pruning
    return SparseAttnOptions(prefill, decode, dense_below, dense_layers, block_size, op_backend, plan_path,
                             kv_sparsity=kv_sparsity, kv_pruning_source=kv_source, kv_new_tokens=kv_new_tokens,
                             decode_dense_below=decode_dense_below, plan=plan, channels=channels)


def _dense_below(raw: Mapping[str, Any], where: str) -> tuple[int, int]:
    """(prompt rows', decode rows') dense threshold from the ``dense_below`` option: absent (the defaults), one int
    for both, or ``{"prefill": n, "decode": m}`` (a missing key keeps its default)."""
    if "dense_below" not in raw:
        return DEFAULT_DENSE_BELOW, DEFAULT_DECODE_DENSE_BELOW
    spec = raw["dense_below"]
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"prefill", "decode"})
        if unknown:
            raise SparseAttnConfigError(f"{where}: dense_below: unknown keys {unknown} (expected prefill, decode)")
        return (_non_negative_int(spec.get("prefill", DEFAULT_DENSE_BELOW), f"{where}: dense_below.prefill"),
                _non_negative_int(spec.get("decode", DEFAULT_DECODE_DENSE_BELOW), f"{where}: dense_below.decode"))
    value = _non_negative_int(spec, f"{where}: dense_below")
    return value, value


def _kv_pruning(spec: Any, plan: Plan | None, where: str) -> tuple[float, str | None]:
    """(sparsity of every layer's page, a description of where it came from) from the ``kv_pruning`` option (its
    ``new_tokens`` checked too), else from the plan's per-layer entries: the smallest sparsity of any layer, since all
    layers share one page format."""
    if spec is not None:
        if not isinstance(spec, Mapping) or "sparsity" not in spec or set(spec) - {"sparsity", "new_tokens"}:
            raise SparseAttnConfigError(
                f"{where}: kv_pruning must be an object {{\"sparsity\": s, \"new_tokens\": \"exact\" or \"cached\"}} "
                f"with s in [0, 1), got {spec!r} (the vLLM pages hold a fixed number of values per token: no dense "
                "recent window or batched compression)")
        new_tokens = spec.get("new_tokens", KV_NEW_TOKENS[0])
        if new_tokens not in KV_NEW_TOKENS:
            raise SparseAttnConfigError(f"{where}: kv_pruning.new_tokens must be one of {KV_NEW_TOKENS}, got "
                                        f"{new_tokens!r}")
        try:
            return check_sparsity(spec["sparsity"]), "the kv_pruning option"
        except ValueError as e:
            raise SparseAttnConfigError(f"{where}: kv_pruning.{e}") from None
    if plan is None or not plan.decode or not any(entry and "kv_pruning" in entry for entry in plan.decode):
        return 0.0, None
    per_layer = [plan.kv_pruning(i) for i in range(len(plan.decode))]
    whole = [i for i, config in enumerate(per_layer) if config is None]
    if whole:
        return 0.0, (f"the plan prunes {len(per_layer) - len(whole)} layers but keeps layers {whole} whole, and all "
                     "layers share one page format: nothing is pruned; pass kv_pruning to prune every layer")
    sparsity = min(config.sparsity for config in per_layer)
    return sparsity, (f"the smallest of the plan's per-layer sparsities "
                      f"{sorted({c.sparsity for c in per_layer})}: every layer keeps that many values")


def merged_raw_options(additional_config: Any) -> tuple[dict[str, Any], str]:
    """``$SPARSE_ATTN_VLLM_CONFIG`` overlaid with ``additional_config['sparse_attn']``, and a name for the source."""
    merged: dict[str, Any] = {}
    sources = []
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            from_env = json.loads(env)
        except RecursionError:
            raise SparseAttnConfigError(f"${ENV_VAR} is not valid JSON: nested too deeply to parse") from None
        except ValueError as e:  # JSONDecodeError, or an integer beyond Python's digit limit
            raise SparseAttnConfigError(f"${ENV_VAR} is not valid JSON: {e}") from None
        if not isinstance(from_env, dict):
            raise SparseAttnConfigError(f"${ENV_VAR} must be a JSON object, got {type(from_env).__name__}")
        merged.update(from_env)
        sources.append(f"${ENV_VAR}")
    if isinstance(additional_config, Mapping) and ADDITIONAL_CONFIG_KEY in additional_config:
        given = additional_config[ADDITIONAL_CONFIG_KEY]
        if not isinstance(given, Mapping):
            raise SparseAttnConfigError(
                f"additional_config['{ADDITIONAL_CONFIG_KEY}'] must be a JSON object, got {type(given).__name__}"
            )
        merged.update(given)
        sources.append(f"additional_config['{ADDITIONAL_CONFIG_KEY}']")
    return merged, " + ".join(sources) or "defaults"


@functools.lru_cache(maxsize=16)
def _parse_cached(raw_json: str, source: str, file_stamps: tuple) -> SparseAttnOptions:
    return parse_options(json.loads(raw_json), source)


def _referenced_files(raw: Mapping[str, Any]) -> tuple:
    """(path, mtime, size) of the plan and channels files the options name: a changed file is parsed again."""
    decode = raw.get("decode")
    paths = [raw.get("plan"), decode.get("channels") if isinstance(decode, Mapping) else None]
    stamps = []
    for path in paths:
        if isinstance(path, str):
            try:
                info = os.stat(os.path.expanduser(path))
                stamps.append((path, info.st_mtime_ns, info.st_size))
            except OSError:
                stamps.append((path, None, None))
    return tuple(stamps)


def options_from_vllm_config(vllm_config: Any) -> SparseAttnOptions:
    """The options of a vLLM run (parsed once per process, option set and file version), checked against its
    model."""
    merged, source = merged_raw_options(getattr(vllm_config, "additional_config", None))
    if isinstance(merged, Mapping) and "plan" not in merged and "prefill" not in merged and merged.get("auto_plan", True):
        hf_config = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
        found = find_shipped_plan(hf_config) if hf_config is not None else None
        if found is not None:  # the shipped plan for this model, as if given
            merged = {**merged, "plan": str(found[0])}
            source = f"{source}; shipped plan {found[0].name}"
            announce(found[0], "the vLLM backend")
    try:
        key = json.dumps(merged, sort_keys=True)
    except (TypeError, ValueError, RecursionError):
        options = parse_options(merged, source)  # not JSON (a Python caller's object): parse without the cache
    else:
        options = _parse_cached(key, source, _referenced_files(merged))
    shape = model_shape(vllm_config)
    if shape is not None:
        options.check_model(shape)
    return options


def model_shape(vllm_config: Any) -> ModelShape | None:
    """The attention shape of the served model (all heads, before tensor parallelism), or None without a model."""
    model_config = getattr(vllm_config, "model_config", None)
    text_config = getattr(model_config, "hf_text_config", None)
    if text_config is None:
        return None
    try:
        return ModelShape.from_model(text_config)
    except (PlanError, TypeError):
        return None
