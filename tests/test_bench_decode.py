"""The decode benchmark on CPU at tiny sizes: result schema, ratios and floors computed from the recorded numbers,
stored bytes from the real caches, recall of a selection, skips, targets, tables regenerated from JSON, and the
GPU suite's decode correctness check."""

import json
import math

import pytest
import torch

import sparse_attn.decode
from bench import common, decode, gpu_suite, report
from sparse_attn import BlockSparseMask

HEADS, KV_HEADS, DIM, R, DIVISOR, CONTEXT = 4, 2, 32, 8, 8, 1200  # 1200: not a multiple of the 16-token page
TINY = ["--device", "cpu", "--contexts", str(CONTEXT), "--batches", "1,3", "--heads", str(HEADS), "--kv-heads",
        str(KV_HEADS), "--head-dim", str(DIM), "--r", str(R), "--budget-divisor", str(DIVISOR), "--dtype", "fp32",
        "--quick"]
METHODS = {("sdpa", b) for b in decode.SDPA_BACKENDS} | {("flex", "eager"), ("sparse_attn_dense", "cpu"),
                                                          ("double_sparsity", "cpu")}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode")
    assert decode.main(["--out", str(out)] + TINY) == 0
    return out, json.loads((out / "decode.json").read_text())


def cell_rows(payload, batch):
    return [r for r in payload["results"] if r["batch"] == batch and r["context"] == CONTEXT]


def test_decode_json_schema(tiny_run):
    _, payload = tiny_run
    assert payload["benchmark"] == "decode" and payload["device"]["type"] == "cpu"
    assert payload["versions"]["torch"] == torch.__version__ and set(payload["commit"]) == {"sha", "dirty"}
    s = payload["settings"]
    assert s["contexts"] == [CONTEXT] and s["batches"] == [1, 3] and s["sparsities"] == [0.5, 0.7]
    assert s["double_sparsity"]["r"] == R and s["double_sparsity"]["dense_below"] == 0
    assert "random" in payload["accuracy_note"] and "understates" in payload["accuracy_note"]
    assert set(payload["bandwidth"]) >= {"bytes", "ms", "gb_per_s"}
    assert payload["targets"] == []  # CPU run: the GPU bars are never filled
    for batch in (1, 3):
        rows = cell_rows(payload, batch)
        assert {(r["method"], r["impl"]) for r in rows if r["method"] != "kv_pruning"} == METHODS
        assert sorted(r["sparsity"] for r in rows if r["method"] == "kv_pruning") == [0.5, 0.7]
        for row in rows:
            assert row["status"] in ("ok", "skipped")
            if row["status"] == "ok":
                assert row["ms"] > 0 and row["ms_min"] <= row["ms"] and row["iters"] >= 2
            else:
                assert row["ms"] is None and row["reason"]
        by = {(r["method"], r["impl"]): r for r in rows}
        assert by["sdpa", "math"]["status"] == "ok" and by["sdpa", "cudnn"]["status"] == "skipped"
        assert all(r["status"] == "ok" for r in rows if r["method"] in ("sparse_attn_dense", "double_sparsity",
                                                                        "kv_pruning", "flex"))


def test_decode_ratios_come_from_recorded_numbers(tiny_run):
    _, payload = tiny_run
    bw = payload["bandwidth"]
    assert bw["gb_per_s"] == pytest.approx(2 * bw["bytes"] / (bw["ms"] * 1e-3) / 1e9)
    for batch in (1, 3):
        rows = cell_rows(payload, batch)
        dense = [r for r in rows if r["method"] in decode.DENSE_METHODS and r["ms"] is not None]
        best = min(dense, key=lambda r: r["ms"])
        q_bytes = batch * HEADS * DIM * 4
        for row in rows:
            assert row["best_dense_ms"] == best["ms"] and row["best_dense_method"] == f"{best['method']}:{best['impl']}"
            if row["ms"] is None:
                continue
            assert row["speedup_vs_dense"] == pytest.approx(best["ms"] / row["ms"])
            assert row["floor_ms"] == pytest.approx(row["bytes_read"] / (bw["gb_per_s"] * 1e9) * 1e3)
            assert row["vs_floor"] == pytest.approx(row["ms"] / row["floor_ms"])
        for row in dense:  # dense decode reads all of K and V, and q
            assert row["bytes_read"] == batch * CONTEXT * KV_HEADS * 2 * DIM * 4 + q_bytes

        ds = next(r for r in rows if r["method"] == "double_sparsity")
        k = math.ceil(CONTEXT / DIVISOR)
        assert ds["k"] == k and ds["budget_fraction"] == pytest.approx(k / CONTEXT)
        assert ds["label_bytes"] == batch * CONTEXT * KV_HEADS * R * 4  # fp32 labels of every token
        assert ds["selected_kv_bytes"] == batch * KV_HEADS * k * 2 * DIM * 4
        assert ds["bytes_read"] == ds["label_bytes"] + ds["selected_kv_bytes"] + q_bytes
        assert ds["parts_ms"] == pytest.approx(ds["label_scores_ms"] + ds["topk_ms"] + ds["attention_ms"])

        pruned = {r["sparsity"]: r for r in rows if r["method"] == "kv_pruning"}
        for sparsity, keep in ((0.5, 16), (0.7, 10)):
            row = pruned[sparsity]
            # One prefill of 1200 tokens: all but the 32 recent ones compressed in one batch (1 tile of 64 channels).
            compressed = batch * (CONTEXT - 32)
            assert row["k_keep"] == row["v_keep"] == keep and row["compressed_tokens"] == compressed
            stored = (compressed * KV_HEADS * (2 * 8 + 2 * keep * 4) + batch * 32 * KV_HEADS * 2 * DIM * 4
                      + batch * KV_HEADS * 8 + 2 * batch * 4)
            assert row["stored_bytes"] == stored and row["dense_bytes"] == batch * CONTEXT * KV_HEADS * 2 * DIM * 4
            assert row["stored_ratio"] == pytest.approx(stored / row["dense_bytes"])
            assert row["bytes_read"] == stored + q_bytes
        assert pruned[0.7]["stored_ratio"] < pruned[0.5]["stored_ratio"] < 1


def test_decode_accuracy_next_to_speed(tiny_run):
    _, payload = tiny_run
    for batch in (1, 3):
        rows = cell_rows(payload, batch)
        for row in rows:
            if row["method"] in decode.DENSE_METHODS and row["ms"] is not None:
                assert row["max_abs_err_vs_dense"] < 1e-4  # fp32 dense decode matches the fp32 reference
        ds = next(r for r in rows if r["method"] == "double_sparsity")
        assert 0 < ds["recall_min"] <= ds["recall_mean"] <= ds["recall_oracle_mean"] + 1e-6 <= 1 + 2e-6
        # The planted channels are found by calibration, and make the selection far better than chance (k / L).
        assert ds["planted_channels_found"] == 1.0
        assert ds["recall_mean"] > 3 * ds["budget_fraction"]
        assert ds["max_abs_err_vs_dense"] > 1e-3
        pruned = {r["sparsity"]: r for r in rows if r["method"] == "kv_pruning"}
        assert 1e-3 < pruned[0.5]["max_abs_err_vs_dense"] < pruned[0.7]["max_abs_err_vs_dense"]


def test_report_regenerates_the_table(tiny_run, tmp_path):
    out, payload = tiny_run
    written = (out / "decode.md").read_text().strip()
    assert report.render_dir(out)["decode"] == written
    for row in payload["results"]:
        if row["method"] in ("double_sparsity", "kv_pruning", "sparse_attn_dense"):
            assert f"{common.fmt(row['ms'])} ms" in written
    ds = next(r for r in payload["results"] if r["method"] == "double_sparsity")
    assert f"{ds['recall_mean']:.3f}" in written
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- bench:decode -->\nold\n<!-- /bench:decode -->\nb\n")
    assert report.update_readme(readme, out) == ["decode"]
    assert written in readme.read_text() and "old" not in readme.read_text()


def settings(**overrides):
    base = dict(contexts=[300], batches=[2], heads=HEADS, kv_heads=KV_HEADS, head_dim=DIM, dtype="fp32", device="cpu",
                r=R, budget_divisor=4, flex="off", quick=True, copy_mib=1)
    return decode.Settings(**{**base, **overrides})


def test_time_budget_and_memory_skip_whole_cells(monkeypatch):
    payload = decode.run(settings(time_budget_s=0.0))
    assert payload["results"] and all(r["reason"] == "time budget exhausted" for r in payload["results"])
    assert "skipped [1]" in decode.markdown(payload)
    monkeypatch.setattr(common, "free_memory_bytes", lambda device: 1 << 20)  # as if a GPU had 1 MiB free
    payload = decode.run(settings())
    assert all(r["status"] == "skipped" and r["reason"].startswith("needs about") for r in payload["results"])
    assert len(payload["results"]) == len(decode.planned_rows(settings(), 2, 300, {"attention": "cpu", "pruning": "cpu"}))


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="kv_heads"):
        settings(kv_heads=3)
    with pytest.raises(ValueError, match="r"):
        settings(r=DIM + 1)
    with pytest.raises(ValueError, match="sparsity"):
        settings(sparsities=[1.0])


def test_target_checks_only_for_the_target_configuration():
    rows = [dict(method="double_sparsity", batch=8, context=131072, vs_floor=1.2, speedup_vs_dense=6.5),
            dict(method="double_sparsity", batch=16, context=131072, vs_floor=1.1, speedup_vs_dense=9.0),
            dict(method="kv_pruning", batch=8, context=8192, sparsity=0.7, stored_ratio=0.36, speedup_vs_dense=1.2),
            dict(method="kv_pruning", batch=8, context=32768, sparsity=0.7, stored_ratio=0.36, speedup_vs_dense=2.5),
            dict(method="kv_pruning", batch=8, context=131072, sparsity=0.5, stored_ratio=0.56, speedup_vs_dense=1.5),
            dict(method="kv_pruning", batch=8, context=131072, sparsity=0.7, stored_ratio=0.36, speedup_vs_dense=None)]
    config = dict(dtype="bf16", heads=32, kv_heads=8, head_dim=128, r=16, budget_divisor=16)
    checks = decode.target_checks(config, "cuda", rows)
    assert [(c["metric"], c["context"], c["met"]) for c in checks] == [
        ("vs_floor", 131072, True), ("speedup_vs_dense", 131072, False),
        ("stored_ratio", 32768, True), ("stored_ratio", 131072, True),
        ("speedup_vs_dense", 32768, True), ("speedup_vs_dense", 131072, False)]  # a skipped time never meets a bar
    assert decode.target_checks(config, "cpu", rows) == []
    assert decode.target_checks(dict(config, r=8), "cuda", rows) == []


def test_selection_recall_is_the_softmax_mass_on_the_selection():
    lengths, group = [70, 45], HEADS // KV_HEADS
    inputs = decode.make_inputs(lengths, heads=HEADS, kv_heads=KV_HEADS, head_dim=DIM, dtype=torch.float32,
                                device="cpu", page_size=16, planted=4, gain=2.0, seed=3, shuffle_pages=True)
    scale = DIM ** -0.5
    out, lse = decode.dense_reference(inputs, scale)
    # Selection per KV head: a random subset of each sequence's tokens.
    g = torch.Generator().manual_seed(0)
    width = 20
    indices = torch.stack([torch.stack([torch.randperm(n, generator=g)[:width].sort().values for _ in range(KV_HEADS)])
                           for n in lengths])
    counts = torch.tensor([[20, 7], [13, 20]], dtype=torch.int32)
    selection = BlockSparseMask.from_token_indices(indices, counts, kv_len=max(lengths))
    recall = decode.selection_recall(inputs, selection, lse, scale)
    masses, best = [], []
    for b, n in enumerate(lengths):
        keys, values = inputs.sequence_kv(b)
        for h in range(HEADS):
            p = torch.softmax((keys[h // group] @ inputs.q[b, h]) * scale, -1)
            torch.testing.assert_close(p @ values[h // group], out[b, h], atol=1e-5, rtol=1e-5)
            c = int(counts[b, h // group])
            masses.append(float(p[indices[b, h // group, :c]].sum()))
            best.append(float(p.topk(int(counts.max())).values.sum()))
    assert recall["recall_mean"] == pytest.approx(sum(masses) / len(masses), abs=1e-5)
    assert recall["recall_min"] == pytest.approx(min(masses), abs=1e-5)
    assert recall["recall_oracle_mean"] == pytest.approx(sum(best) / len(best), abs=1e-5)


def test_inputs_views_and_planted_channels():
    inputs = decode.make_inputs([40, 40], heads=HEADS, kv_heads=KV_HEADS, head_dim=DIM, dtype=torch.float32,
                                device="cpu", page_size=16, planted=4, gain=5.0, seed=1)
    k, v = inputs.contiguous_kv(40)  # [B, Hkv, L, D] views of the same storage
    assert k.shape == (2, KV_HEADS, 40, DIM) and k.data_ptr() == inputs.k_cache.data_ptr()
    for b in range(2):
        keys, values = inputs.sequence_kv(b)
        assert torch.equal(keys, k[b]) and torch.equal(values, v[b])
    # Planted channels carry the gain: their spread is far larger than the others'.
    std = inputs.k_cache.float().flatten(0, 1).std(0)  # [Hkv, D]
    planted = torch.zeros(KV_HEADS, DIM, dtype=torch.bool).scatter_(1, inputs.planted, True)
    assert std[planted].min() > 2.5 * std[~planted].max()
    assert torch.equal(decode.calibrate(inputs, 4, 512, seed=1).sort(-1).values, inputs.planted)
    shuffled = decode.make_inputs([40], heads=HEADS, kv_heads=KV_HEADS, head_dim=DIM, dtype=torch.float32,
                                  device="cpu", page_size=16, planted=4, gain=5.0, seed=1, shuffle_pages=True)
    with pytest.raises(ValueError, match="token order"):
        shuffled.contiguous_kv(40)


def test_suite_decode_correctness_passes_and_catches_a_wrong_op(monkeypatch):
    s = settings(budget_divisor=4)
    step = gpu_suite.decode_correctness(s, context=300)
    assert step["status"] == "ok" and [c["check"] for c in step["checks"]] == [
        "dense", "dense, one split", "Double Sparsity selection", "KV pruning 70%"]
    assert all(c["max_abs_err_vs_reference"] < 1e-5 for c in step["checks"])
    assert step["checks"][2]["tokens_read"] == [75, 68, 68, 49]  # ceil(L / 4), at least sink + recent (68), at most L
    original = sparse_attn.decode.sparse_decode_attention

    def off_by_a_bit(*args, **kwargs):
        out, lse = original(*args, **kwargs)
        return out + 0.01, lse

    monkeypatch.setattr(sparse_attn.decode, "sparse_decode_attention", off_by_a_bit)
    step = gpu_suite.decode_correctness(s, context=300)
    assert step["status"] == "failed" and [c["ok"] for c in step["checks"]] == [False, False, False, True]
    assert "Decode correctness" in gpu_suite.markdown(dict(step_env(), steps=[step]))


def step_env():
    return {"device": {"name": "cpu"}, "versions": {"torch": torch.__version__, "sparse_attn": "0"},
            "commit": {"sha": None, "dirty": None}}


def test_max_abs_err_is_none_for_non_finite_outputs():
    ref = torch.zeros(2, 3)
    assert decode.max_abs_err(torch.full((2, 3), 0.5), ref) == 0.5
    assert decode.max_abs_err(torch.tensor([[0.0, float("nan"), 0.0]] * 2), ref) is None
