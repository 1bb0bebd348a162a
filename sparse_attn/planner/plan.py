"""Per-head attention plans: which pattern each (layer, head) runs, saved as versioned JSON (docs/PLAN_FORMAT.md).

A plan records the model it was made for (id and head counts) and is checked against the model it is applied to.
:meth:`Plan.to_patterns` turns it into one :class:`sparse_attn.Pattern` per layer, the form
:class:`sparse_attn.SparseAttention`, :func:`sparse_attn.configure` and the vLLM backend consume.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .._validate import MAX_BLOCK_SIZE, MAX_COUNT, check_int, shown
from ..patterns import AShape, Dense, ElasticSpan, HeadProxy, Pattern, PerHead, Strided, TopKBlocks, VerticalSlash

__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "PATTERNS", "MAX_FILE_BYTES", "ModelShape", "HeadSetting", "Plan",
           "load_plan", "build_pattern", "PlanError", "tensor_parallel_heads", "read_bounded"]

PLAN_FORMAT = "sparse-attn-plan"
PLAN_VERSION = 1
#: Largest plan file (and JSON or torch channels file of the vLLM options) read, in bytes; the size is checked
#: before reading. Plans are kilobytes (a 30-layer model's is about 100 KB).
MAX_FILE_BYTES = 64 << 20

#: Pattern names a plan may use, and the classes they build. Parameters are the classes' constructor arguments.
PATTERNS: dict[str, type[Pattern]] = {
    cls.__name__: cls for cls in (Dense, AShape, ElasticSpan, Strided, VerticalSlash, TopKBlocks, HeadProxy)
}
# Arguments that are runtime objects, never plan parameters.
_RUNTIME_ARGS = {"scores", "stats", "backend"}


class PlanError(ValueError):
    """A plan file or object that is malformed, or made for another model; the message names the field."""


def build_pattern(name: str, params: Mapping[str, Any], where: str = "pattern") -> Pattern:
    """The pattern ``name`` with constructor arguments ``params``; PlanError naming ``where`` when they are wrong."""
    cls = PATTERNS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise PlanError(f"{where}: unknown pattern {name!r}; known patterns: {sorted(PATTERNS)}")
    allowed = {f.name for f in fields(cls)} - _RUNTIME_ARGS
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise PlanError(f"{where}.params: {name} has no parameter(s) {unknown}; it takes {sorted(allowed)}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})
    except (TypeError, ValueError) as error:
        raise PlanError(f"{where}.params: invalid {name} parameters {shown(dict(params), 200)}: {error}") from None


@dataclass(frozen=True)
class ModelShape:
    """What a plan must agree with: attention layers, query heads, KV heads and head size."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_model(cls, model_or_config) -> "ModelShape":
        """From a transformers model or config (``num_hidden_layers``, ``num_attention_heads``, ...), or from any
        object with this class's field names (e.g. an adapter around a vLLM model config)."""
        config = getattr(model_or_config, "config", model_or_config)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if all(hasattr(config, f.name) for f in fields(cls)):
            return cls(*(int(getattr(config, f.name)) for f in fields(cls)))
        try:
            heads = int(config.num_attention_heads)
            kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            return cls(int(config.num_hidden_layers), heads, kv_heads, int(head_dim))
        except AttributeError as error:
            raise PlanError(f"cannot read the attention shape of {type(config).__name__}: {error}") from None


@dataclass(frozen=True)
class HeadSetting:
    """One head's choice: a pattern name and its parameters, with what calibration measured for it."""

    pattern: str
    params: dict = field(default_factory=dict)
    density: float | None = None  # expected fraction of the causal block area read (at the calibration length)
    recall: float | None = None  # expected attention mass kept (1.0 = all of it)
    error: float | None = None  # expected relative error of the head's attention output (0.0 = exact)

    def to_dict(self) -> dict:
        out = {"pattern": self.pattern, "params": dict(self.params)}
        out.update({k: getattr(self, k) for k in ("density", "recall", "error") if getattr(self, k) is not None})
        return out


@dataclass
class Plan:
    """A per-(layer, head) pattern choice for one model (see docs/PLAN_FORMAT.md for the JSON form).

    ``heads[layer][head]`` is a :class:`HeadSetting`. ``budget`` records what the planner aimed for (e.g.
    ``{"target_density": 0.3}``), ``calibration`` how it measured (context length, prompts, ...); both are
    informative, ``to_patterns`` reads only ``heads`` and the block sizes.
    """

    model_id: str
    shape: ModelShape
    heads: list[list[HeadSetting]]
    q_block_size: int = 64
    kv_block_size: int = 64
    budget: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    version: int = PLAN_VERSION
    #: Per layer, None or the decode choice: ``{"double_sparsity": {"r", "budget_fraction", "channels" [Hkv][r],
    #: ...}, "kv_pruning": {"sparsity", ...}}`` (either key optional; other keys are measurements).
    decode: list[dict | None] | None = None
    #: The model's :func:`sparse_attn.planner.shipped.model_fingerprint` (shipped plans carry it; others may not).
    fingerprint: dict | None = None

    def __post_init__(self):
        _check_plan(self)

    # ------------------------------------------------------------------ summaries
    def mean(self, what: str) -> float | None:
        """Average of ``"density"``, ``"recall"`` or ``"error"`` over all heads (None when some head has none)."""
        values = [getattr(s, what) for layer in self.heads for s in layer]
        return None if any(v is None for v in values) else sum(values) / len(values)

    def pattern_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.heads:
            for s in layer:
                counts[s.pattern] = counts.get(s.pattern, 0) + 1
        return counts

    # ------------------------------------------------------------------ use
    def check_model(self, model_or_shape) -> None:
        """Raise PlanError naming each field where the plan and the model disagree."""
        shape = model_or_shape if isinstance(model_or_shape, ModelShape) else ModelShape.from_model(model_or_shape)
        wrong = [f"{f.name}: plan {getattr(self.shape, f.name)}, model {getattr(shape, f.name)}"
                 for f in fields(ModelShape) if getattr(self.shape, f.name) != getattr(shape, f.name)]
        if wrong:
            raise PlanError(f"the plan was made for {self.model_id!r} and does not match this model ("
                            + "; ".join(wrong) + "): calibrate a plan for this model")

    def to_patterns(self) -> dict[int, Pattern]:
        """One pattern per layer: the head's pattern where all heads agree, else a :class:`PerHead`.

        Heads with equal settings share one pattern object (it runs once per layer), and the HeadProxy heads of a
        layer share one HeadProxy with a per-head ``gamma``, so its proxy scores are computed once.
        """
        return {i: _layer_pattern(settings, i) for i, settings in enumerate(self.heads)}

    def double_sparsity(self, layer: int, **overrides):
        """``(DoubleSparsityConfig, channels LongTensor [Hkv, r])`` the plan chose for ``layer``'s decode, or None
        (dense decode). ``overrides`` set the config's other fields (e.g. ``dense_below``, ``label_bits``)."""
        import torch

        from ..decode import DoubleSparsityConfig

        setting = (self.decode[layer] or {}).get("double_sparsity") if self.decode else None
        if setting is None:
            return None
        config = DoubleSparsityConfig(r=setting["r"], budget_fraction=setting["budget_fraction"], **overrides)
        return config, torch.tensor(setting["channels"], dtype=torch.int64)

    def kv_pruning(self, layer: int, **overrides):
        """The ``KVPruningConfig`` the plan chose for ``layer``, or None (KV kept whole)."""
        from ..decode.kv_pruning import KVPruningConfig

        setting = (self.decode[layer] or {}).get("kv_pruning") if self.decode else None
        return None if setting is None else KVPruningConfig(sparsity=setting["sparsity"], **overrides)

    def decode_method(self, layer: int):
        """The decode method the plan gave ``layer`` (:class:`sparse_attn.decode.DoubleSparsity` first, else
        :class:`sparse_attn.decode.KVPruning`), or None (dense decode)."""
        from ..decode import DoubleSparsity, KVPruning

        if (ds := self.double_sparsity(layer)) is not None:
            return DoubleSparsity(*ds)
        pruning = self.kv_pruning(layer)
        return None if pruning is None else KVPruning(pruning)

    def for_tensor_parallel_rank(self, rank: int, size: int) -> "Plan":
        """The part of the plan one tensor-parallel rank runs: its query heads' settings and its KV heads' decode
        channels (:func:`tensor_parallel_heads`), with ``shape`` giving the per-rank head counts."""
        q_heads, kv_heads = tensor_parallel_heads(self.shape.num_heads, self.shape.num_kv_heads, rank, size)
        decode = None
        if self.decode is not None:
            decode = []
            for entry in self.decode:
                if entry and "double_sparsity" in entry:
                    ds = dict(entry["double_sparsity"])
                    ds["channels"] = [ds["channels"][h] for h in kv_heads]
                    entry = {**entry, "double_sparsity": ds}
                decode.append(entry)
        return Plan(
            model_id=self.model_id,
            shape=ModelShape(self.shape.num_layers, len(q_heads), len(kv_heads), self.shape.head_dim),
            heads=[[layer[h] for h in q_heads] for layer in self.heads],
            q_block_size=self.q_block_size, kv_block_size=self.kv_block_size, budget=self.budget,
            calibration=self.calibration, version=self.version, decode=decode, fingerprint=self.fingerprint,
        )

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": self.version,
            "model": {"id": self.model_id, **{f.name: getattr(self.shape, f.name) for f in fields(ModelShape)},
                      **({"fingerprint": self.fingerprint} if self.fingerprint else {})},
            "blocks": {"q": self.q_block_size, "kv": self.kv_block_size},
            "budget": self.budget,
            "calibration": self.calibration,
            "summary": {"density": self.mean("density"), "recall": self.mean("recall"), "error": self.mean("error"),
                        "patterns": self.pattern_counts()},
            "layers": [{"heads": [s.to_dict() for s in layer],
                        **({"decode": self.decode[i]} if self.decode and self.decode[i] else {})}
                       for i, layer in enumerate(self.heads)],
        }

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        """Parse and validate; PlanError names the first offending field."""
        _expect(data, dict, "plan")
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(f"format: expected {PLAN_FORMAT!r}, got {data.get('format')!r} (not a sparse-attn plan)")
        version = _get(data, "version", int, "")
        if version > PLAN_VERSION or version < 1:
            raise PlanError(f"version: this sparse-attn reads plan versions 1..{PLAN_VERSION}, the file is version {version}")
        model = _get(data, "model", dict, "")
        shape = ModelShape(*(_get(model, f.name, int, "model.") for f in fields(ModelShape)))
        fingerprint = model.get("fingerprint")
        if fingerprint is not None and (not isinstance(fingerprint, dict)
                                        or not all(isinstance(v, str) for v in fingerprint.values())):
            raise PlanError(f"model.fingerprint: expected an object of strings, got {fingerprint!r}")
        blocks = _get(data, "blocks", dict, "")
        layers = _get(data, "layers", list, "")
        heads, decode = [], []
        for i, layer in enumerate(layers):
            _expect(layer, dict, f"layers[{i}]")
            row = []
            for h, head in enumerate(_get(layer, "heads", list, f"layers[{i}].")):
                where = f"layers[{i}].heads[{h}]"
                _expect(head, dict, where)
                row.append(HeadSetting(
                    _get(head, "pattern", str, where + "."), _get(head, "params", dict, where + "."),
                    _optional_number(head, "density", where, 1.0), _optional_number(head, "recall", where, 1.0),
                    _optional_number(head, "error", where, math.inf),
                ))
            heads.append(row)
            decode.append(layer.get("decode"))
        return cls(
            model_id=_get(model, "id", str, "model."), shape=shape, heads=heads,
            q_block_size=_get(blocks, "q", int, "blocks."), kv_block_size=_get(blocks, "kv", int, "blocks."),
            budget=data.get("budget", {}), calibration=data.get("calibration", {}), version=version,
            decode=decode if any(d is not None for d in decode) else None, fingerprint=fingerprint,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON file (atomically: a crash never leaves a half-written plan under ``path``)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "Plan":
        """Read and validate a plan file; with ``model`` (a model, config or ModelShape) also check it matches."""
        if not os.fspath(path):
            raise PlanError("the plan path is empty: give a plan file")
        path = Path(path)
        try:
            text = read_bounded(path, "plan file").decode("utf-8")
        except FileNotFoundError:
            raise PlanError(f"{path}: plan file not found") from None
        except UnicodeDecodeError:
            raise PlanError(f"{path}: not a plan file (not UTF-8 text; the file is corrupt)") from None
        except OSError as error:
            raise PlanError(f"{path}: cannot read the plan file: {error.strerror or error}") from None
        except ValueError as error:  # a directory, a file too large
            raise PlanError(str(error)) from None
        if not text.strip():
            raise PlanError(f"{path}: the plan file is empty")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            hint = "truncated (it ends inside an unfinished value)" if _ends_open(text) else "corrupt"
            raise PlanError(f"{path}: not valid JSON at line {error.lineno}, column {error.colno} ({error.msg}); "
                            f"the plan file looks {hint}") from None
        except RecursionError:
            raise PlanError(f"{path}: not a plan file (JSON nested too deeply to parse)") from None
        except ValueError as error:  # e.g. an integer beyond Python's digit limit
            raise PlanError(f"{path}: not a plan file (JSON the parser refuses: {error})") from None
        try:
            plan = cls.from_dict(data)
            if model is not None:
                plan.check_model(model)
        except PlanError as error:
            raise PlanError(f"{path}: {error}") from None
        return plan


def read_bounded(path: str | os.PathLike, what: str = "file", limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the file at ``path``, its size checked before reading: ValueError naming the path for a
    directory or a file of more than ``limit`` bytes; OSError (e.g. FileNotFoundError) where it cannot be read."""
    info = os.stat(path)
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path}: a directory, not a {what}")
    too_large = f"{path}: the {what} is too large ({{}} bytes; at most {limit} bytes are read)"
    if info.st_size > limit:
        raise ValueError(too_large.format(info.st_size))
    with open(path, "rb") as f:  # bounded also where the size is not known in advance (pipes, devices)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(too_large.format(f"more than {limit}"))
    return data


def load_plan(path: str | os.PathLike, model=None) -> Plan:
    """:meth:`Plan.load`: read a plan file, validate it and (given ``model``) check it was made for that model."""
    return Plan.load(path, model)


def tensor_parallel_heads(num_heads: int, num_kv_heads: int, rank: int, size: int) -> tuple[range, range]:
    """Global query heads and KV heads held by tensor-parallel ``rank`` of ``size``, as vLLM splits them: equal
    contiguous slices of the query heads (global head ``rank * num_heads // size + h``) and of the KV heads, or, with
    fewer KV heads than ranks, KV head ``rank // (size // num_kv_heads)`` replicated on ``size // num_kv_heads`` ranks."""
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < size:
        raise ValueError(f"rank must be an int in [0, {size}), got {rank!r}")
    if num_heads % size:
        raise ValueError(f"{num_heads} query heads cannot be split over tensor_parallel_size {size}")
    q_per_rank = num_heads // size
    if num_kv_heads >= size:
        if num_kv_heads % size:
            raise ValueError(f"{num_kv_heads} KV heads cannot be split over tensor_parallel_size {size}")
        kv_per_rank = num_kv_heads // size
        kv = range(rank * kv_per_rank, (rank + 1) * kv_per_rank)
    else:
        if size % num_kv_heads:
            raise ValueError(f"{num_kv_heads} KV heads cannot be replicated evenly over tensor_parallel_size {size}")
        head = rank // (size // num_kv_heads)
        kv = range(head, head + 1)
    return range(rank * q_per_rank, (rank + 1) * q_per_rank), kv


#: HeadProxy parameters one shared HeadProxy takes per query head: its heads differ only in their budget rule.
_PER_HEAD = ("gamma", "min_budget", "max_budget")


def _layer_pattern(settings: list[HeadSetting], layer: int) -> Pattern:
    shared: dict[tuple[str, str], Pattern] = {}
    patterns = []
    for h, setting in enumerate(settings):
        params = dict(setting.params)
        if setting.pattern == "HeadProxy":
            # Heads whose settings differ only in their budget rule share one HeadProxy: one estimate per layer.
            params = _estimate_params(params)
        key = (setting.pattern, json.dumps(params, sort_keys=True))
        if key not in shared:
            if setting.pattern == "HeadProxy":
                members = [other.pattern == "HeadProxy" and _estimate_params(other.params) == params for other in settings]
                for name in _PER_HEAD:
                    default = getattr(HeadProxy, name)
                    values = [other.params.get(name, default) for other, m in zip(settings, members) if m]
                    if name == "gamma":  # other heads' entries are unused; 1.0 is a valid filler
                        params[name] = tuple(float(other.params.get(name, default)) if m else 1.0
                                             for other, m in zip(settings, members))
                    elif all(v == values[0] for v in values):
                        params[name] = values[0]
                    else:
                        params[name] = tuple(other.params.get(name, default) if m else values[0]
                                             for other, m in zip(settings, members))
            shared[key] = build_pattern(setting.pattern, params, f"layers[{layer}].heads[{h}]")
        patterns.append(shared[key])
    return patterns[0] if len(shared) == 1 else PerHead(tuple(patterns))


def _estimate_params(params: dict) -> dict:
    return {k: v for k, v in params.items() if k not in _PER_HEAD}


# ---------------------------------------------------------------------------------------------------- validation
def _ends_open(text: str) -> bool:
    """Whether JSON text stops inside a string, object or array: the mark of a file cut short."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
    return in_string or depth > 0


def _expect(value, kind, where: str) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        name = kind.__name__ if isinstance(kind, type) else "number"
        raise PlanError(f"{where}: expected {name}, got {type(value).__name__} {value!r:.60}")


def _check_int(where: str, value, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
    try:
        return check_int(where, value, minimum, maximum)
    except ValueError as error:
        raise PlanError(str(error)) from None


def _get(data: dict, key: str, kind, prefix: str):
    if key not in data:
        raise PlanError(f"{prefix}{key}: missing")
    _expect(data[key], kind, prefix + key)
    return data[key]


def _optional_number(data: dict, key: str, where: str, upper: float) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= upper:
        raise PlanError(f"{where}.{key}: expected a number in [0, {upper}], got {value!r}")
    return float(value)


def _check_plan(plan: Plan) -> None:
    s = plan.shape
    for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
        _check_int(f"model.{name}", getattr(s, name))
    if s.num_heads % s.num_kv_heads:
        raise PlanError(f"model.num_heads: {s.num_heads} is not a multiple of num_kv_heads {s.num_kv_heads}")
    for name in ("q_block_size", "kv_block_size"):
        _check_int(f"blocks.{name.split('_')[0]}", getattr(plan, name), maximum=MAX_BLOCK_SIZE)
    if len(plan.heads) != s.num_layers:
        raise PlanError(f"layers: {len(plan.heads)} entries but model.num_layers is {s.num_layers}")
    if plan.decode is not None:
        if len(plan.decode) != s.num_layers:
            raise PlanError(f"decode: {len(plan.decode)} entries but model.num_layers is {s.num_layers}")
        for i, entry in enumerate(plan.decode):
            _check_decode(entry, f"layers[{i}].decode", s)
    for i, layer in enumerate(plan.heads):
        if len(layer) != s.num_heads:
            raise PlanError(f"layers[{i}].heads: {len(layer)} entries but model.num_heads is {s.num_heads}")
        for h, setting in enumerate(layer):
            where = f"layers[{i}].heads[{h}]"
            if not isinstance(setting.params, Mapping):
                raise PlanError(f"{where}.params: expected object, got {shown(setting.params)}")
            for name, value in setting.params.items():
                if isinstance(value, (list, tuple, dict)) and name not in _RUNTIME_ARGS:  # one head's value
                    raise PlanError(f"{where}.params.{name}: expected one value (this head's), got {shown(value)}; "
                                    "each head of a plan has its own entry in layers[i].heads")
            pattern = build_pattern(setting.pattern, setting.params, where)
            try:
                pattern.check_heads(s.num_heads, s.num_kv_heads)
            except ValueError as error:
                raise PlanError(f"{where}.params: {error} (model.num_kv_heads {s.num_kv_heads}, model.num_heads "
                                f"{s.num_heads})") from None


def _check_decode(entry, where: str, shape: ModelShape) -> None:
    if entry is None:
        return
    _expect(entry, dict, where)
    unknown = sorted(set(entry) - {"double_sparsity", "kv_pruning"})
    if unknown:
        raise PlanError(f"{where}: unknown decode method(s) {unknown}; known: double_sparsity, kv_pruning")
    if "double_sparsity" in entry:
        ds = entry["double_sparsity"]
        prefix = where + ".double_sparsity."
        _expect(ds, dict, where + ".double_sparsity")
        r = _get(ds, "r", int, prefix)
        if not 1 <= r <= shape.head_dim:
            raise PlanError(f"{prefix}r: expected 1..head_dim={shape.head_dim}, got {shown(r)}")
        fraction = _get(ds, "budget_fraction", (int, float), prefix)
        if isinstance(fraction, bool) or not 0 < fraction <= 1:
            raise PlanError(f"{prefix}budget_fraction: expected a number in (0, 1], got {fraction!r}")
        channels = _get(ds, "channels", list, prefix)
        if len(channels) != shape.num_kv_heads:
            raise PlanError(f"{prefix}channels: {len(channels)} rows but model.num_kv_heads is {shape.num_kv_heads}")
        for h, row in enumerate(channels):
            ok = isinstance(row, list) and len(row) == r and len(set(row)) == r and all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c < shape.head_dim for c in row)
            if not ok:
                raise PlanError(f"{prefix}channels[{h}]: expected {r} distinct channel ids in [0, {shape.head_dim}), "
                                f"got {row!r:.80}")
    if "kv_pruning" in entry:
        prune = entry["kv_pruning"]
        _expect(prune, dict, where + ".kv_pruning")
        sparsity = _get(prune, "sparsity", (int, float), where + ".kv_pruning.")
        if isinstance(sparsity, bool) or not 0 <= sparsity < 1:
            raise PlanError(f"{where}.kv_pruning.sparsity: expected a number in [0, 1), got {sparsity!r}")
