"""The retrieval suite (bench.retrieval, sparse_attn.models.retrieval): seeded candidates and prompts rebuilt exactly
from their parameters with the needles at the requested depths, the committed case list (what it covers, every case
rebuilding to the question and answers it records), answer checking, the summary, and a fast slice on SmolLM2
(real weights): dense finds the short cases the list says it finds, and the default (``configure(model)``) and the
plan keep them."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from bench import report, retrieval
from sparse_attn.models import retrieval as R

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sparse_attn.models.smollm2 import cache_dir, load_smollm2, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    if not (cache_dir() / "config.json").is_file():
        load_smollm2()
    return AutoTokenizer.from_pretrained(cache_dir())


@pytest.fixture(scope="module")
def sources(tokenizer):
    try:
        return R.Sources(tokenizer)
    except FileNotFoundError as error:  # no Debian licence texts or an unusual standard library
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def case_list():
    data = retrieval.load_cases()
    try:
        same = R.source_fingerprints() == data["sources"]
    except FileNotFoundError as error:
        pytest.skip(str(error))
    if not same:
        pytest.skip("the haystack sources here differ from the ones the case list was built with")
    return data


def test_candidate_pool_is_seeded_and_covers_every_kind():
    pool = retrieval.candidate_pool()
    assert pool == retrieval.candidate_pool()
    assert pool != retrieval.candidate_pool(retrieval.POOL_SEED + 1)
    assert len(pool) == len({s.id for s in pool}) == 12 * retrieval.PER_CELL
    assert {(s.haystack, s.needle) for s in pool} == {(h, n) for h in R.HAYSTACK_KINDS for n in R.NEEDLE_KINDS}
    assert {s.tokens for s in pool} == set(retrieval.LENGTHS) and min(retrieval.LENGTHS) == 1024
    depths = [d for s in pool for d in s.depths]
    assert min(depths) == 0.05 and max(depths) == 0.95
    two = [s for s in pool if len(s.depths) == 2]
    assert len(two) == 12 * len(retrieval.TWO_NEEDLE_SLOTS)
    assert all(b - a >= 0.2 - 1e-9 for a, b in (s.depths for s in two))


@pytest.mark.parametrize("haystack,needle,tokens,depths", [
    ("filler", "number", 1024, (0.05,)), ("licence", "word", 2048, (0.5,)), ("python", "kv", 3072, (0.95,)),
    ("mixed", "kv", 1536, (0.2, 0.8)), ("mixed", "word", 4096, (0.1, 0.4)), ("licence", "number", 1024, (0.3, 0.9)),
])
def test_prompt_is_rebuilt_exactly_with_the_needles_at_their_depths(tokenizer, sources, haystack, needle, tokens,
                                                                     depths):
    spec = R.CaseSpec("t", haystack, needle, tokens, depths, seed=1234)
    prompt = R.build_prompt(tokenizer, spec, sources)
    stored = json.loads(json.dumps(spec.as_dict()))
    again = R.build_prompt(tokenizer, R.CaseSpec.from_dict(stored), R.Sources(tokenizer))
    assert again.text == prompt.text and again.answers == prompt.answers
    other = R.build_prompt(tokenizer, R.CaseSpec("t", haystack, needle, tokens, depths, seed=1235), sources)
    assert other.text != prompt.text and other.answers != prompt.answers

    ids = tokenizer(prompt.text)["input_ids"]
    assert len(ids) == prompt.tokens and abs(prompt.tokens - tokens) <= 0.02 * tokens
    assert len(prompt.answers) == len(prompt.needles) == len(depths)
    # Each needle sentence is in the text once, holds its answer, and starts where the recorded depth says, which is
    # the requested depth to within 1.5% of the context.
    question_at = len(tokenizer(prompt.text[: prompt.text.rindex("\n\n")])["input_ids"])
    for needle_text, answer, want, got in zip(prompt.needles, prompt.answers, depths, prompt.depths):
        assert prompt.text.count(needle_text) == 1 and answer in needle_text
        start = prompt.text.index(needle_text)
        measured = len(tokenizer(prompt.text[:start])["input_ids"]) / question_at
        assert measured == pytest.approx(got, abs=0.005)
        assert got == pytest.approx(want, abs=0.015)
    # It ends with the question and the first needle's sentence up to its answer (the answer is primed).
    assert prompt.text.endswith("\n\n" + prompt.question + " " + prompt.needles[0].rsplit(" ", 1)[0])
    if needle == "kv":
        records = prompt.text.count("The access code for room ")
        assert prompt.distractors == 4 + tokens // 600 and records == prompt.distractors + len(depths) + 1
    if haystack == "mixed":
        assert {"filler"} < set(prompt.sources) and any(s.startswith("stdlib/") for s in prompt.sources)


def test_answers_are_whole_strings_and_all_of_them():
    assert R.answered(["48213"], " 48213. The grass")
    assert not R.answered(["48213"], " 148213.") and not R.answered(["48213"], " 482130")
    assert R.answered(["velmora"], ' "Velmora".') and not R.answered(["velmora"], " velmoras")
    assert R.answered(["123", "456"], " 123. The second secret number is 456.")
    assert not R.answered(["123", "456"], " 123. The second secret number is 457.")


def test_committed_case_list(tokenizer, sources, case_list):
    cases = case_list["cases"]
    pool = case_list["pool"]
    assert len(cases) >= 60 and pool["dense_solved"] == len(cases) <= pool["candidates"]
    assert sum(v["dense_solved"] for v in pool["by_kind"].values()) == len(cases)
    assert {c["haystack"] for c in cases} == set(R.HAYSTACK_KINDS)
    assert {c["needle"] for c in cases} == set(R.NEEDLE_KINDS)
    assert any(len(c["depths"]) == 2 for c in cases)
    prompt_tokens = [c["prompt_tokens"] for c in cases]
    assert min(prompt_tokens) < 1100 and max(prompt_tokens) > 7000
    depths = [d for c in cases for d in c["depths"]]
    assert min(depths) <= 0.1 and max(depths) >= 0.9
    specs = {s.id: s for s in retrieval.candidate_pool(case_list["generator"]["seed"])}
    for case in cases:
        assert R.CaseSpec.from_dict(case) == specs[case["id"]]  # a pool candidate, unchanged
        prompt = R.build_prompt(tokenizer, specs[case["id"]], sources)
        assert (prompt.question, list(prompt.answers), prompt.tokens) == (case["question"], case["answers"],
                                                                         case["prompt_tokens"])
        assert R.answered(case["answers"], case["dense_continuation"])
    for missed in pool["missed"]:
        assert not R.answered(missed["answers"], missed["dense_continuation"])


def test_fast_slice_covers_kinds(case_list):
    chosen = retrieval.fast_slice(case_list["cases"])
    assert len(chosen) == 3 and all(1100 <= c["prompt_tokens"] <= 1600 for c in chosen)
    assert len({c["haystack"] for c in chosen}) == 3 and len({c["needle"] for c in chosen}) == 3


def test_summary_counts_losses_against_dense():
    def row(config, case_id, found, density=0.5):
        return dict(config=config, id=case_id, haystack="filler", needle="number", needles=1, tokens=1000,
                    depths=[0.5], answers=["1"], continuation=" 1" if found else " 2", found=found,
                    prefill_density=density, decode_read=None, seconds=1.0)

    cases = [dict(id=i, tokens=1024, haystack="filler", needle="number", depths=[0.5], prompt_tokens=1000)
             for i in "abc"]
    rows = [row("dense", "a", True, 1.0), row("dense", "b", True, 1.0), row("dense", "c", False, 1.0),
            row("default", "a", True, 0.4), row("default", "b", False, 0.6), row("default", "c", True, 0.5)]
    summary = retrieval.summarize(rows, ["dense", "default"], cases)
    assert summary["dense"]["found"] == summary["dense"]["dense_found"] == 2
    default = summary["default"]
    assert (default["found"], default["dense_found"], default["lost"], default["gained"]) == (2, 2, ["b"], ["c"])
    assert not default["kept_every_dense"] and default["prefill_density"] == pytest.approx(0.5)
    assert default["by_needle"]["number"] == {"found": 2, "dense_found": 2, "cases": 3}
    # Without dense rows the case list is the reference: every case in it is one dense solved.
    assert retrieval.summarize(rows[3:], ["default"], cases)["default"]["dense_found"] == 3


def test_density_by_length_groups_by_the_case_s_target_length():
    rows = [dict(config=c, id=f"{n:03d}-filler-number-{t}-d50", prefill_density=d)
            for n, (c, t, d) in enumerate([("plan", 1024, 0.8), ("plan", 7500, 0.3), ("plan", 6144, 0.5),
                                           ("plan", 3072, None), ("other", 7500, 0.9)])]
    groups = retrieval.density_by_length(rows, "plan")
    assert groups == pytest.approx({"1k": 0.8, "6k": 0.5, "7.5k": 0.3})
    assert list(groups) == ["1k", "6k", "7.5k"]


@pytest.fixture(scope="module")
def smollm2(tokenizer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared CPU, two OpenMP threads competing with other processes run far slower
    from sparse_attn.models import load_smollm2

    yield load_smollm2()
    torch.set_num_threads(threads)


def test_fast_slice_dense_default_and_plan(smollm2, case_list, tmp_path):
    model, tokenizer = smollm2
    chosen = retrieval.fast_slice(case_list["cases"])
    settings = retrieval.Settings(configs=["dense", "default", "plan"], ids=[c["id"] for c in chosen])
    payload = retrieval.run(settings, tmp_path, model=model, tokenizer=tokenizer, log=lambda *_: None)
    assert json.loads((tmp_path / "retrieval.json").read_text())["summary"] == payload["summary"]
    assert report.render(payload) == (tmp_path / "retrieval.md").read_text().strip()
    rows = {(r["config"], r["id"]): r for r in payload["results"]}
    for case in chosen:
        dense = rows["dense", case["id"]]
        assert dense["found"], (case["id"], dense["continuation"], case["dense_continuation"])
        for name in ("default", "plan"):
            row = rows[name, case["id"]]
            assert row["found"], (name, case["id"], row["continuation"])
            assert 0 < row["prefill_density"] <= 1 and 0 < row["decode_read"] <= 1
        # Past dense_below the plan's patterns ran: at 1.5k tokens its floor of 1024 keys per head and query block
        # reads about 93% of the causal blocks.
        assert rows["plan", case["id"]]["prefill_density"] < 0.97
    summary = payload["summary"]
    assert summary["dense"]["found"] == summary["default"]["found"] == summary["plan"]["found"] == len(chosen)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None and os.environ.get("SPARSE_ATTN_REQUIRE_VLLM") != "1",
                    reason="vLLM is not installed")
def test_vllm_configuration_runs_in_the_engine(smollm2, case_list, tmp_path):
    """The suite's vLLM rows: the real engine with the sparse backend (no options) answers the shortest case of the
    fast slice as dense does, with the backend's own densities."""
    model, tokenizer = smollm2
    case = min(retrieval.fast_slice(case_list["cases"]), key=lambda c: c["tokens"])
    settings = retrieval.Settings(configs=["vllm_default"], ids=[case["id"]])
    payload = retrieval.run(settings, tmp_path, model=model, tokenizer=tokenizer, log=lambda *_: None)
    assert payload["configs"]["vllm_default"]["status"] == "ok", payload["configs"]["vllm_default"]
    (row,) = payload["results"]
    assert row["config"] == "vllm_default" and row["id"] == case["id"]
    assert row["found"], row["continuation"]
    assert 0 < row["prefill_density"] <= 1 and 0 < row["decode_read"] <= 1


def test_merge_keeps_each_configuration_s_run_through_earlier_merges(tmp_path):
    """Joining an already joined result with a run from another machine keeps, per configuration, the machine and
    commit of the run it came from (an earlier merge contributes its own runs), and the table names them."""
    committed = Path(retrieval.__file__).parent / "results" / "cpu-2026-12-06" / "retrieval.json"
    source = json.loads(committed.read_text())
    other = json.loads(committed.read_text())  # a run of one more configuration, on another machine
    other["configs"] = {"ds_other": other["configs"]["ds"]}
    other["results"] = [dict(r, config="ds_other") for r in other["results"] if r["config"] == "ds"]
    other.pop("merged_from")
    other["device"] = dict(other["device"], name="Other CPU")
    other["settings"] = dict(other["settings"], configs=["ds_other"])
    (tmp_path / "other.json").write_text(json.dumps(other))
    payload = retrieval.merge([committed, tmp_path / "other.json"], tmp_path / "out", only=["plan", "ds_other"])
    assert list(payload["configs"]) == ["plan", "ds_other"]
    runs = [(run["settings"]["configs"], run["device"]["name"]) for run in payload["merged_from"]]
    assert runs == [(["plan"], source["merged_from"][0]["device"]["name"]), (["ds_other"], "Other CPU")]
    assert payload["summary"]["ds_other"]["found"] == source["summary"]["ds"]["found"]
    table = (tmp_path / "out" / "retrieval.md").read_text()
    assert f"plan on {source['merged_from'][0]['device']['name']}" in table and "ds_other on Other CPU" in table
