"""The attention entry point: CPU op against the reference, log-sum-exp merging, backend choice, input errors."""

import random

import pytest
import torch
import torch.nn.functional as F

import sparse_attn
from sparse_attn import BlockSparseMask, Dense, TopKBlocks, block_sparse_attention
from sparse_attn.ops import cpu as cpu_op
from sparse_attn.ops import resolve_backend


def qkv(b=1, hq=4, hkv=2, sq=40, skv=40, d=16, dtype=torch.float32):
    return (torch.randn(b, hq, sq, d, dtype=dtype), torch.randn(b, hkv, skv, d, dtype=dtype),
            torch.randn(b, hkv, skv, d, dtype=dtype))


def dense_mask(sq, skv, block=16):
    return Dense().build_mask(q_lens=sq, kv_lens=skv, num_heads=1, q_block_size=block, kv_block_size=block)


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    return seed


@pytest.mark.parametrize("sq,skv,hq,hkv", [(40, 40, 4, 2), (1, 33, 3, 1), (17, 64, 8, 8), (64, 64, 8, 1)])
def test_dense_mask_equals_sdpa(sq, skv, hq, hkv):
    q, k, v = qkv(2, hq, hkv, sq, skv)
    out = block_sparse_attention(q, k, v, dense_mask(sq, skv), backend="cpu")
    allowed = torch.ones(sq, skv, dtype=torch.bool).tril(skv - sq)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


def test_cpu_op_chunks_match_unchunked(monkeypatch):
    """The PyTorch CPU op (called directly: the "cpu" backend prefers the C++ kernel where it is built)."""
    q, k, v = qkv(1, 2, 1, 100, 100)
    mask = TopKBlocks(k=3).build_mask(q_lens=100, kv_lens=100, num_heads=2, q_block_size=16, kv_block_size=16,
                                      q=q[0].transpose(0, 1), k=k[0].transpose(0, 1)).expand(1, 2)
    q_t, k_t, v_t = (t[0].transpose(0, 1) for t in (q, k, v))
    whole = cpu_op.block_sparse_attention_cpu(q_t, k_t, v_t, [0, 100], [0, 100], mask, True, 0.25)
    monkeypatch.setattr(cpu_op, "_CHUNK_BYTES", 1)  # one query block per chunk
    chunked = cpu_op.block_sparse_attention_cpu(q_t, k_t, v_t, [0, 100], [0, 100], mask, True, 0.25)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(block_sparse_attention(q, k, v, mask, backend="cpu", scale=0.25, return_lse=True)[0],
                               whole[0].transpose(0, 1)[None], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_lse_merges_disjoint_block_sets_into_dense(backend):
    """softmax over A u B = w_A * out_A + w_B * out_B with w_X = exp(lse_X - logaddexp(lse_A, lse_B))."""
    sq = skv = 64
    q, k, v = qkv(1, 2, 2, sq, skv)
    keep = dense_mask(sq, skv).to_block_bool()
    split = torch.rand(keep.shape) < 0.5
    parts = [BlockSparseMask.from_block_bool(keep & s, q_block_size=16, kv_block_size=16, q_len=sq, kv_len=skv) for s in (split, ~split)]
    (oa, la), (ob, lb) = (block_sparse_attention(q, k, v, m, return_lse=True, backend=backend) for m in parts)
    lse = torch.logaddexp(la, lb)
    wa = torch.exp(la - lse).nan_to_num(0.0).unsqueeze(-1)
    wb = torch.exp(lb - lse).nan_to_num(0.0).unsqueeze(-1)
    full, full_lse = block_sparse_attention(q, k, v, dense_mask(sq, skv), return_lse=True, backend=backend)
    torch.testing.assert_close(wa * oa + wb * ob, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)


def test_empty_rows_and_empty_sequences():
    q, k, v = qkv(1, 1, 1, 32, 32)
    keep = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    keep[0, 0, 1, 0] = True
    mask = BlockSparseMask.from_block_bool(keep, q_block_size=16, kv_block_size=16, q_len=32, kv_len=32)
    for backend in ("cpu", "reference"):
        out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend)
        assert torch.all(out[..., :16, :] == 0) and torch.all(torch.isneginf(lse[..., :16]))
        assert torch.isfinite(lse[..., 16:]).all()
    # varlen batch whose first sequence has no queries and second no keys at all (non-causal)
    qt, kt = torch.randn(5, 2, 8), torch.randn(3, 2, 8)
    cu_q, cu_k = torch.tensor([0, 0, 5], dtype=torch.int32), torch.tensor([0, 3, 3], dtype=torch.int32)
    mask = Dense().build_mask(q_lens=[0, 5], kv_lens=[3, 0], num_heads=2, causal=False)
    out, lse = block_sparse_attention(qt, kt, kt, mask, causal=False, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_low_precision_inputs_keep_their_dtype():
    q, k, v = qkv(1, 2, 1, 32, 32, dtype=torch.bfloat16)
    out = block_sparse_attention(q, k, v, dense_mask(32, 32), backend="cpu")
    assert out.dtype == torch.bfloat16
    expected = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("SPARSE_ATTN_BACKEND", raising=False)
    assert resolve_backend(None, torch.device("cpu")) == "cpu"
    assert resolve_backend("reference", torch.device("cpu")) == "reference"
    monkeypatch.setenv("SPARSE_ATTN_BACKEND", "reference")
    assert resolve_backend(None, torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("fast", torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA|not built"):
        resolve_backend("cuda", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET|not importable"):
        resolve_backend("triton", torch.device("cpu"))


def _call(q=None, k=None, v=None, mask=None, **kw):
    dq, dk, dv = qkv(1, 4, 2, 32, 32)
    return block_sparse_attention(dq if q is None else q, dk if k is None else k, dv if v is None else v,
                                  dense_mask(32, 32) if mask is None else mask, **kw)


@pytest.mark.parametrize("kwargs,message", [
    (dict(q=torch.randn(4, 32, 16)), "q must have rank 4"),
    (dict(k=torch.randn(1, 2, 32, 16, dtype=torch.float64)), "k has dtype"),
    (dict(q=torch.randn(1, 4, 32, 16).to(torch.int32)), "q has dtype"),
    (dict(v=torch.randn(1, 2, 31, 16)), "k and v must have the same shape"),
    (dict(k=torch.randn(1, 3, 32, 16), v=torch.randn(1, 3, 32, 16)), "multiple of the number of KV heads"),
    (dict(k=torch.randn(1, 2, 32, 8), v=torch.randn(1, 2, 32, 8)), "head_dim"),
    (dict(k=torch.randn(2, 2, 32, 16), v=torch.randn(2, 2, 32, 16)), "batch"),
    (dict(q=torch.randn(1, 4, 40, 16)), "q_len 40 > kv_len 32"),
    (dict(mask=Dense().build_mask(q_lens=32, kv_lens=16, num_heads=1, causal=False)), "kv_len 16"),
    (dict(mask=dense_mask(16, 16)), "too few for q_len 32"),
    (dict(mask=sparse_attn.Strided(2).build_mask(q_lens=32, kv_lens=32, num_heads=3)), "mask heads 3"),
    (dict(mask="dense"), "mask must be a BlockSparseMask"),
    (dict(scale=-1.0), "scale must be positive"),
    (dict(backend="gpu"), "backend must be one of"),
    (dict(cu_seqlens_q=torch.tensor([0, 32], dtype=torch.int32)), "rank 3"),
])
def test_bad_inputs_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _call(**kwargs)


def test_bad_mask_values_and_cu_seqlens():
    keep = dense_mask(32, 32).to_block_bool()
    mask = BlockSparseMask.from_block_bool(keep, q_block_size=16, kv_block_size=16, q_len=32, kv_len=32)
    broken = BlockSparseMask(mask.kv_num_blocks, mask.kv_indices + 5, 16, 16, 32, 32)
    with pytest.raises(ValueError, match="out of range"):
        _call(mask=broken)
    q, k = torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    m = Dense().build_mask(q_lens=[4, 6], kv_lens=[4, 6], num_heads=2)
    for cu_q, message in (([0, 4, 9], "ends at 9"), ([0, 6, 4, 10], "non-decreasing"), ([1, 4, 10], "start at 0")):
        with pytest.raises(ValueError, match=message):
            block_sparse_attention(q, k, k, m, cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32),
                                   cu_seqlens_k=torch.tensor([0, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="both cu_seqlens_q and cu_seqlens_k"):
        block_sparse_attention(q, k, k, m, cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32))


def test_public_api_exports():
    for name in ("BlockSparseMask", "block_sparse_attention", "Dense", "AShape", "Strided", "VerticalSlash", "TopKBlocks", "PerHead"):
        assert hasattr(sparse_attn, name)
