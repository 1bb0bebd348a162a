"""The benchmark harness on CPU at tiny sizes: result schema, ratios from measured numbers, masks at a target
density, the FlexAttention conversion, and tables regenerated from JSON."""

import json
import re

import pytest
import torch

from bench import common, gpu_suite, prefill, report
from sparse_attn import TopKBlocks
from sparse_attn.ops.reference import attention_reference_varlen

TINY = ["--device", "cpu", "--contexts", "96,128", "--densities", "0.3,1.0", "--heads", "4", "--kv-heads", "2",
        "--head-dim", "16", "--dtype", "fp32", "--block", "16", "--quick"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prefill")
    assert prefill.main(["--out", str(out)] + TINY) == 0
    return out, json.loads((out / "prefill.json").read_text())


def test_cpu_results_name_the_vector_extensions(monkeypatch, tmp_path):
    """Two CPUs of one model name can differ in AVX-512: a CPU result records the widest extensions its flags show,
    and its table's header names them."""
    cpuinfo = tmp_path / "cpuinfo"
    real_path = common.Path

    def fake_path(*args):
        return cpuinfo if args == ("/proc/cpuinfo",) else real_path(*args)

    monkeypatch.setattr(common, "Path", fake_path)
    cases = [("fpu sse4_2 avx avx2 fma", "AVX2"), ("avx2 avx512f avx512_vnni", "AVX-512 (VNNI)"),
             ("avx2 avx512f avx512_bf16 avx512_vnni", "AVX-512 (BF16, VNNI)"), ("fpu sse4_2", "SSE4.2")]
    for flags, isa in cases:
        cpuinfo.write_text(f"model name\t: Some CPU\nflags\t\t: {flags}\n")
        info = common.device_info(torch.device("cpu"))
        assert info["name"] == "Some CPU" and info["isa"] == isa
        line = common.environment_line({"device": info, "versions": {"torch": "2", "sparse_attn": "0"},
                                        "commit": {"sha": "abc"}})
        assert line.startswith(f"**Some CPU** ({isa}) · ")
    cpuinfo.write_text("model name\t: Some CPU\n")  # no flags line: nothing claimed
    assert "isa" not in common.device_info(torch.device("cpu"))


def test_prefill_json_schema(tiny_run):
    _, payload = tiny_run
    assert payload["benchmark"] == "prefill"
    assert payload["device"]["type"] == "cpu" and payload["device"]["name"]
    assert {"torch", "triton", "python", "cuda", "sparse_attn", "transformers"} <= set(payload["versions"])
    assert payload["versions"]["torch"] == torch.__version__
    assert set(payload["commit"]) == {"sha", "dirty"}
    assert payload["settings"]["contexts"] == [96, 128] and payload["settings"]["heads"] == 4
    methods = {(r["context"], r["method"], r.get("impl")) for r in payload["results"]}
    for context in (96, 128):
        for backend in prefill.SDPA_BACKENDS:
            assert (context, "sdpa", backend) in methods
        assert (context, "sparse_attn", "cpu") in methods and (context, "flex", "eager") in methods
    for row in payload["results"]:
        assert row["status"] in ("ok", "skipped")
        if row["status"] == "ok":
            assert row["ms"] > 0 and row["ms_min"] <= row["ms"] and row["iters"] >= 2
        else:
            assert row["ms"] is None and row["reason"]
    # The math backend always runs on CPU; the fused CUDA-only backends are skipped with the reason recorded.
    by_impl = {r["impl"]: r for r in payload["results"] if r["method"] == "sdpa" and r["context"] == 96}
    assert by_impl["math"]["status"] == "ok" and by_impl["cudnn"]["status"] == "skipped"


def test_prefill_compares_block_sizes_at_equal_density(tmp_path):
    """--compare-blocks times the kernel at each block size on masks of the same density, each against the largest
    block size in the same run, and renders the comparison."""
    args = ["--out", str(tmp_path), "--device", "cpu", "--contexts", "256", "--densities", "0.3", "--heads", "4",
            "--kv-heads", "2", "--head-dim", "16", "--dtype", "fp32", "--block", "32", "--quick", "--flex", "off",
            "--compare-blocks", "16,32"]
    assert prefill.main(args) == 0
    payload = json.loads((tmp_path / "prefill.json").read_text())
    rows = {r["block"]: r for r in payload["results"] if r["method"] == "block_size"}
    assert sorted(rows) == [16, 32] and all(r["status"] == "ok" for r in rows.values())
    assert all(abs(r["density"] - 0.3) < 0.1 for r in rows.values())
    assert rows[32]["vs_largest_block"] == 1.0
    assert rows[16]["vs_largest_block"] == pytest.approx(rows[16]["ms"] / rows[32]["ms"])
    assert "vs 32-token blocks" in (tmp_path / "prefill.md").read_text()
    with pytest.raises(ValueError, match="compare_blocks"):
        prefill.Settings(contexts=[256], densities=[0.3], heads=4, kv_heads=2, head_dim=16, dtype="fp32", block=32,
                         device="cpu", compare_blocks=[32])


def test_prefill_ratios_come_from_measured_times(tiny_run):
    _, payload = tiny_run
    results = payload["results"]
    ours = [r for r in results if r["method"] == "sparse_attn"]
    assert len(ours) == 4
    for row in ours:
        sdpa = [r["ms"] for r in results if r["method"] == "sdpa" and r["context"] == row["context"] and r["ms"]]
        flex = next(r for r in results if r["method"] == "flex" and r["context"] == row["context"]
                    and r["density_target"] == row["density_target"])
        assert row["status"] == flex["status"] == "ok"
        assert row["sdpa_best_ms"] == min(sdpa)
        assert row["speedup_vs_sdpa"] == pytest.approx(min(sdpa) / row["ms"])
        assert row["flex_ms"] == flex["ms"] and row["speedup_vs_flex"] == pytest.approx(flex["ms"] / row["ms"])
        assert flex["speedup_vs_sdpa"] == pytest.approx(min(sdpa) / flex["ms"])
        # Dense-equivalent FLOPs: 4 * D per causal (query, key) pair, S (S + 1) / 2 pairs per head.
        s = row["context"]
        dense_flops = 4 * 16 * 4 * s * (s + 1) / 2
        assert row["tflops_effective"] == pytest.approx(dense_flops / (row["ms"] * 1e-3) / 1e12)
        assert row["tflops_actual"] == pytest.approx(row["tflops_effective"] * row["kept_pair_fraction"])
        # Correctness of our output against FlexAttention (same mask) and the float32 reference.
        assert row["max_abs_err_vs_flex"] < 1e-5 and row["max_abs_err_vs_reference"] < 1e-5
        if row["density_target"] == 1.0:
            assert row["density"] == 1.0 and row["kept_pair_fraction"] == 1.0 and row["max_abs_err_vs_sdpa"] < 1e-5
        else:
            assert 0 < row["density"] < 1 and row["kept_pair_fraction"] < 1


def test_report_regenerates_the_table(tiny_run, tmp_path, capsys):
    out, payload = tiny_run
    written = (out / "prefill.md").read_text().strip()
    assert report.render_dir(out) == {"prefill": written}
    # Every measured time in the JSON appears in the table: nothing is typed by hand.
    for row in payload["results"]:
        if row["method"] == "sparse_attn":
            assert f"{common.fmt(row['ms'])} ms" in written
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:prefill -->\nold table\n<!-- /bench:prefill -->\nend\n")
    assert report.main([str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and written in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "### Prefill" in capsys.readouterr().out


def test_splice_needs_markers():
    with pytest.raises(ValueError, match="bench:decode"):
        report.splice("no markers here", "decode", "table")
    twice = report.splice(report.splice("a <!-- bench:x -->\n<!-- /bench:x --> b", "x", "one"), "x", "two")
    assert twice == "a <!-- bench:x -->\ntwo\n<!-- /bench:x --> b"


@pytest.mark.parametrize("pattern", prefill.PATTERNS)
@pytest.mark.parametrize("target", [0.05, 0.1, 0.3])
def test_mask_at_density_hits_the_target(pattern, target):
    # 8k tokens in 64-token blocks: one more block per row moves the density by about 1.5%.
    mask, description = prefill.mask_at_density(target, context=8192, heads=4, block=64, pattern=pattern)
    assert abs(mask.density() - target) < 0.01, description
    keep = mask.to_block_bool()
    causal = torch.ones(128, 128, dtype=torch.bool).tril()
    assert not (keep & ~causal).any()  # blocks above the diagonal are never kept
    assert keep[..., torch.arange(128), torch.arange(128)].all()  # every row sees its own block
    if pattern == "topk":  # random scores per head: heads read different blocks
        assert mask.heads == 4 and not torch.equal(keep[0, 0], keep[0, 1])


def test_attended_pairs_matches_token_count():
    # Ragged: queries are the last 70 of 150 positions, blocks of 32 (partial last blocks on both sides).
    scores = torch.rand(3, 3, 5)
    mask = TopKBlocks(k=2, scores=scores).build_mask(q_lens=70, kv_lens=150, num_heads=3, q_block_size=32,
                                                     kv_block_size=32)
    tokens = mask.to_token_mask()[0]  # [H, 70, 150]
    causal = torch.arange(150)[None, :] <= torch.arange(70)[:, None] + 80
    kept, dense = prefill.attended_pairs(mask, heads=3)
    assert kept == int((tokens & causal).sum())
    assert dense == 3 * int(causal.sum())


@pytest.mark.parametrize("q_len,kv_len", [(96, 96), (50, 130)])
def test_flex_block_mask_means_the_same_mask(q_len, kv_len):
    heads, kv_heads, dim, block = 4, 2, 16, 16
    nq, nk = -(-q_len // block), -(-kv_len // block)
    mask = TopKBlocks(k=3, scores=torch.rand(heads, nq, nk)).build_mask(
        q_lens=q_len, kv_lens=kv_len, num_heads=heads, q_block_size=block, kv_block_size=block)
    q = torch.randn(1, heads, q_len, dim)
    k, v = torch.randn(2, 1, kv_heads, kv_len, dim).unbind(0)
    block_mask = prefill.flex_block_mask(mask, heads, blocks_in_mask_mod=True)
    # Diagonal blocks are partial (causal mask_mod); blocks wholly below the diagonal are full.
    kept = block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()
    assert int(kept) == int(mask.kv_num_blocks.sum()) and int(block_mask.full_kv_num_blocks.sum()) > 0
    out = prefill.flex_function("eager")(q, k, v, block_mask=block_mask, enable_gqa=True)
    tokens = [t[0].transpose(0, 1) for t in (q, k, v)]
    ref, _ = attention_reference_varlen(*tokens, [0, q_len], [0, kv_len], mask, True, dim ** -0.5, torch.float64)
    torch.testing.assert_close(out[0].transpose(0, 1).double(), ref, atol=1e-5, rtol=1e-5)


def test_reference_rows_error_sees_a_wrong_block():
    heads, dim, block, length = 2, 16, 16, 80
    mask, _ = prefill.mask_at_density(0.4, context=length, heads=heads, block=block)
    q, k, v = torch.randn(3, 1, heads, length, dim).unbind(0)
    from sparse_attn import block_sparse_attention

    out = block_sparse_attention(q, k, v, mask)
    blocks = list(range(mask.num_q_blocks))
    assert prefill.reference_rows_error(out, q, k, v, mask, blocks, dim ** -0.5) < 1e-5
    out[:, :, 2 * block + 3] += 0.5  # one corrupted row in query block 2
    assert prefill.reference_rows_error(out, q, k, v, mask, [2], dim ** -0.5) == pytest.approx(0.5, abs=1e-4)
    assert prefill.reference_rows_error(out, q, k, v, mask, [0, 1, 3], dim ** -0.5) < 1e-5
    assert prefill.sample_q_blocks(10, 3, seed=1)[-1] == 9 and len(set(prefill.sample_q_blocks(10, 3, seed=1))) == 3


def test_sdpa_function_reports_why_a_backend_cannot_run():
    q, k, v = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    fn, gqa = prefill.sdpa_function("math", q, k, v, 0.25)
    assert gqa == "enable_gqa" and fn().shape == q.shape
    with pytest.raises(RuntimeError, match="backend"):
        prefill.sdpa_function("cudnn", q, k, v, 0.25)


def test_target_checks_only_for_the_target_configuration():
    rows = [dict(method="sparse_attn", context=65536, density_target=1.0, density=1.0, speedup_vs_sdpa=0.95),
            dict(method="sparse_attn", context=65536, density_target=0.1, density=0.1, speedup_vs_sdpa=9.0,
                 speedup_vs_flex=1.1)]
    settings = dict(dtype="bf16", heads=32, kv_heads=8, head_dim=128)
    checks = prefill.target_checks(settings, "cuda", rows)
    assert [c["met"] for c in checks] == [True, True, False]
    assert prefill.target_checks(settings, "cpu", rows) == []
    assert prefill.target_checks(dict(settings, dtype="fp16"), "cuda", rows) == []


def test_time_fn_and_environment(monkeypatch):
    timing = common.time_fn(lambda: torch.ones(8).sum(), torch.device("cpu"), warmup=1, min_iters=3, max_iters=5)
    assert 3 <= timing.iters <= 5 and 0 < timing.min_ms <= timing.median_ms
    commit = common.git_commit()
    assert commit["sha"] is None or re.fullmatch(r"[0-9a-f]{40}", commit["sha"])
    monkeypatch.setenv("BENCH_GIT_SHA", "abc123")
    monkeypatch.setenv("BENCH_GIT_DIRTY", "0")
    assert common.git_commit() == {"sha": "abc123", "dirty": False}
    with pytest.raises(ValueError, match="dtype"):
        common.parse_dtype("int8")


def test_gpu_suite_degrades_to_cpu(tmp_path):
    extra = " ".join(a for a in TINY if a != "--quick")
    decode_tiny = "--contexts 1200 --batches 2 --heads 4 --kv-heads 2 --head-dim 32 --r 8 --flex off"
    estimation_tiny = "--contexts 128 --heads 4 --kv-heads 2 --head-dim 16 --block 32"
    hf_tiny = "--contexts 128 --layers 1"
    assert gpu_suite.main(["--out", str(tmp_path), "--skip-install", "--quick", "--prefill-args", extra,
                           "--decode-args", decode_tiny, "--estimation-args", estimation_tiny,
                           "--e2e-hf-args", hf_tiny]) == 0
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["ok"] and [s["name"] for s in suite["steps"]] == [
        "correctness", "decode correctness", "CUDA kernels vs CPU emulation", "vllm core on the GPU", "prefill",
        "estimation", "e2e_hf", "decode"]
    assert [s["status"] for s in suite["steps"][2:4]] == ["skipped"] * 2  # the CPU test run covers them without a GPU
    budgets = [s["time_budget_s"] for s in suite["steps"][4:]]
    assert all(0 < b <= 480 for b in budgets)  # shares of the time left (540 s less a 60 s reserve)
    assert budgets[0] < budgets[-1]  # decode, last, gets all that remains
    # Without a GPU the suite runs the tiny CPU model (the benchmark alone would record a skip).
    hf = json.loads((tmp_path / "e2e_hf.json").read_text())
    assert hf["status"] == "ok" and hf["settings"]["device"] == "cpu" and hf["results"]
    estimation = json.loads((tmp_path / "estimation.json").read_text())
    assert {r["method"] for r in estimation["results"]} >= {"sdpa", "head_proxy", "vertical_slash"}
    checks = suite["steps"][0]["checks"]
    assert [c["context"] for c in checks] == [128, 128, 128, 91]
    assert all(c["ok"] and c["max_abs_err_vs_reference"] < 1e-5 for c in checks)
    assert (tmp_path / "prefill.json").exists() and (tmp_path / "suite.md").exists()
    tables = report.render_dir(tmp_path)
    assert "correctness" in tables["gpu_suite"] and {"estimation", "e2e_hf", "prefill", "decode"} <= set(tables)


def test_suite_shares_leave_unspent_time_to_later_steps(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(gpu_suite.time, "monotonic", lambda: now[0])
    start = 1000.0
    # 540 s budget, 60 s reserve: the first of four steps with shares 0.4/0.1/0.2/0.3 gets 0.4 of 480 s.
    assert gpu_suite.share_of_rest(540, start, [0.4, 0.1, 0.2, 0.3]) == pytest.approx(192.0)
    now[0] += 100.0  # it finished early: the next step shares the 380 s left with the later ones
    assert gpu_suite.share_of_rest(540, start, [0.1, 0.2, 0.3]) == pytest.approx(380 * 0.1 / 0.6)
    now[0] += 1000.0
    assert gpu_suite.share_of_rest(540, start, [0.3]) == 0.0


def test_a_result_of_another_machine_fills_its_own_readme_table():
    """`--table` names the README table a result fills: the committed transformers results of two machines render
    into two tables, each naming its machine, and both tables are in the README as generated."""
    from pathlib import Path

    from bench import e2e_hf_smollm2

    settings, _ = e2e_hf_smollm2.settings_from_args(["--out", "x", "--table", "e2e_hf_smollm2_other"])
    assert settings.table == "e2e_hf_smollm2_other"
    assert "dense_skip" not in settings.configs  # threshold skipping rows run only when named
    named, _ = e2e_hf_smollm2.settings_from_args(["--out", "x", "--configs", "sdpa,dense_skip,plan_skip"])
    assert named.configs == ["sdpa", "dense_skip", "plan_skip"]
    with pytest.raises(ValueError, match="unknown"):
        e2e_hf_smollm2.settings_from_args(["--out", "x", "--configs", "sdpa,skip"])
    root = Path(report.__file__).parent
    tables = {**report.render_dir(root / "results" / "cpu-2026-12-06"),
              **report.render_dir(root / "results" / "cpu-2026-12-06-xeon")}
    assert "**AMD EPYC**" in tables["e2e_hf_smollm2"] and "**Intel(R) Xeon(R)" in tables["e2e_hf_smollm2_xeon"]
    readme = (root.parent / "README.md").read_text()
    for name in ("e2e_hf_smollm2", "e2e_hf_smollm2_xeon"):
        assert report.splice(readme, name, tables[name]) == readme  # the README holds exactly the generated table


def test_plan_accuracy_table_shows_the_no_plan_default():
    """The plan-accuracy table puts the no-plan default beside the plan where a run measured it: its perplexity rise
    and density per text, and each passkey it missed."""
    from bench import accuracy_plan

    from pathlib import Path

    payload = json.loads((Path(__file__).parents[1] / "bench/results/accuracy_plan/accuracy_plan.json").read_text())
    payload.pop("default_run", None)
    assert "no-plan default" not in accuracy_plan.markdown(payload)
    default = json.loads(json.dumps(payload["plan_run"]))
    for entry in default["perplexity"].values():
        entry.update(perplexity=entry["perplexity"] * 1.5, rise=0.5, density=0.625)
    default["passkey"][1]["retrieved"] = False
    default["passkey_kept"] = False
    text = accuracy_plan.markdown({**payload, "default_run": default})
    gpl = next(line for line in text.splitlines() if line.startswith("| GPL-3 |"))
    assert gpl.count("+50.00%") == 1 and gpl.endswith("| 0.625 |")
    passkeys = [line for line in text.splitlines() if re.match(r"\| \d+ \| 0\.\d+ \|", line)]
    assert len(passkeys) == len(default["passkey"]) and passkeys[1].count("missed") == 1
    assert "Every dense passkey success kept by the no-plan default: False." in text
