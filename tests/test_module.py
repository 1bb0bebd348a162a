"""SparseAttention: the PyTorch drop-in agrees with SDPA in the dense setting, takes the documented paths, rejects bad input."""

import pytest
import torch
import torch.nn.functional as F

from sparse_attn import AShape, Dense, SparseAttention, TopKBlocks


def qkv(batch=2, hq=6, hkv=2, sq=200, skv=200, d=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h, s: torch.randn(batch, h, s, d, generator=g, dtype=torch.float64).to(dtype)
    return make(hq, sq), make(hkv, skv), make(hkv, skv)


def sdpa_bottom_right(q, k, v, causal=True, scale=None):
    """float64 SDPA with queries as the last positions of the context."""
    q, k, v = (t.double() for t in (q, k, v))
    allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2]) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("dense_below", [0, 10_000])
def test_dense_setting_matches_sdpa(hq, hkv, dense_below):
    q, k, v = qkv(hq=hq, hkv=hkv, sq=131, skv=131)
    attn = SparseAttention(Dense(), dense_below=dense_below, backend="cpu")
    out = attn(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), sdpa_bottom_right(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dense_below", [0, 10_000])
def test_chunked_queries_align_bottom_right(dense_below):
    q, k, v = qkv(sq=70, skv=250)
    out = SparseAttention(dense_below=dense_below, backend="cpu")(q, k, v, scale=0.3)
    torch.testing.assert_close(out.double(), sdpa_bottom_right(q, k, v, scale=0.3), atol=1e-5, rtol=1e-5)


def test_not_causal():
    q, k, v = qkv(sq=40, skv=150)
    out = SparseAttention(dense_below=0, backend="cpu")(q, k, v, is_causal=False)
    torch.testing.assert_close(out.double(), sdpa_bottom_right(q, k, v, causal=False), atol=1e-5, rtol=1e-5)


def test_dense_below_picks_the_path():
    q, k, v = qkv(sq=256, skv=256)
    attn = SparseAttention(AShape(sink_tokens=16, local_tokens=64), q_block_size=32, kv_block_size=32, dense_below=257,
                           backend="cpu")
    dense = attn(q, k, v)
    assert attn.last_density == 1.0
    torch.testing.assert_close(dense.double(), sdpa_bottom_right(q, k, v), atol=1e-5, rtol=1e-5)
    attn.dense_below = 256  # the context now counts as long: the A-shape mask runs
    sparse = attn(q, k, v)
    assert attn.last_density == pytest.approx(attn.build_mask(q, k).density()) and attn.last_density < 0.8
    assert (sparse - dense).abs().max() > 1e-3  # far keys were really dropped


def test_return_lse_matches_logsumexp():
    q, k, v = qkv(sq=50, skv=90)
    for dense_below in (0, 10_000):  # the short-context path also gives an lse
        out, lse = SparseAttention(dense_below=dense_below, backend="cpu")(q, k, v, return_lse=True)
        scores = torch.einsum("bhmd,bhnd->bhmn", q.double(), k.double().repeat_interleave(3, 1)) * 32 ** -0.5
        allowed = torch.ones(50, 90, dtype=torch.bool).tril(40)
        expected = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), -1)
        assert lse.shape == (2, 6, 50)
        torch.testing.assert_close(lse.double(), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.double(), sdpa_bottom_right(q, k, v), atol=1e-5, rtol=1e-5)


def test_prebuilt_mask_is_used_and_reusable():
    q, k, v = qkv(sq=192, skv=192)
    attn = SparseAttention(TopKBlocks(k=2), q_block_size=32, kv_block_size=32, dense_below=0, backend="cpu")
    mask = attn.build_mask(q, k)
    assert mask.batch == 2 and mask.heads == 6 and mask.kv_len == 192  # content-aware: per sequence and head
    first = attn(q, k, v, mask=mask)
    assert attn.last_density == pytest.approx(mask.density())
    torch.testing.assert_close(first, attn(q, k, v))
    # The plan runs with other values, and a mask of another pattern wins over the module's own pattern.
    v2 = torch.randn_like(v)
    torch.testing.assert_close(attn(q, k, v2, mask=mask), attn(q, k, v2))
    dense_mask = SparseAttention(Dense(), q_block_size=32, kv_block_size=32).build_mask(q, k)
    torch.testing.assert_close(attn(q, k, v, mask=dense_mask).double(), sdpa_bottom_right(q, k, v), atol=1e-5, rtol=1e-5)
    assert attn.last_density == 1.0


def test_static_pattern_mask_broadcasts_over_batch():
    q, k, _ = qkv(batch=3, sq=128, skv=128)
    mask = SparseAttention(AShape(sink_tokens=32, local_tokens=32), q_block_size=32, kv_block_size=32).build_mask(q, k)
    assert mask.batch == 1 and mask.heads == 1


def test_half_precision_runs():
    q, k, v = qkv(sq=96, skv=96, dtype=torch.bfloat16)
    out = SparseAttention(dense_below=0, backend="cpu")(q, k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), sdpa_bottom_right(q, k, v), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dense_below", [0, 10_000])
@pytest.mark.parametrize("bad,arg", [
    (lambda q, k, v: (q[0], k, v), "q"),
    (lambda q, k, v: (q, k.double(), v), "k"),
    (lambda q, k, v: (q, k, v[:, :, :-1]), "v"),
    (lambda q, k, v: (q[:, :5], k, v), "heads"),
    (lambda q, k, v: (q.int(), k, v), "q"),
])
def test_bad_inputs_raise_value_error(bad, arg, dense_below):
    q, k, v = qkv(sq=64, skv=64)
    with pytest.raises(ValueError, match=arg):
        SparseAttention(dense_below=dense_below, backend="cpu")(*bad(q, k, v))


def test_bad_arguments_raise_value_error():
    q, k, v = qkv(sq=64, skv=32)
    attn = SparseAttention(backend="cpu")
    with pytest.raises(ValueError, match="q_len"):
        attn(q, k, v)  # causal: more queries than keys
    with pytest.raises(ValueError, match="scale"):
        attn(k, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="mask"):
        attn(k, k, v, mask="not a mask")
    with pytest.raises(ValueError, match="pattern"):
        SparseAttention("ashape")
    with pytest.raises(ValueError, match="dense_below"):
        SparseAttention(dense_below=-1)
    with pytest.raises(ValueError, match="q_block_size"):
        SparseAttention(q_block_size=0)
