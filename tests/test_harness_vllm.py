"""The vLLM end-to-end benchmark: ratios and tables from worker rows, and one real engine run (vLLM's own backend
on SmolLM2, 256 tokens) through the worker process, checked field by field."""

import importlib.util
import json
import os

import pytest

from bench import e2e_vllm, plots, report

HAS_VLLM = importlib.util.find_spec("vllm") is not None
REQUIRE_VLLM = os.environ.get("SPARSE_ATTN_REQUIRE_VLLM") == "1"


def row(method, context, ttft, tpot, tokens, tps):
    return dict(method=method, pattern=method, context=context, status="ok", prompt_tokens=context - 3, ttft_s=ttft,
                tpot_s=tpot, output_tokens=len(tokens), token_ids=tokens, output_tokens_per_s=tps, retrieved=True)


def test_ratios_divide_the_dense_time_of_the_same_context():
    rows = [row("dense", 1024, 0.5, 0.02, [1, 2], 3.0), row("dense_kernel", 1024, 0.6, 0.025, [1, 2], 2.5),
            row("a_shape", 1024, 0.25, 0.01, [1, 3], 6.0), row("dense", 4096, 2.0, 0.03, [4], 1.0),
            dict(method="a_shape", pattern="a", context=4096, status="skipped", reason="timed out")]
    e2e_vllm.ratios(rows)
    a = rows[2]
    assert a["vs_dense"] == dict(ttft_speedup=2.0, tpot_speedup=2.0, tokens_per_s_ratio=2.0, same_tokens=False)
    assert a["vs_dense_kernel"]["ttft_speedup"] == pytest.approx(2.4) and rows[1]["vs_dense"]["same_tokens"]
    assert "vs_dense" not in rows[4]  # skipped rows get no ratio
    payload = {"benchmark": "e2e_vllm", "status": "ok", "device": {"name": "cpu"}, "commit": {"sha": "abc"},
               "versions": {"torch": "x", "sparse_attn": "y", "vllm": "0.32.0"}, "timestamp": "t",
               "settings": dict(output_tokens=2, passkey=1, depth=0.5), "configs": [], "results": rows}
    table = report.render(payload)
    assert "| a_shape | `a_shape` | 1k (1021) | 250 ms | 2.00x |" in table and "timed out" in table


def test_configurations_follow_the_methods():
    configs = {c["name"]: c for c in e2e_vllm.configurations(["dense", "dense_kernel", "a_shape", "vertical_slash"])}
    assert configs["dense"]["attention_backend"] in ("CPU_ATTN", "FLASH_ATTN")
    options = configs["a_shape"]["additional_config"]["sparse_attn"]
    assert options["prefill"] == options["decode"] == {"pattern": "a_shape", "sink_tokens": 64, "local_tokens": 512}
    assert options["dense_below"] == 0
    vs = configs["vertical_slash"]["additional_config"]["sparse_attn"]
    assert vs["prefill"]["pattern"] == "vertical_slash" and vs["decode"] == "dense"  # estimators are prefill methods
    assert configs["dense_kernel"]["additional_config"]["sparse_attn"]["prefill"] == {"pattern": "dense"}
    with pytest.raises(ValueError, match="contexts must lie"):
        e2e_vllm.Settings(contexts=[8192])


def test_a_plan_is_one_more_configuration(tmp_path):
    from sparse_attn.planner import SMOLLM2_PLAN

    settings = e2e_vllm.Settings(methods=["dense"], plan=str(SMOLLM2_PLAN))
    configs = {c["name"]: c for c in e2e_vllm.configurations(settings.methods, settings.plan)}
    options = configs["plan"]["additional_config"]["sparse_attn"]
    assert options == {"plan": str(SMOLLM2_PLAN.resolve()), "dense_below": 0}  # decode as the plan says
    bad = tmp_path / "plan.json"
    bad.write_text('{"format": "sparse-attn-plan", "version": 1')
    with pytest.raises(ValueError, match="plan.json"):
        e2e_vllm.Settings(methods=["dense"], plan=str(bad))


@pytest.mark.skipif(not HAS_VLLM and not REQUIRE_VLLM, reason="vLLM is not installed")
def test_real_engines_served_in_paired_rounds(tmp_path, monkeypatch):
    settings = e2e_vllm.Settings(contexts=[256], output_tokens=8, methods=["dense", "dense_kernel"], repeats=2,
                                 timeout_s=300)
    # one more engine, whose options fail at start-up: recorded with the reason, the others still measured
    bad = dict(name="bad", pattern="bad", attention_backend="sparse",
               additional_config={"sparse_attn": {"prefill": {"pattern": "no_such_pattern"}}})
    configurations = e2e_vllm.configurations
    monkeypatch.setattr(e2e_vllm, "configurations", lambda names, plan=None: [bad, *configurations(names, plan)])
    payload = e2e_vllm.run(settings, tmp_path)
    assert payload["status"] == "ok" and payload["versions"]["vllm"]
    failed, dense, ours = payload["results"]
    assert failed["status"] == "error" and "no_such_pattern" in failed["reason"], failed
    assert "no_such_pattern" in report.render(payload)
    for result in (dense, ours):
        assert result["status"] == "ok", payload["configs"]
        assert 200 <= result["prompt_tokens"] <= 300 and result["output_tokens"] == 8 and len(result["token_ids"]) == 8
        assert result["ttft_s"] > 0 and result["tpot_s"] > 0 and result["output_tokens_per_s"] > 0
        assert result["timing_source"].startswith("vllm request metrics")  # populated on CPU with log stats on
        assert result["retrieved"], result["text"]  # dense attention finds the key at 256 tokens
        assert result["repeats"] == 2 and result["same_tokens_every_repeat"] and result["rounds"] == [0, 1]
        assert min(result["ttft_s_samples"]) <= result["ttft_s"] <= max(result["ttft_s_samples"])
    assert dense["vs_dense"]["ttft_speedup"] == 1.0 and dense["vs_dense"]["same_tokens"]
    # our dense setting: token-identical to vLLM's backend; its ratio the median of the two rounds' own ratios
    assert ours["vs_dense"]["same_tokens"], (ours["text"], dense["text"])
    within = [d / o for d, o in zip(dense["ttft_s_samples"], ours["ttft_s_samples"])]
    assert ours["vs_dense"]["ttft_speedup"] == pytest.approx(sum(within) / 2)
    for config in payload["configs"][1:]:
        assert config["status"] == "ok" and config["engine_start_s"] > 0
        assert (tmp_path / "e2e_vllm_logs" / f"{config['name']}.log").exists()
    assert json.loads((tmp_path / "e2e_vllm.json").read_text())["results"][1]["ttft_s"] == dense["ttft_s"]
    assert report.render(payload) == (tmp_path / "e2e_vllm.md").read_text().strip()
    assert "2 rounds" in report.render(payload)
    assert plots.plot_e2e_vllm(payload, tmp_path / "e2e_vllm.png") is not None


def test_paired_ratios_are_taken_within_rounds():
    base = dict(row("dense", 1024, 10.0, 0.1, [1], 1.0), ttft_s_samples=[10.0, 20.0, 12.0], rounds=[0, 1, 2])
    ours = dict(row("default", 1024, 9.0, 0.1, [1], 1.0), ttft_s_samples=[9.0, 5.0, 11.0], rounds=[0, 1, 2])
    rows = [base, ours]
    e2e_vllm.ratios(rows)
    # rounds: 1.11, 4.0, 1.09 -> median 1.11 (the ratio of the medians, 12 / 9, would mix rounds)
    assert ours["vs_dense"]["ttft_speedup"] == pytest.approx(10.0 / 9.0)
    ours.update(ttft_s_samples=[5.0, 9.0], rounds=[0, 2])  # a round it missed is left out
    e2e_vllm.ratios(rows)
    assert ours["vs_dense"]["ttft_speedup"] == pytest.approx((2.0 + 12.0 / 9.0) / 2)
    with pytest.raises(ValueError, match="schedule"):
        e2e_vllm.Settings(schedule="random")


def test_batch_rows_render_keys_found_of_the_batch():
    rows = [dict(row("dense", 1024, 0.5, 0.02, [[1, 2], [3, 4]], 8.0), retrieved=[True, True]),
            dict(row("default", 1024, 0.4, 0.01, [[1, 2], [3, 5]], 12.0), retrieved=[True, False])]
    e2e_vllm.ratios(rows)
    assert rows[1]["vs_dense"]["tokens_per_s_ratio"] == 1.5 and not rows[1]["vs_dense"]["same_tokens"]
    payload = {"benchmark": "e2e_vllm", "status": "ok", "device": {"name": "cpu"}, "commit": {"sha": "abc"},
               "versions": {"torch": "x", "sparse_attn": "y", "vllm": "0.32.0"}, "timestamp": "t",
               "settings": dict(output_tokens=2, passkey=7, depth=0.5, batch=2), "configs": [], "results": rows}
    table = report.render(payload)
    assert "batch 2" in table and "keys 7..8" in table and "| 1/2 | no |" in table
    with pytest.raises(ValueError, match="batch"):
        e2e_vllm.Settings(batch=0)


def test_table_option_names_the_readme_table():
    settings, out = e2e_vllm.settings_from_args(["--out", "x", "--contexts", "7500", "--table", "e2e_vllm_xeon"])
    assert settings.table == "e2e_vllm_xeon" and settings.contexts == [7500] and out.name == "x"
    assert e2e_vllm.settings_from_args(["--out", "x"])[0].table is None


@pytest.mark.skipif(not HAS_VLLM and not REQUIRE_VLLM, reason="vLLM is not installed")
def test_a_real_batch_is_served_together(tmp_path):
    settings = e2e_vllm.Settings(contexts=[200], output_tokens=6, methods=["dense"], batch=3, timeout_s=300)
    payload = e2e_vllm.run(settings, tmp_path)
    (result,) = payload["results"]
    assert result["status"] == "ok", payload["configs"]
    assert len(result["token_ids"]) == 3 and all(len(t) == 6 for t in result["token_ids"])
    assert result["output_tokens"] == 18 and result["retrieved"] == [True, True, True], result["text"]
    assert result["ttft_s"] > 0 and result["tpot_s"] > 0
    assert result["output_tokens_per_s"] == pytest.approx(18 / result["generate_s"])
    assert payload["table"] == "e2e_vllm_batch3" and "batch 3" in report.render_dir(tmp_path)["e2e_vllm_batch3"]
