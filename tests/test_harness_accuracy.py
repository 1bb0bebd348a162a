"""The accuracy benchmark on SmolLM2-135M (real weights) at tiny lengths: recall, passkey and perplexity side by
side with the density each method ran at, the decode part through bench.accuracy_decode, tables and the plot."""

import json

import pytest
import torch

from bench import accuracy, methods, report
from sparse_attn.planner.calibrate import Candidate


@pytest.fixture(scope="module")
def smollm2():
    # One thread: on a shared CPU, two OpenMP threads competing with other processes run ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from sparse_attn.models import load_smollm2, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    yield load_smollm2()
    torch.set_num_threads(threads)


def test_tiny_accuracy_run(smollm2, tmp_path, monkeypatch):
    # A 64-token window over 320 tokens (5 blocks of 64): sparse at this length (the harness's own settings keep
    # every block there).
    monkeypatch.setitem(methods.PREFILL_METHODS, "tiny_window", Candidate.of("AShape", sink_tokens=16, local_tokens=64))
    settings = accuracy.Settings(lengths=[320], depths=[0.5], ppl_len=320, recall_len=320, decode_lengths=[320],
                                 decode_depths=[0.5], decode_ppl_len=96, decode_ppl_decode=4,
                                 methods=["dense", "tiny_window"], query_rows=32)
    model, tokenizer = smollm2
    payload = accuracy.run(settings, tmp_path, model=model, tokenizer=tokenizer)
    assert {"benchmark", "device", "versions", "commit", "settings"} <= set(payload)
    assert json.loads((tmp_path / "accuracy.json").read_text())["summary"] == payload["summary"]

    recall = payload["recall"]["methods"]
    assert payload["recall"]["layers"] == 30 and len(recall["dense"]["recall_per_layer"]) == 30
    assert recall["dense"]["recall_mean"] == pytest.approx(1.0) and recall["dense"]["density_mean"] == 1.0
    assert recall["dense"]["output_error_mean"] < 1e-4
    window = recall["tiny_window"]
    assert 0 < window["density_mean"] < 1 and window["recall_min"] <= window["recall_mean"] < 1
    assert window["output_error_mean"] > 1e-3

    runs = {p["method"]: p for p in payload["passkey"]}
    assert runs["dense"]["prefill_density"] == 1.0 and runs["dense"]["retrieved"], runs["dense"]["answer"]
    assert 0 < runs["tiny_window"]["prefill_density"] < 1
    ppl = payload["perplexity"]
    assert ppl["dense"]["change"] == 0.0 and ppl["tiny_window"]["density"] < 1 and ppl["tiny_window"]["perplexity"] > 1
    summary = payload["summary"]
    assert summary["dense"]["passkey_success"] == 1.0 and summary["tiny_window"]["recall"] == window["recall_mean"]

    assert report.render(payload) == (tmp_path / "accuracy.md").read_text().strip()
    decode = json.loads((tmp_path / "accuracy_decode.json").read_text())
    assert decode["benchmark"] == "accuracy_decode" and decode["passkey"] and "dense" in decode["perplexity"]
    assert "Passkey retrieval" in report.render_dir(tmp_path)["accuracy_decode"]

    from bench import plots

    png = plots.plot_file(tmp_path / "accuracy.json")
    assert png.stat().st_size > 1000
