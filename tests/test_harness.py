"""The ``python -m bench`` harness on CPU at tiny sizes: result files (JSON fields, markdown rendered from them, PNG
plots), estimation overhead and memory computed from measured/real objects, GPU-only parts skipped with a reason,
the composite run and its summary."""

import json

import pytest
import torch

from bench import common, e2e_hf, estimation, harness, memory, methods, plots, report

ON_GPU = torch.cuda.is_available()
TINY_ESTIMATION = ["--device", "cpu", "--contexts", "192,256", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                   "--block", "32", "--dtype", "fp32", "--quick"]
TINY_MEMORY = ["--contexts", "100,700", "--label-bits", "16,4"]
ENVIRONMENT_FIELDS = {"benchmark", "device", "versions", "commit", "timestamp", "command"}


def is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def estimation_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("estimation")
    assert harness.main(["estimation", "--out", str(out)] + TINY_ESTIMATION) == 0
    return out, json.loads((out / "estimation.json").read_text())


def test_cli_lists_the_parts_and_refuses_unknown_ones(capsys):
    assert harness.main([]) == 0
    text = capsys.readouterr().out
    for part in list(harness.PARTS) + ["kernels", "all", "report"]:
        assert part in text
    assert harness.main(["nope"]) == 2
    assert harness.main(["memory"]) == 2  # --out is required


def test_estimation_json_markdown_and_plot(estimation_run):
    out, payload = estimation_run
    assert ENVIRONMENT_FIELDS <= set(payload) and payload["benchmark"] == "estimation"
    assert payload["device"]["type"] == "cpu" and payload["versions"]["torch"] == torch.__version__
    assert payload["settings"]["contexts"] == [192, 256] and payload["targets"] == []  # CPU: no GPU bar
    for context in (192, 256):
        rows = {r["method"]: r for r in payload["results"] if r["context"] == context and r["method"] != "sdpa"}
        dense = [r["ms"] for r in payload["results"] if r["context"] == context and r["method"] == "sdpa" and r["ms"]]
        assert set(rows) == {"head_proxy", "head_proxy_per_head", "vertical_slash"}
        for row in rows.values():
            assert row["status"] == "ok" and row["estimate_ms"] > 0 and row["dense_ms"] == min(dense)
            # the overhead: the median over the rounds of estimation / dense timed back to back
            assert row["overhead"] > 0 and row["overhead_rounds"] == payload["settings"]["rounds"] == 2
            assert row["speedup_vs_dense"] == pytest.approx(min(dense) / (row["estimate_ms"] + row["kernel_ms"]))
            assert 0 < row["density"] <= 1
        assert rows["head_proxy"]["scoring_ms"] > 0 and rows["head_proxy_per_head"]["scoring_ms"] > 0  # timed apart
    written = (out / "estimation.md").read_text().strip()
    assert report.render(payload) == written and "overhead" in written
    assert f"{common.fmt(payload['results'][-1]['estimate_ms'])} ms" in written
    assert is_png(out / "estimation.png")


def test_estimation_target_only_in_its_configuration():
    rows = [dict(method="head_proxy", context=65536, overhead=0.04)]
    settings = dict(dtype="bf16", heads=32, kv_heads=8, head_dim=128)
    assert [c["met"] for c in estimation.target_checks(settings, "cuda", rows)] == [True]
    assert estimation.target_checks(settings, "cuda", [dict(rows[0], overhead=0.2)])[0]["met"] is False
    assert estimation.target_checks(settings, "cpu", rows) == []
    cpu_rows = [dict(method="head_proxy_per_head", context=8192, overhead=0.08)]
    cpu_settings = dict(dtype="fp32", heads=9, kv_heads=3, head_dim=64, block=32)
    assert [c["met"] for c in estimation.target_checks(cpu_settings, "cpu", cpu_rows)] == [True]
    assert estimation.target_checks(cpu_settings, "cpu", [dict(cpu_rows[0], overhead=0.12)])[0]["met"] is False
    assert estimation.target_checks(dict(cpu_settings, block=64), "cpu", cpu_rows) == []


def test_memory_reads_the_real_caches(tmp_path):
    assert harness.main(["memory", "--out", str(tmp_path)] + TINY_MEMORY) == 0
    payload = json.loads((tmp_path / "memory.json").read_text())
    assert ENVIRONMENT_FIELDS <= set(payload) and set(payload["models"]) == {"smollm2", "llama-8b"}
    for model, shape in memory.MODELS.items():
        elem = common.parse_dtype(shape["dtype"]).itemsize
        for context in (100, 700):
            rows = {(r["method"], r.get("label_bits") or r.get("sparsity")): r for r in payload["results"]
                    if r["model"] == model and r["context"] == context}
            dense = rows["dense", None]
            pages = -(-context // 16)  # the paged cache holds whole 16-token pages
            assert dense["layer_bytes"] == pages * 16 * shape["kv_heads"] * shape["head_dim"] * 2 * elem
            assert dense["bytes"] == dense["layer_bytes"] * shape["layers"] and dense["ratio_to_dense"] == 1.0
            ds16, ds4 = rows["double_sparsity", 16], rows["double_sparsity", 4]
            assert ds16["label_bytes_match_planning"] and ds4["label_bytes_match_planning"]
            assert 1.0 < ds4["ratio_to_dense"] < ds16["ratio_to_dense"]  # labels add to the full K/V
            p50, p70 = rows["kv_pruning", 0.5], rows["kv_pruning", 0.7]
            assert p50["compressed_tokens"] + p50["recent_tokens"] == context
            if context == 700:  # past the 32-token window and a 256-token batch: tokens are compressed
                assert p70["ratio_to_dense"] < p50["ratio_to_dense"] < 1.0
                assert p50["allocated_bytes"] >= p50["bytes"]
    assert report.render(payload) == (tmp_path / "memory.md").read_text().strip()
    assert is_png(tmp_path / "memory.png")
    with pytest.raises(ValueError, match="models: unknown"):
        memory.Settings(models=["gpt"])


@pytest.mark.skipif(ON_GPU, reason="checks the skip on a machine without a GPU")
def test_e2e_hf_is_skipped_with_the_reason_without_a_gpu(tmp_path):
    assert harness.main(["e2e-hf", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "e2e_hf.json").read_text())
    assert payload["status"] == "skipped" and "GPU only" in payload["reason"] and payload["results"] == []
    assert ENVIRONMENT_FIELDS <= set(payload)
    assert "Skipped: GPU only" in (tmp_path / "e2e_hf.md").read_text()
    assert not (tmp_path / "e2e_hf.png").exists()


def test_e2e_hf_tiny_model_on_cpu(tmp_path):
    argv = ["--device", "cpu", "--quick", "--contexts", "128,256", "--layers", "1"]
    assert harness.main(["e2e-hf", "--out", str(tmp_path)] + argv) == 0
    payload = json.loads((tmp_path / "e2e_hf.json").read_text())
    assert payload["status"] == "ok" and payload["settings"]["tiny"]
    by = {(r["context"], r["method"]): r for r in payload["results"]}
    assert set(by) == {(c, m) for c in (128, 256) for m in e2e_hf.DEFAULT_METHODS}
    for (context, method), row in by.items():
        assert row["status"] == "ok" and row["ms"] > 0
        assert row["ttft_speedup_vs_dense"] == pytest.approx(by[context, "dense"]["ms"] / row["ms"])
        assert 0 < row["density"] <= 1
    assert by[256, "a_shape"]["density"] < 1  # a 64-token window over 256 tokens skips blocks
    assert by[256, "dense_kernel"]["logits_max_abs_diff_vs_dense"] < 1e-4  # the Dense pattern computes SDPA's
    assert by[256, "a_shape"]["logits_max_abs_diff_vs_dense"] > 1e-4  # ... and A-shape does not
    assert by[256, "head_proxy"]["estimation_ms"] > 0
    assert report.render(payload) == (tmp_path / "e2e_hf.md").read_text().strip()
    assert is_png(tmp_path / "e2e_hf.png")


def test_all_runs_parts_side_by_side_with_a_summary(tmp_path):
    argv = ["all", "--out", str(tmp_path), "--quick", "--only", "estimation,memory,e2e-hf",
            "--estimation-args", " ".join(TINY_ESTIMATION[:-1]), "--memory-args", "--contexts 300 --models smollm2"]
    assert harness.main(argv) == 0
    summary = json.loads((tmp_path / "run.json").read_text())
    assert ENVIRONMENT_FIELDS <= set(summary) and summary["ok"]
    parts = {p["name"]: p for p in summary["parts"]}
    assert list(parts) == ["estimation", "memory", "e2e-hf"]
    assert parts["estimation"]["status"] == parts["memory"]["status"] == "ok"
    assert "estimation.png" in parts["estimation"]["files"] and "memory.json" in parts["memory"]["files"]
    if not ON_GPU:
        assert parts["e2e-hf"]["status"] == "skipped" and "GPU only" in parts["e2e-hf"]["reason"]
    text = (tmp_path / "run.md").read_text()
    assert "### Estimation overhead" in text and "### KV-cache memory" in text and "![memory](memory.png)" in text
    # Re-rendering from the JSON gives the same tables and plots.
    (tmp_path / "memory.md").unlink()
    (tmp_path / "memory.png").unlink()
    assert harness.main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "memory.md").exists() and is_png(tmp_path / "memory.png")


def test_accuracy_plot_from_a_summary(tmp_path):
    summary = {name: dict(passkey_success=s, passkey_kept_dense=s == 1.0, passkey_density=d, perplexity_change=c,
                          perplexity_density=d, recall=r, recall_density=d)
               for name, s, d, c, r in (("dense", 1.0, 1.0, 0.0, 1.0), ("a_shape", 0.0, 0.3, 0.05, 0.7))}
    payload = {"benchmark": "accuracy", "device": {"name": "cpu"}, "commit": {"sha": None}, "summary": summary}
    assert is_png(plots.plot_accuracy(payload, tmp_path / "accuracy.png"))


def test_methods_map_to_vllm_options():
    assert methods.vllm_options(methods.PREFILL_METHODS["a_shape"]) == (
        {"pattern": "a_shape", "sink_tokens": 64, "local_tokens": 512}, None)
    assert methods.vllm_options(methods.PREFILL_METHODS["dense"]) == ({"pattern": "dense"}, None)
    spec, reason = methods.vllm_options(methods.PREFILL_METHODS["head_proxy"])
    assert (spec is None) != (reason is None)
    if spec is None:  # until the vLLM backend learns the pattern, the harness says why it is left out
        assert "HeadProxy" in reason
    with pytest.raises(ValueError, match="unknown"):
        methods.resolve("dense,nope")


def test_no_plan_default_method_is_the_default_pattern():
    from sparse_attn.patterns import default_pattern

    assert methods.PREFILL_METHODS["no_plan_default"].build() == default_pattern()
