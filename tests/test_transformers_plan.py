"""The transformers integration's defaults and plans: unconfigured and pattern-less layers run the content-aware
default, ``configure(model, plan=...)`` gives each layer the plan's patterns, block sizes and decode method, and a
plan made for another model, or given beside a pattern, is refused with the reason."""

import pytest
import torch

import sparse_attn
from sparse_attn import SparseAttention
from sparse_attn.decode import DoubleSparsity, KVPruning
from sparse_attn.integrations.transformers import attention_modules
from sparse_attn.patterns import AShape, Dense, HeadProxy, PerHead, default_pattern
from sparse_attn.planner import HeadSetting, ModelShape, Plan, PlanError

transformers = pytest.importorskip("transformers")

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 3, 4, 2, 16


@pytest.fixture
def model():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=HEADS * HEAD_DIM, intermediate_size=64,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      num_key_value_heads=KV_HEADS, max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def plan(shape=ModelShape(LAYERS, HEADS, KV_HEADS, HEAD_DIM)) -> Plan:
    """Layer 0 mixes a window and head-proxy per head, layer 1 is dense, layer 2 all head-proxy; layer 0 decodes
    with Double Sparsity, layer 2 with KV pruning."""
    window = HeadSetting("AShape", {"sink_tokens": 16, "local_tokens": 32})
    proxy = HeadSetting("HeadProxy", {"gamma": 0.9, "min_budget": 32})
    heads = [[window, proxy, window, proxy], [HeadSetting("Dense", {})] * HEADS, [proxy] * HEADS]
    decode = [{"double_sparsity": {"r": 4, "budget_fraction": 0.25, "channels": [[0, 1, 2, 3], [4, 5, 6, 7]]}},
              None, {"kv_pruning": {"sparsity": 0.5}}]
    return Plan("tiny-llama", shape, heads, q_block_size=16, kv_block_size=16, decode=decode)


def test_defaults_are_content_aware():
    assert isinstance(SparseAttention().pattern, HeadProxy)
    assert default_pattern() == HeadProxy(gamma=0.95, q_stride=4, min_budget=2048, dense_tail=128, fit_blocks=8,
                                         head_scores=True, pooling="mean")


def test_configure_without_a_pattern_uses_the_default(model):
    sparse_attn.configure(model)
    for module in attention_modules(model).values():
        assert module.sparse_attention.pattern == default_pattern()


@pytest.mark.parametrize("as_path", [False, True])
def test_configure_with_a_plan(model, tmp_path, as_path):
    given = plan()
    if as_path:
        given.save(tmp_path / "plan.json")
        given = str(tmp_path / "plan.json")
    ids = torch.randint(0, 64, (1, 100))
    with torch.no_grad():
        dense = model(ids).logits
    sparse_attn.configure(model, plan=given, dense_below=0)
    layers = {i: m.sparse_attention for i, m in attention_modules(model).items()}
    assert isinstance(layers[0].pattern, PerHead) and isinstance(layers[1].pattern, Dense)
    assert all(a.q_block_size == 16 and a.kv_block_size == 16 for a in layers.values())
    assert isinstance(layers[0].decode, DoubleSparsity) and layers[0].decode.channels.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layers[1].decode is None and isinstance(layers[2].decode, KVPruning)
    assert layers[2].decode.config.sparsity == 0.5
    with torch.no_grad():
        sparse = model(ids).logits
    assert layers[0].last_density < 1.0  # the window heads skip blocks at 100 tokens
    assert layers[1].last_density == 1.0
    assert not torch.allclose(sparse, dense, atol=1e-4)  # the plan changed what the model computes


def test_plan_for_another_model_is_refused(model):
    with pytest.raises(PlanError, match="head_dim: plan 32, model 16"):
        sparse_attn.configure(model, plan=plan(ModelShape(LAYERS, HEADS, KV_HEADS, 32)))


def test_plan_excludes_patterns_and_decode(model):
    with pytest.raises(ValueError, match="plan: give either a plan or pattern"):
        sparse_attn.configure(model, AShape(), plan=plan())
    with pytest.raises(ValueError, match="must be a sparse_attn.planner.Plan or a path"):
        sparse_attn.configure(model, plan=42)


def test_sparse_attention_from_a_plan(tmp_path):
    given = plan()
    given.save(tmp_path / "plan.json")
    for source in (given, str(tmp_path / "plan.json")):
        layers = [SparseAttention.from_plan(source, i, dense_below=0) for i in range(LAYERS)]
        assert isinstance(layers[0].pattern, PerHead) and isinstance(layers[1].pattern, Dense)
        assert all(a.q_block_size == 16 and a.kv_block_size == 16 for a in layers)
        assert isinstance(layers[0].decode, DoubleSparsity) and layers[1].decode is None
        assert isinstance(layers[2].decode, KVPruning)
    torch.manual_seed(1)
    q = torch.randn(1, HEADS, 100, HEAD_DIM)
    k, v = torch.randn(1, KV_HEADS, 100, HEAD_DIM), torch.randn(1, KV_HEADS, 100, HEAD_DIM)
    out = layers[0](q, k, v)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                             is_causal=True)
    assert layers[0].last_density < 1.0 and not torch.allclose(out, dense, atol=1e-4)
    assert torch.allclose(layers[1](q, k, v), dense, atol=1e-5)  # the plan's dense layer
    for bad in (LAYERS, -1, "0"):
        with pytest.raises(ValueError, match="layer must be an int"):
            SparseAttention.from_plan(given, bad)
