"""Bad plans and bad vLLM options: each gets an error at load (``load_plan`` / ``parse_options`` /
``options_from_vllm_config``) that names the field, never a crash later in a kernel or a raw Python exception.

Plan files: truncated, of another format or version, NaN or negative measurements, out-of-range counts, block sizes
and pattern parameters, per-head lists that do not fit the model, another model's shape, nesting and numbers that
break the JSON parser, a directory, and a file far too large to read (checked without writing or reading it: a sparse
file and a guard on whole-file reads). vLLM options: wrong types, out-of-range and huge numbers, NaN, unknown pattern
names and parameters, for every option of ``sparse_attn/vllm/config.py``, explicitly and drawn at random
(hypothesis; ``SPARSE_ATTN_FUZZ_EXAMPLES`` sets the number of examples, 25 by default).

Inputs the library accepts but should refuse, and errors that do not name the field, are tests marked
``xfail(strict=True)`` (the ``xfail`` helper) whose reason says what happens instead; there are none at present.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sparse_attn.planner.plan import HeadSetting, ModelShape, Plan, PlanError, load_plan
from sparse_attn.vllm.config import (
    DECODE_METHODS,
    PATTERNS,
    SparseAttnConfigError,
    _option_names,
    options_from_vllm_config,
    parse_options,
)
from backends import set_field

EXAMPLES = int(os.environ.get("SPARSE_ATTN_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SHAPE = ModelShape(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
BEYOND_INT64 = 2 ** 64  # a JSON integer Python parses but torch cannot hold


def xfail(*args, reason):
    return pytest.param(*args, marks=pytest.mark.xfail(strict=True, reason=reason))


# ---------------------------------------------------------------------------------------------------- plan files
def plan_data() -> dict:
    """A valid plan for SHAPE, as the JSON object ``Plan.save`` writes."""
    heads = [
        [HeadSetting("HeadProxy", {"gamma": 0.9, "min_budget": 32}, 0.3, 0.95, 0.1),
         HeadSetting("AShape", {"sink_tokens": 16, "local_tokens": 32}, 0.2, 0.9),
         HeadSetting("VerticalSlash", {"vertical": 8, "slash": 16, "last_q": 16}, 0.5, 0.99),
         HeadSetting("Dense", {}, 1.0, 1.0)],
        [HeadSetting("ElasticSpan", {"alpha": 32, "beta": 0.5}), HeadSetting("Strided", {"stride": 2}),
         HeadSetting("TopKBlocks", {"k": 2}), HeadSetting("Dense", {})],
    ]
    decode = [{"double_sparsity": {"r": 4, "budget_fraction": 0.125, "channels": [[3, 1, 0, 7], [15, 2, 9, 4]]},
               "kv_pruning": {"sparsity": 0.5}}, None]
    return Plan("tiny-model", SHAPE, heads, 16, 16, {"target_density": 0.5}, {"prompts": 1}, decode=decode).to_dict()


def write(tmp_path: pathlib.Path, data=None, *, text: str | None = None, name: str = "plan.json") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if text is None else text)  # json.dumps writes NaN / Infinity as given
    return path


def changed(path: tuple, value) -> dict:
    """plan_data() with the field at ``path`` set to ``value`` (deleted for KeyError)."""
    return set_field(plan_data(), path, value)


def load_fails(path: pathlib.Path, *fields: str, model=None) -> str:
    """load_plan(path) raises PlanError naming every one of ``fields`` (and the file, for errors of the file itself);
    the vLLM option ``plan`` naming the file raises SparseAttnConfigError naming the option, the file and the
    fields. Returns the plan error."""
    with pytest.raises(PlanError) as error:
        load_plan(path, model)
    message = str(error.value)
    assert model is not None or str(path) in message, message
    for field in fields:
        assert field in message, f"{field!r} not in {message!r}"
    if model is None:
        with pytest.raises(SparseAttnConfigError) as option_error:
            parse_options({"plan": str(path)}, source="test")
        option_message = str(option_error.value)
        assert "(test): plan" in option_message and str(path) in option_message, option_message
        for field in fields:
            assert field in option_message, f"{field!r} not in {option_message!r}"
    return message


def test_the_valid_plans_load(tmp_path):
    """The baseline the other plan tests change one field of, and the plan shipped with the package."""
    from sparse_attn.planner import SMOLLM2_PLAN

    plan = load_plan(write(tmp_path, plan_data()), SHAPE)
    assert plan.shape == SHAPE and set(plan.to_patterns()) == {0, 1}
    assert load_plan(SMOLLM2_PLAN).shape.num_layers == 30
    options = parse_options({"plan": str(tmp_path / "plan.json")}, source="test")
    options.check_model(SHAPE)
    assert options.layer_settings(0, 4)[0].patterns[1].local_tokens == 32


@settings(FUZZ)
@given(cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_plan_files_say_so(tmp_path, cut):
    """Any proper prefix of a plan file: an error naming the file and saying it looks truncated."""
    text = json.dumps(plan_data(), indent=1)
    path = write(tmp_path, text=text[: max(1, int(cut * len(text)))])
    assert "truncated" in load_fails(path)


@pytest.mark.parametrize("value", [0, 2, -1, BEYOND_INT64, "1", 1.0, True, None, KeyError])
def test_other_format_versions(tmp_path, value):
    load_fails(write(tmp_path, changed(("version",), value)), "version")


@pytest.mark.parametrize("value", ["sparse-attn-plan-v2", "", None, 1, KeyError])
def test_other_formats(tmp_path, value):
    load_fails(write(tmp_path, changed(("format",), value)), "format")


@pytest.mark.parametrize("field", ["density", "recall", "error"])
@pytest.mark.parametrize("value", [math.nan, -0.1, -math.inf, "0.3", True, [0.3]])
def test_nan_and_negative_head_measurements(tmp_path, field, value):
    load_fails(write(tmp_path, changed(("layers", 0, "heads", 1, field), value)), f"layers[0].heads[1].{field}")


@pytest.mark.parametrize("field", ["density", "recall"])
def test_measurements_above_one(tmp_path, field):
    load_fails(write(tmp_path, changed(("layers", 1, "heads", 3, field), 1.5)), f"layers[1].heads[3].{field}")


@pytest.mark.parametrize("path, value, fields", [
    (("layers",), [], ["layers", "num_layers"]),
    (("layers",), plan_data()["layers"] * 2, ["layers", "num_layers"]),
    (("layers", 1, "heads"), plan_data()["layers"][1]["heads"][:3], ["layers[1].heads", "num_heads"]),
    (("layers", 0, "heads"), plan_data()["layers"][0]["heads"] * 2, ["layers[0].heads", "num_heads"]),
    (("layers", 0, "heads", 0), "HeadProxy", ["layers[0].heads[0]"]),
    (("layers", 0), [], ["layers[0]"]),
    (("model", "num_heads"), 0, ["model.num_heads"]),
    (("model", "num_kv_heads"), 3, ["num_kv_heads"]),
    (("model", "head_dim"), -64, ["model.head_dim"]),
    (("model", "head_dim"), "16", ["model.head_dim"]),
    (("model", "num_layers"), 1.5, ["model.num_layers"]),
    (("model", "id"), None, ["model.id"]),
    (("blocks", "q"), 0, ["blocks.q"]),
    (("blocks", "kv"), -16, ["blocks.kv"]),
    (("blocks", "q"), 16.0, ["blocks.q"]),
    (("blocks", "kv"), True, ["blocks.kv"]),
    (("blocks",), {"q": 16}, ["blocks.kv", "missing"]),
    (("layers", 0, "decode", "double_sparsity", "r"), 17, ["layers[0].decode.double_sparsity.r"]),
    (("layers", 0, "decode", "double_sparsity", "r"), math.nan, ["layers[0].decode.double_sparsity.r"]),
    (("layers", 0, "decode", "double_sparsity", "budget_fraction"), math.nan, ["double_sparsity.budget_fraction"]),
    (("layers", 0, "decode", "double_sparsity", "budget_fraction"), -0.5, ["double_sparsity.budget_fraction"]),
    (("layers", 0, "decode", "double_sparsity", "channels"), [[3, 1, 0, 7]], ["double_sparsity.channels"]),
    (("layers", 0, "decode", "double_sparsity", "channels", 1), [15, 2, 9, 16], ["double_sparsity.channels[1]"]),
    (("layers", 0, "decode", "double_sparsity", "channels", 0), [3, 1, 0, -1], ["double_sparsity.channels[0]"]),
    (("layers", 0, "decode", "double_sparsity", "channels", 0), [3, 1, 0], ["double_sparsity.channels[0]"]),
    (("layers", 0, "decode", "kv_pruning", "sparsity"), math.nan, ["layers[0].decode.kv_pruning.sparsity"]),
    (("layers", 0, "decode", "kv_pruning", "sparsity"), -0.5, ["layers[0].decode.kv_pruning.sparsity"]),
    (("layers", 0, "decode", "kv_pruning", "sparsity"), 1.0, ["layers[0].decode.kv_pruning.sparsity"]),
    (("layers", 0, "decode"), {"quest": {}}, ["layers[0].decode", "quest"]),
])
def test_out_of_range_counts_blocks_and_decode_entries(tmp_path, path, value, fields):
    load_fails(write(tmp_path, changed(path, value)), *fields)


PARAMS = [  # (pattern, params of head 0 of layer 0, the parameter the error must name)
    ("AShape", {"local_tokens": 0}, "local_tokens"),
    ("AShape", {"local_tokens": -1}, "local_tokens"),
    ("AShape", {"local_tokens": 1.5}, "local_tokens"),
    ("AShape", {"sink_tokens": math.nan}, "sink_tokens"),
    ("AShape", {"sink_tokens": "16"}, "sink_tokens"),
    ("AShape", {"window": 16}, "window"),
    ("Strided", {"stride": 0}, "stride"),
    ("Strided", {"local_blocks": -1}, "local_blocks"),
    ("VerticalSlash", {"vertical": 0}, "vertical"),
    ("VerticalSlash", {"last_q": -4}, "last_q"),
    ("TopKBlocks", {"k": 0}, "k"),
    ("TopKBlocks", {"scores": [[1.0]]}, "scores"),
    ("ElasticSpan", {"beta": 1.5}, "beta"),
    ("ElasticSpan", {"beta": math.nan}, "beta"),
    ("ElasticSpan", {"beta": -0.1}, "beta"),
    ("ElasticSpan", {"alpha": 0}, "alpha"),
    ("HeadProxy", {"gamma": 0.0}, "gamma"),
    ("HeadProxy", {"gamma": math.nan}, "gamma"),
    ("HeadProxy", {"gamma": 1.5}, "gamma"),
    ("HeadProxy", {"gamma": []}, "gamma"),
    ("HeadProxy", {"q_stride": 0}, "q_stride"),
    ("HeadProxy", {"min_budget": -1}, "min_budget"),
    ("HeadProxy", {"min_budget": 1.5}, "min_budget"),
    ("HeadProxy", {"min_budget": math.nan}, "min_budget"),
    ("HeadProxy", {"min_budget": 64, "max_budget": 32}, "max_budget"),
    ("HeadProxy", {"pooling": "avg"}, "pooling"),
    ("HeadProxy", {"head_scores": "yes"}, "head_scores"),
    ("HeadProxy", {"kv_heads_per_group": 0}, "kv_heads_per_group"),
    ("HeadProxy", {"dense_tail": -1}, "dense_tail"),
    ("HeadProxy", {"backend": "cpu"}, "backend"),
    ("headproxy", {}, "headproxy"),
    ("", {}, "unknown pattern"),
    ("AShape", {"local_tokens": True}, "local_tokens"),
    ("TopKBlocks", {"k": True}, "k"),
    ("VerticalSlash", {"slash": True}, "slash"),
    ("Strided", {"stride": True}, "stride"),
    ("HeadProxy", {"gamma": True}, "gamma"),
    ("HeadProxy", {"min_budget": False}, "min_budget"),
    ("HeadProxy", {"dense_tail": True}, "dense_tail"),
    ("ElasticSpan", {"beta": True}, "beta"),
    ("AShape", {"local_tokens": BEYOND_INT64}, "local_tokens"),
    ("Strided", {"stride": BEYOND_INT64}, "stride"),
    ("ElasticSpan", {"alpha": BEYOND_INT64}, "alpha"),
    ("HeadProxy", {"q_stride": BEYOND_INT64}, "q_stride"),
    ("HeadProxy", {"dense_tail": BEYOND_INT64}, "dense_tail"),
    ("HeadProxy", {"min_budget": 10 ** 400}, "min_budget"),
    ("HeadProxy", {"kv_heads_per_group": 3}, "kv_heads_per_group"),
    ("HeadProxy", {"gamma": [0.9, 0.8]}, "gamma"),
    ("HeadProxy", {"gamma": [0.9, 0.8, 0.7, 0.6]}, "gamma"),
]


@pytest.mark.parametrize("pattern, params, field", PARAMS)
def test_pattern_params_out_of_range(tmp_path, pattern, params, field):
    """Head 0 of layer 0 given another pattern or parameter: an error naming the head and the parameter."""
    data = changed(("layers", 0, "heads", 0), {"pattern": pattern, "params": params})
    load_fails(write(tmp_path, data), "layers[0].heads[0]", field)


@pytest.mark.parametrize("changes, fields", [
    (dict(num_heads=8), ["num_heads: plan 4, model 8"]),
    (dict(num_kv_heads=1), ["num_kv_heads: plan 2, model 1"]),
    (dict(head_dim=64), ["head_dim: plan 16, model 64"]),
    (dict(num_layers=3, num_heads=8), ["num_layers: plan 2, model 3", "num_heads: plan 4, model 8"]),
])
def test_another_models_shape(tmp_path, changes, fields):
    """A plan for another model: at load with the model, through the options' model check, and through
    options_from_vllm_config with a vLLM config of that model."""
    path = write(tmp_path, plan_data())
    other = dataclasses.replace(SHAPE, **changes)
    message = load_fails(path, *fields, model=other)
    assert "tiny-model" in message
    options = parse_options({"plan": str(path)}, source="test")
    with pytest.raises(SparseAttnConfigError) as error:
        options.check_model(other)
    assert "plan" in str(error.value) and all(f in str(error.value) for f in fields)
    vllm_config = SimpleNamespace(additional_config={"sparse_attn": {"plan": str(path)}},
                                  model_config=SimpleNamespace(hf_config=None, hf_text_config=other))
    with pytest.raises(SparseAttnConfigError, match="plan"):
        options_from_vllm_config(vllm_config)


def test_a_model_mismatch_names_the_file(tmp_path):
    path = write(tmp_path, plan_data())
    with pytest.raises(PlanError, match=re.escape(str(path))):
        load_plan(path, dataclasses.replace(SHAPE, num_heads=8))


class ReadWhole(BaseException):
    """Raised instead of reading a whole oversized file (a BaseException: no ``except Exception`` hides it)."""


@pytest.fixture
def oversized(tmp_path, monkeypatch):
    """A 2 GiB + 1 byte sparse file (no disk blocks), and whole-file reads of files over 1 GiB replaced by ReadWhole,
    so that a loader without a size limit fails the test instead of reading gigabytes."""
    path = tmp_path / "huge.json"
    with open(path, "wb") as f:
        f.truncate((2 << 30) + 1)
    for method in ("read_text", "read_bytes"):
        original = getattr(pathlib.Path, method)

        def guarded(self, *args, _original=original, **kwargs):
            if self.stat().st_size > 1 << 30:
                raise ReadWhole(f"{self} read whole ({self.stat().st_size} bytes)")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, method, guarded)
    return path


def test_plan_files_have_a_size_limit(oversized):
    try:
        with pytest.raises(PlanError, match=re.escape(str(oversized))) as error:
            load_plan(oversized)
        assert "bytes" in str(error.value) or "large" in str(error.value)
        with pytest.raises(SparseAttnConfigError, match="plan"):
            parse_options({"plan": str(oversized)}, source="test")
    except ReadWhole as read:
        pytest.fail(f"no size limit: {read}")


def test_channels_files_have_a_size_limit(oversized):
    try:
        with pytest.raises(SparseAttnConfigError, match="decode.channels"):
            parse_options({"decode": {"pattern": "double_sparsity", "channels": str(oversized)}}, source="test")
    except ReadWhole as read:
        pytest.fail(f"no size limit: {read}")


def test_the_size_guard_sees_whole_reads(oversized):
    """The guard itself: a whole read of the oversized file is stopped (so the two tests above cannot pass by
    reading it)."""
    with pytest.raises(ReadWhole):
        oversized.read_text()
    assert oversized.stat().st_size == (2 << 30) + 1


@pytest.mark.parametrize("text, reason", [
    ('{"format": "sparse-attn-plan", "version": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nesting"),
    ('{"format": "sparse-attn-plan", "version": 1' + "0" * 5000 + "}", "digits"),
    ('{"format": "sparse-attn-plan", "version": 1}{}', "two documents"),
    ("\ufeff" + json.dumps(plan_data()), "byte order mark"),
    ("\x00" * 64, "zeros"),
    ('{"format": "sparse-attn-plan", "version": NaN}', "NaN version"),
])
def test_text_that_breaks_the_json_parser(tmp_path, text, reason):
    load_fails(write(tmp_path, text=text))


@pytest.mark.parametrize("which", ["directory", "empty"])
def test_a_directory_as_the_plan(tmp_path, which):
    path = tmp_path if which == "directory" else ""
    with pytest.raises(PlanError):
        load_plan(path)
    with pytest.raises(SparseAttnConfigError, match="plan"):
        parse_options({"plan": str(path)}, source="test")


# ---------------------------------------------------------------------------------------------------- vLLM options
OPTION_CASES = [  # (raw options, substrings the error must contain)
    ({"prefill": 5}, ["prefill"]),
    ({"prefill": None}, ["prefill"]),
    ({"prefill": {"pattern": "nope"}}, ["prefill.pattern", "'nope'"]),
    ({"prefill": {"pattern": 5}}, ["prefill.pattern"]),
    ({"prefill": {"pattern": None}}, ["prefill.pattern"]),
    ({"prefill": {"pattern": "a_shape", "window": 3}}, ["prefill", "window"]),
    ({"prefill": {"pattern": "a_shape", "local_tokens": 0}}, ["prefill", "local_tokens"]),
    ({"prefill": {"pattern": "a_shape", "sink_tokens": math.nan}}, ["prefill", "sink_tokens"]),
    ({"prefill": {"pattern": "a_shape", "sink_tokens": -1}}, ["prefill", "sink_tokens"]),
    ({"prefill": {"pattern": "strided", "stride": 0}}, ["prefill", "stride"]),
    ({"prefill": {"pattern": "vertical_slash", "slash": "6096"}}, ["prefill", "slash"]),
    ({"prefill": {"pattern": "top_k_blocks", "k": 1.5}}, ["prefill", "k must be"]),
    ({"prefill": {"pattern": "elastic", "beta": math.nan}}, ["prefill", "beta"]),
    ({"prefill": {"pattern": "elastic", "beta": math.inf}}, ["prefill", "beta"]),
    ({"prefill": {"pattern": "head_proxy", "gamma": math.nan}}, ["prefill", "gamma"]),
    ({"prefill": {"pattern": "head_proxy", "gamma": [0.9, "x"]}}, ["prefill", "gamma"]),
    ({"prefill": {"pattern": "head_proxy", "min_budget": -5}}, ["prefill", "min_budget"]),
    ({"prefill": {"pattern": "head_proxy", "min_budget": [[64]]}}, ["prefill", "min_budget"]),
    ({"prefill": {"pattern": "head_proxy", "pooling": ["max"]}}, ["prefill", "pooling"]),
    ({"prefill": {"pattern": "head_proxy", "stats": {}}}, ["prefill", "stats"]),
    ({"decode": "sometimes"}, ["decode.pattern", "'sometimes'"]),
    ({"decode": []}, ["decode"]),
    ({"decode": {"pattern": "top_k", "budget_fraction": math.nan}}, ["decode", "budget_fraction"]),
    ({"decode": {"pattern": "top_k", "budget_fraction": -0.5}}, ["decode", "budget_fraction"]),
    ({"decode": {"pattern": "top_k", "budget_fraction": math.inf}}, ["decode", "budget_fraction"]),
    ({"decode": {"pattern": "top_k", "budget": 0}}, ["decode", "budget"]),
    ({"decode": {"pattern": "top_k", "budget": 100.0}}, ["decode", "budget"]),
    ({"decode": {"pattern": "top_k", "min_budget": 8}}, ["decode", "min_budget"]),
    ({"decode": {"pattern": "top_k", "sink_tokens": True}}, ["decode", "sink_tokens"]),
    ({"decode": {"pattern": "top_k", "recent_tokens": -1}}, ["decode", "recent_tokens"]),
    ({"decode": {"pattern": "top_k", "r": 4}}, ["decode", "'r'"]),
    ({"decode": {"pattern": "double_sparsity", "r": 0}}, ["decode", "r must be"]),
    ({"decode": {"pattern": "double_sparsity", "r": True}}, ["decode", "r must be"]),
    ({"decode": {"pattern": "double_sparsity", "channels": 5}}, ["decode", "channels"]),
    ({"decode": {"pattern": "double_sparsity"}}, ["decode", "double_sparsity", "channels"]),
    ({"decode": {"pattern": "strided", "stride": -2}}, ["decode", "stride"]),
    ({"plan": 5}, ["plan"]),
    ({"plan": ["plan.json"]}, ["plan"]),
    ({"plan": "/no/such/plan.json"}, ["plan", "/no/such/plan.json"]),
    ({"auto_plan": "yes"}, ["auto_plan"]),
    ({"auto_plan": 1}, ["auto_plan"]),
    ({"auto_plan": None}, ["auto_plan"]),
    ({"dense_below": -1}, ["dense_below"]),
    ({"dense_below": math.nan}, ["dense_below"]),
    ({"dense_below": 1.5}, ["dense_below"]),
    ({"dense_below": True}, ["dense_below"]),
    ({"dense_below": "2048"}, ["dense_below"]),
    ({"dense_below": None}, ["dense_below"]),
    ({"dense_layers": "0"}, ["dense_layers"]),
    ({"dense_layers": {"0": 1}}, ["dense_layers"]),
    ({"dense_layers": None}, ["dense_layers"]),
    ({"dense_layers": [0, -1]}, ["dense_layers[1]"]),
    ({"dense_layers": [True]}, ["dense_layers[0]"]),
    ({"dense_layers": [1.0]}, ["dense_layers[0]"]),
    ({"dense_layers": [math.nan]}, ["dense_layers[0]"]),
    ({"block_size": 48}, ["block_size"]),
    ({"block_size": 8}, ["block_size"]),
    ({"block_size": 0}, ["block_size"]),
    ({"block_size": -64}, ["block_size"]),
    ({"block_size": 64.0}, ["block_size"]),
    ({"block_size": True}, ["block_size"]),
    ({"block_size": math.nan}, ["block_size"]),
    ({"block_size": None}, ["block_size"]),
    ({"op_backend": "gpu"}, ["op_backend"]),
    ({"op_backend": "CPU"}, ["op_backend"]),
    ({"op_backend": ""}, ["op_backend"]),
    ({"op_backend": 5}, ["op_backend"]),
    ({"op_backend": ["cpu"]}, ["op_backend"]),
    ({"kv_pruning": 0.5}, ["kv_pruning"]),
    ({"kv_pruning": {}}, ["kv_pruning"]),
    ({"kv_pruning": []}, ["kv_pruning"]),
    ({"kv_pruning": {"sparsity": 0.5, "recent_tokens": 8}}, ["kv_pruning"]),
    ({"kv_pruning": {"sparsity": math.nan}}, ["kv_pruning.sparsity"]),
    ({"kv_pruning": {"sparsity": -0.1}}, ["kv_pruning.sparsity"]),
    ({"kv_pruning": {"sparsity": 1.0}}, ["kv_pruning.sparsity"]),
    ({"kv_pruning": {"sparsity": math.inf}}, ["kv_pruning.sparsity"]),
    ({"kv_pruning": {"sparsity": True}}, ["kv_pruning.sparsity"]),
    ({"kv_pruning": {"sparsity": "0.5"}}, ["kv_pruning.sparsity"]),
    ({"prefil": "dense"}, ["prefil"]),
    ({"prefill": {"pattern": ["a_shape"]}}, ["prefill.pattern"]),
    ({"decode": {"pattern": {"top_k": {}}}}, ["decode.pattern"]),
    ({"prefill": {"pattern": "a_shape", "local_tokens": True}}, ["prefill", "local_tokens"]),
    ({"prefill": {"pattern": "top_k_blocks", "k": True}}, ["prefill", "k must be"]),
    ({"prefill": {"pattern": "vertical_slash", "vertical": True}}, ["prefill", "vertical"]),
    ({"decode": {"pattern": "vertical_slash", "slash": True}}, ["decode", "slash"]),
    ({"prefill": {"pattern": "strided", "stride": True}}, ["prefill", "stride"]),
    ({"prefill": {"pattern": "head_proxy", "gamma": True}}, ["prefill", "gamma"]),
    ({"prefill": {"pattern": "head_proxy", "q_stride": True}}, ["prefill", "q_stride"]),
    ({"prefill": {"pattern": "head_proxy", "min_budget": False}}, ["prefill", "min_budget"]),
    ({"prefill": {"pattern": "elastic", "beta": True}}, ["prefill", "beta"]),
    ({"decode": {"pattern": "top_k", "budget_fraction": True}}, ["decode", "budget_fraction"]),
    ({"prefill": {"pattern": "a_shape", "local_tokens": BEYOND_INT64}}, ["prefill", "local_tokens"]),
    ({"prefill": {"pattern": "strided", "stride": BEYOND_INT64}}, ["prefill", "stride"]),
    ({"prefill": {"pattern": "elastic", "alpha": BEYOND_INT64}}, ["prefill", "alpha"]),
    ({"prefill": {"pattern": "head_proxy", "q_stride": BEYOND_INT64}}, ["prefill", "q_stride"]),
    ({"prefill": {"pattern": "head_proxy", "max_budget": 10 ** 400}}, ["prefill", "max_budget"]),
    ({"decode": {"pattern": "top_k", "min_budget": BEYOND_INT64}}, ["decode", "min_budget"]),
    ({"decode": {"pattern": "top_k", "budget": BEYOND_INT64}}, ["decode", "budget"]),
    ({"block_size": 1 << 40}, ["block_size"]),
    ({"plan": ""}, ["plan"]),
]


@pytest.mark.parametrize("raw, fields", OPTION_CASES)
def test_bad_options_name_the_field(raw, fields):
    with pytest.raises(SparseAttnConfigError) as error:
        parse_options(raw, source="test")
    message = str(error.value)
    assert "(test)" in message, message
    for field in fields:
        assert field in message, f"{field!r} not in {message!r}"


def vllm_config(raw: dict, shape: ModelShape = SHAPE):
    return SimpleNamespace(additional_config={"sparse_attn": raw},
                           model_config=SimpleNamespace(hf_config=None, hf_text_config=shape))


@pytest.mark.parametrize("raw, fields", [
    ({"dense_layers": [0, 2]}, ["dense_layers", "[2]"]),
    ({"prefill": {"pattern": "head_proxy", "gamma": [0.9, 0.8, 0.7]}}, ["prefill", "gamma"]),
    ({"prefill": {"pattern": "head_proxy", "min_budget": [64] * 8}}, ["prefill", "min_budget"]),
    ({"prefill": {"pattern": "head_proxy", "kv_heads_per_group": 4}}, ["prefill", "kv_heads_per_group"]),
])
def test_options_that_do_not_fit_the_served_model(raw, fields, monkeypatch):
    """Options valid on their own but not for the model: refused when vLLM starts (options_from_vllm_config checks
    the model), not at the first request."""
    monkeypatch.delenv("SPARSE_ATTN_VLLM_CONFIG", raising=False)
    with pytest.raises(SparseAttnConfigError) as error:
        options_from_vllm_config(vllm_config(raw))
    for field in fields:
        assert field in str(error.value), str(error.value)


def test_plan_option_with_a_list_param_fails_at_start_up(tmp_path):
    data = changed(("layers", 0, "heads", 0, "params", "gamma"), [0.9, 0.8])
    path = write(tmp_path, data)
    with pytest.raises(SparseAttnConfigError, match="gamma"):
        options = parse_options({"plan": str(path)}, source="test")
        options.check_model(SHAPE)
        options.layer_settings(0, SHAPE.num_heads)


# ---------------------------------------------------------------------------------------------------- drawn options
json_scalars = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


@st.composite
def pattern_spec(draw, phase: str):
    """``{"pattern": name, param: value}``: a known name (or random text), one of its parameters (or a random
    name) with a random JSON value."""
    names = sorted(PATTERNS) + (sorted(DECODE_METHODS) if phase == "decode" else [])
    name = draw(st.sampled_from(names) | st.text(max_size=6))
    cls = PATTERNS.get(name) or (DECODE_METHODS.get(name) if phase == "decode" else None)
    params = [p for p in _option_names(cls) if p != "channels"] if cls is not None else []
    keys = st.text(min_size=1, max_size=6)
    if params:
        keys = st.sampled_from(params) | keys
    spec = {"pattern": name}
    if params or draw(st.booleans()):
        key = draw(keys)
        if key not in ("pattern", "channels"):  # channels: a path (files are the plan tests' part)
            spec[key] = draw(json_values)
    return spec


def _runs(options) -> None:
    """Builds the prefill mask and runs it, and computes the decode budgets, for a 4-head layer on 70 tokens."""
    prefill, decode = options.layer_settings(0, SHAPE.num_heads)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(70, 4, 16, generator=gen), torch.randn(70, 2, 16, generator=gen)
    for pattern, q_len in ((prefill, 70), (decode, 1)):
        if isinstance(pattern, tuple):  # a token-selection decode: (DoubleSparsityConfig, channels)
            config = pattern[0]
            assert config.token_budgets(torch.tensor([0, 1, 70, 5000])).tolist() == [
                config.token_budget(n) for n in (0, 1, 70, 5000)]
            continue
        mask = pattern.build_mask(q_lens=q_len, kv_lens=70, num_heads=4, q_block_size=16, kv_block_size=16,
                                  q=q[-q_len:], k=k)
        mask.validate()
        from sparse_attn import block_sparse_attention

        out = block_sparse_attention(q[-q_len:], k, k, mask, cu_seqlens_q=[0, q_len], cu_seqlens_k=[0, 70])
        assert torch.isfinite(out).all()


@settings(FUZZ)
@given(phase=st.sampled_from(["prefill", "decode"]), data=st.data())
def test_drawn_pattern_options_fail_at_load_or_run(phase, data):
    """A pattern option with a random parameter value is refused with an error naming the option, or accepted and
    then runs (mask built and attended, decode budgets computed) without an error. Per-head lists and
    kv_heads_per_group are left out where they need the model's head counts, which parse_options does not know
    (options_from_vllm_config checks them: test_options_that_do_not_fit_the_served_model)."""
    spec = data.draw(pattern_spec(phase))
    assume(isinstance(spec["pattern"], str))
    assume(not any(isinstance(v, list) for v in spec.values()))
    group = spec.get("kv_heads_per_group")
    assume(not (isinstance(group, int) and not isinstance(group, bool) and group > 2))
    try:
        options = parse_options({phase: spec, "auto_plan": False}, source="test")
    except SparseAttnConfigError as error:
        assert f"(test): {phase}" in str(error), str(error)
        return
    _runs(options)


@settings(FUZZ)
@given(key=st.sampled_from(["plan", "auto_plan", "dense_below", "dense_layers", "block_size", "op_backend",
                            "kv_pruning", "prefill", "decode"]), value=json_values)
def test_drawn_option_values_fail_with_the_option_named(key, value):
    """Any JSON value for any option: accepted, or a SparseAttnConfigError naming the option (never another
    exception). Strings for ``plan`` are paths and are not drawn (files are the plan tests' part)."""
    assume(not (key == "plan" and isinstance(value, str)))
    try:
        options = parse_options({key: value}, source="test")
    except SparseAttnConfigError as error:
        assert key in str(error) and "(test)" in str(error), str(error)
        return
    if key == "dense_below":  # one threshold, or one per phase
        values = list(value.values()) if isinstance(value, dict) else [value]
        assert not isinstance(value, dict) or set(value) <= {"prefill", "decode"}
        assert all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
    if key == "block_size":
        assert options.block_size == value and value >= 16 and value & (value - 1) == 0
    if key == "kv_pruning":
        assert value is None or 0 <= options.kv_sparsity < 1
