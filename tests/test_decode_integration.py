"""Sparse decode wired into SparseAttention and the transformers integration: Double Sparsity and KV pruning are exact
at full budget / zero sparsity, their per-layer state follows the KV cache and resets on a new prompt, bad settings
raise ValueError naming the field, and on SmolLM2 (real weights) Double Sparsity keeps a passkey dense attention finds."""

import pytest
import torch

import sparse_attn
from sparse_attn import SparseAttention
from sparse_attn.decode import DoubleSparsity, DoubleSparsityConfig, KVPruning, KVPruningConfig

HQ, HKV, D = 6, 2, 32


def qkv(batch, q_len, kv_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, HQ, q_len, D, generator=g), torch.randn(batch, HKV, kv_len, D, generator=g),
            torch.randn(batch, HKV, kv_len, D, generator=g))


def channels(r=8, heads=HKV):
    return torch.stack([torch.randperm(D, generator=torch.Generator().manual_seed(h))[:r] for h in range(heads)])


def ds(budget=None, **options):
    config = DoubleSparsityConfig(r=8, budget=budget, sink_tokens=2, recent_tokens=4, min_budget=8, dense_below=0,
                                  **options)
    return DoubleSparsity(config, channels())


def decode_steps(attn, k, v, prefill, q):
    """Prefill ``prefill`` tokens, then decode one token at a time to the end of k/v with queries ``q [B, Hq, n, D]``."""
    attn(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill])
    outs = [attn(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1]) for t in range(prefill, k.shape[2])]
    return torch.cat(outs, 2)


def reference(q, k, v):
    """Causal attention in float64, queries the last positions of the context (GQA by repeating KV heads)."""
    k, v = (t.double().repeat_interleave(HQ // HKV, 1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) * D ** -0.5
    rows = torch.arange(q.shape[2])[:, None] + k.shape[2] - q.shape[2]
    scores = scores.masked_fill(torch.arange(k.shape[2]) > rows, float("-inf"))
    return (torch.softmax(scores, -1) @ v).float()


def dense_rows(q, k, v, prefill):
    return reference(q, k, v)[:, :, prefill:]


@pytest.mark.parametrize("method", [ds(budget=1000), KVPruning(KVPruningConfig(sparsity=0.0, recent_tokens=4, compress_every=8))],
                         ids=["double_sparsity_full_budget", "pruning_sparsity_0"])
def test_exact_at_full_budget(method):
    q, k, v = qkv(2, 70, 70)
    attn = SparseAttention(decode=method, dense_below=0)
    got = decode_steps(attn, k, v, 50, q)
    torch.testing.assert_close(got, dense_rows(q, k, v, 50), atol=1e-5, rtol=1e-5)
    assert attn.decode_state.absorbed == 70
    assert attn.last_density == 1.0


def test_double_sparsity_reads_its_budget():
    q, k, v = qkv(1, 1, 200)
    attn = SparseAttention(decode=ds(budget=25))
    out, lse = attn(q, k, v, return_lse=True)
    assert out.shape == (1, HQ, 1, D) and lse.shape == (1, HQ, 1)
    assert attn.last_density == pytest.approx(25 / 200)
    assert not torch.allclose(out, reference(q, k, v), atol=1e-3)  # really sparse


def test_pruning_changes_decode_and_matches_pruned_cache():
    from sparse_attn.decode.kv_pruning import prune_magnitude

    q, k, v = qkv(1, 1, 80)
    config = KVPruningConfig(sparsity=0.5, recent_tokens=4, compress_every=8)
    attn = SparseAttention(decode=KVPruning(config))
    got = attn(q, k, v)
    # Every token outside the dense window of the newest ones was stored pruned.
    window = attn.decode_state.cache.recent_lengths[0]
    k_ref, v_ref = k.clone(), v.clone()
    k_ref[:, :, :80 - window], v_ref[:, :, :80 - window] = (prune_magnitude(t[:, :, :80 - window], 0.5) for t in (k, v))
    torch.testing.assert_close(got, reference(q, k_ref, v_ref), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, reference(q, k, v), atol=1e-3)


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("group_reduce", ["max", "sum"])
def test_double_sparsity_kernels_match_the_reference_path(bits, group_reduce):
    """The C++ step (label write into the sequences' pages, one selection pass, one attention pass) selects and
    attends like the PyTorch scoring and the float64 oracle, across a label cache that grows while decoding."""
    q, k, v = qkv(2, 90, 90, seed=5)
    method = ds(budget=12, label_bits=bits, group_reduce=group_reduce)
    fast = SparseAttention(decode=method, dense_below=0)
    slow = SparseAttention(decode=method, dense_below=0, backend="reference")
    got, want = decode_steps(fast, k, v, 40, q), decode_steps(slow, k, v, 40, q)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    labels = fast.decode_state.labels
    assert labels.page_size >= 90 and fast.last_density == pytest.approx(12 / 90)
    if bits == 16:  # page b holds sequence b's labels: its keys' heavy channels, token by token
        want_labels = k.transpose(1, 2).gather(3, channels().expand(2, 90, -1, -1))
        torch.testing.assert_close(labels.labels[:, :90], want_labels, atol=0, rtol=0)
    assert not torch.allclose(got, dense_rows(q, k, v, 40), atol=1e-3)  # really sparse


@pytest.mark.parametrize("method", [ds(budget=12), KVPruning(KVPruningConfig(sparsity=0.5, recent_tokens=4, compress_every=8))],
                         ids=["double_sparsity", "pruning"])
def test_state_resets_on_new_prompt(method):
    q1, k1, v1 = qkv(1, 60, 60, seed=1)
    q2, k2, v2 = qkv(1, 60, 60, seed=2)
    used = SparseAttention(decode=method)
    decode_steps(used, k1, v1, 40, q1)  # absorbs prompt 1 (60 tokens)
    fresh = SparseAttention(decode=method)
    # Prompt 2 is longer than what was absorbed of prompt 1 at its first decode step: only its prefill can tell.
    torch.testing.assert_close(decode_steps(used, k2, v2, 50, q2), decode_steps(fresh, k2, v2, 50, q2))
    # A decode step that does not continue the absorbed context (another batch's cache) rebuilds the state.
    q3, k3, v3 = qkv(2, 1, 30, seed=3)
    torch.testing.assert_close(used(q3, k3, v3), SparseAttention(decode=method)(q3, k3, v3))
    assert used.decode_state.absorbed == 30 and used.decode_state.batch_size == 2
    used.reset_decode_state()
    assert used.decode_state.absorbed == 0


def test_bad_decode_config_names_the_field():
    with pytest.raises(ValueError, match="budget"):
        DoubleSparsityConfig(budget=0)
    with pytest.raises(ValueError, match="sparsity"):
        KVPruningConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="config.r"):
        DoubleSparsity(DoubleSparsityConfig(r=16, dense_below=0), channels(r=8))
    with pytest.raises(ValueError, match="decode"):
        SparseAttention(decode="double_sparsity")
    wide = DoubleSparsity(DoubleSparsityConfig(r=40, dense_below=0, min_budget=68), torch.zeros(HKV, 40, dtype=torch.long))
    q, k, v = qkv(1, 1, 10)
    with pytest.raises(ValueError, match="r \\(40\\) must be <= head_dim"):
        SparseAttention(decode=wide)(q, k, v)
    per_layer = DoubleSparsity(DoubleSparsityConfig(r=8), {0: channels(), 2: channels()})
    with pytest.raises(ValueError, match="layer 1 is missing"):
        per_layer.for_layer(1)
    with pytest.raises(ValueError, match="channels"):
        SparseAttention(decode=per_layer)


# ---------------------------------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("transformers")
    from sparse_attn.models.smollm2 import load_smollm2

    try:
        return load_smollm2(attn_implementation="sdpa")
    except FileNotFoundError as error:
        pytest.skip(str(error))


def test_configure_rejects_missing_layer_and_bad_r(smollm2):
    model, _ = smollm2
    config = DoubleSparsityConfig(r=16)
    partial = {i: torch.zeros(3, 16, dtype=torch.long) for i in range(29)}  # layer 29 missing
    with pytest.raises(ValueError, match="layer 29 is missing"):
        sparse_attn.configure(model, decode=DoubleSparsity(config, partial))
    with pytest.raises(ValueError, match="per-layer channels"):
        sparse_attn.configure(model, decode=DoubleSparsity(config, torch.zeros(3, 16, dtype=torch.long)))
    wide = DoubleSparsityConfig(r=80, min_budget=80)
    with pytest.raises(ValueError, match="head_dim"):
        sparse_attn.configure(model, decode=DoubleSparsity(wide, {i: torch.zeros(3, 80, dtype=torch.long) for i in range(30)}))


def test_smollm2_passkey_with_double_sparsity(smollm2):
    from sparse_attn.models.smollm2 import make_passkey_prompt, passkey_answer

    model, tokenizer = smollm2
    channels = sparse_attn.calibrate_double_sparsity(model, tokenizer, r=16, tokens=512)
    assert len(channels) == 30 and all(c.shape == (3, 16) for c in channels.values())
    key = 70917
    prompt = make_passkey_prompt(tokenizer, 2000, 0.5, key)
    model.set_attn_implementation("sdpa")
    assert str(key) in passkey_answer(model, tokenizer, prompt, max_new_tokens=6)  # dense retrieves it
    config = DoubleSparsityConfig(r=16, budget_fraction=1 / 8, min_budget=128, dense_below=0)
    sparse_attn.configure(model, decode=DoubleSparsity(config, channels), dense_below=1 << 20)  # dense prefill
    try:
        assert str(key) in passkey_answer(model, tokenizer, prompt, max_new_tokens=6)
        attn = model.model.layers[3].self_attn.sparse_attention
        assert attn.decode_state.absorbed > 2000 and attn.last_density <= 1 / 8 + 1e-3  # DS really ran, within budget
    finally:
        sparse_attn.reset_decode_state(model)
        model.set_attn_implementation("sdpa")
