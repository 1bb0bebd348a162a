"""The Triton block-sparse prefill kernel (under the CPU interpreter here) and the CPU op, against the float64 reference.

Every case runs through the public entry point with the varlen layout, fp32 inputs, fresh random inputs per test
(the seed is in every failure message). With CUDA and TRITON_INTERPRET=0 the same tests run the compiled kernel.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/conftest.py does the same)


import pytest
import torch

from sparse_attn import AShape, BlockSparseMask, Dense, Strided, TopKBlocks, block_sparse_attention
from backends import BACKENDS, DEVICE, ON_GPU, TRITON_RUNS
from sparse_attn.ops.reference import attention_reference_varlen

TOL = dict(atol=1e-4, rtol=1e-4)


def offsets(lens):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def make_qkv(gen, q_lens, kv_lens, hq, hkv, d, dtype=torch.float32):
    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    return randn(sum(q_lens), hq, d), randn(sum(kv_lens), hkv, d), randn(sum(kv_lens), hkv, d)


def run_and_compare(backend, q, k, v, q_lens, kv_lens, mask, causal, seed, *, scale=None, dense_reference=False, tol=TOL):
    """Run the public entry on varlen inputs and compare out and lse with the float64 reference (of plain attention
    with ``dense_reference``). Returns (out, lse)."""
    cu_q, cu_k = offsets(q_lens), offsets(kv_lens)
    as_tensor = lambda cu: torch.tensor(cu, dtype=torch.int32, device=q.device)
    out, lse = block_sparse_attention(
        q, k, v, mask, causal=causal, scale=scale, cu_seqlens_q=as_tensor(cu_q), cu_seqlens_k=as_tensor(cu_k),
        return_lse=True, backend=backend,
    )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ref_mask = None if dense_reference else mask
    ref_out, ref_lse = attention_reference_varlen(q, k, v, cu_q, cu_k, ref_mask, causal, scale, compute_dtype=torch.float64)
    context = f"seed={seed} backend={backend} q_lens={q_lens} kv_lens={kv_lens} causal={causal}"
    assert out.shape == q.shape and out.dtype == q.dtype, context
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32, context
    assert torch.isfinite(out).all(), f"non-finite output, {context}"
    torch.testing.assert_close(out.double(), ref_out, **tol, msg=lambda m: f"out: {m}\n{context}")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"lse -inf rows differ, {context}"
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], **tol, msg=lambda m: f"lse: {m}\n{context}")
    return out, lse


def pattern_mask(pattern, q_lens, kv_lens, hq, causal, q, k, block=(16, 16)):
    return pattern.build_mask(
        q_lens=q_lens, kv_lens=kv_lens, num_heads=hq, q_block_size=block[0], kv_block_size=block[1], causal=causal,
        device=DEVICE, q=q, k=k, cu_seqlens_q=offsets(q_lens), cu_seqlens_k=offsets(kv_lens),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_len,kv_len,hq,hkv", [(37, 37, 2, 2), (1, 50, 3, 1), (20, 70, 8, 1)])
def test_dense_pattern_is_dense_attention(backend, rng, q_len, kv_len, hq, hkv):
    gen, seed = rng
    q, k, v = make_qkv(gen, [q_len], [kv_len], hq, hkv, 64)
    mask = pattern_mask(Dense(), [q_len], [kv_len], hq, True, q, k)
    run_and_compare(backend, q, k, v, [q_len], [kv_len], mask, True, seed, dense_reference=True)


# (pattern, q_len, kv_len, hq, hkv, causal): GQA 1/3/8, decode (q_len 1), chunked prefill (q_len < kv_len), non-causal.
PATTERN_CASES = {
    "ashape-gqa3": (AShape(sink_tokens=16, local_tokens=24), 70, 70, 3, 1, True),
    "strided-gqa8": (Strided(stride=2, local_blocks=1), 50, 50, 8, 1, True),
    "topk-gqa1": (TopKBlocks(k=2), 45, 45, 2, 2, True),
    "topk-decode": (TopKBlocks(k=2), 1, 50, 4, 2, True),
    "ashape-chunked": (AShape(sink_tokens=8, local_tokens=20), 20, 70, 4, 2, True),
    "strided-chunked": (Strided(stride=3, local_blocks=1), 33, 81, 3, 3, True),
    "strided-noncausal": (Strided(stride=2, local_blocks=1), 30, 45, 4, 2, False),
    "topk-noncausal": (TopKBlocks(k=1), 40, 24, 2, 1, False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", PATTERN_CASES.keys())
def test_patterns(backend, rng, case):
    gen, seed = rng
    pattern, q_len, kv_len, hq, hkv, causal = PATTERN_CASES[case]
    q, k, v = make_qkv(gen, [q_len], [kv_len], hq, hkv, 64)
    mask = pattern_mask(pattern, [q_len], [kv_len], hq, causal, q, k)
    assert mask.density(causal) < 1.0, "the case should be sparse"
    run_and_compare(backend, q, k, v, [q_len], [kv_len], mask, causal, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_random_blocks_with_empty_rows(backend, rng, causal):
    """Arbitrary legal masks: random kept blocks, an all-False row, and (causal) a row whose only block is above the
    diagonal. Rows that see no key must give out 0 and lse -inf, without NaN."""
    gen, seed = rng
    q_len = kv_len = 60
    hq, hkv, nq, nk = 4, 2, 4, 4
    keep = torch.rand(1, hq, nq, nk, generator=gen) < 0.5
    keep[0, 1, 2] = False  # head 1, query block 2 reads nothing
    keep[0, 2, 0] = False
    keep[0, 2, 0, 1] = True  # head 2, query block 0 reads only keys 16..31: causally invisible to rows 0..15
    mask = BlockSparseMask.from_block_bool(keep.to(DEVICE), q_block_size=16, kv_block_size=16, q_len=q_len, kv_len=kv_len)
    q, k, v = make_qkv(gen, [q_len], [kv_len], hq, hkv, 64)
    out, lse = run_and_compare(backend, q, k, v, [q_len], [kv_len], mask, causal, seed)
    assert (out[32:48, 1] == 0).all() and torch.isneginf(lse[1, 32:48]).all(), f"seed={seed}"
    if causal:
        assert (out[:16, 2] == 0).all() and torch.isneginf(lse[2, :16]).all(), f"seed={seed}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_ragged_batch(backend, rng, causal):
    """Varlen batch with different q/kv lengths per sequence, empty queries, and an empty context (with queries when
    non-causal: they see no key)."""
    gen, seed = rng
    q_lens, kv_lens = [17, 0, 40, 1, 0 if causal else 3], [33, 20, 40, 64, 0]
    q, k, v = make_qkv(gen, q_lens, kv_lens, 6, 2, 64)
    mask = pattern_mask(AShape(sink_tokens=16, local_tokens=20), q_lens, kv_lens, 6, causal, q, k)
    run_and_compare(backend, q, k, v, q_lens, kv_lens, mask, causal, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_broadcast_over_ragged_batch(backend, rng):
    """One mask (batch 1, heads 1: stride-0 views) built for the longest sequence: shorter sequences must ignore the
    keys of kept blocks that lie past their own context."""
    gen, seed = rng
    q_lens, kv_lens = [10, 25, 3], [50, 25, 64]
    keep = torch.rand(1, 1, 2, 4, generator=gen) < 0.7
    keep[..., 3] = True  # the last block exists only in the longest sequence
    mask = BlockSparseMask.from_block_bool(keep.to(DEVICE), q_block_size=16, kv_block_size=16, q_len=25, kv_len=64)
    q, k, v = make_qkv(gen, q_lens, kv_lens, 4, 4, 64)
    run_and_compare(backend, q, k, v, q_lens, kv_lens, mask, False, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim,blocks", [(96, (16, 16)), (96, (32, 16)), (64, (16, 32)), (96, (256, 128))])
def test_head_dim_and_block_sizes(backend, rng, head_dim, blocks):
    """head_dim 96 pads the D tile to 128; unequal block sizes; blocks larger than the kernel's tiles are split."""
    gen, seed = rng
    q_len, kv_len = (70, 70) if blocks[0] <= 32 else (300, 300)
    q, k, v = make_qkv(gen, [q_len], [kv_len], 2, 1, head_dim)
    mask = pattern_mask(Strided(stride=2, local_blocks=1), [q_len], [kv_len], 2, True, q, k, block=blocks)
    run_and_compare(backend, q, k, v, [q_len], [kv_len], mask, True, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_and_custom_scale(backend, rng):
    """q/k/v sliced from one fused projection (non-contiguous, arbitrary strides) and a non-default scale."""
    gen, seed = rng
    q_len = kv_len = 40
    qkv = torch.randn(q_len, 4 + 2 * 2, 64, generator=gen).to(DEVICE)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    mask = pattern_mask(TopKBlocks(k=2), [q_len], [kv_len], 4, True, q, k)
    run_and_compare(backend, q, k, v, [q_len], [kv_len], mask, True, seed, scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_layout(backend, rng):
    """The padded [B, H, S, D] entry (the dispatcher turns it into strided varlen views)."""
    gen, seed = rng
    b, hq, hkv, s, d = 2, 4, 2, 35, 64
    q = torch.randn(b, hq, s, d, generator=gen).to(DEVICE)
    k, v = (torch.randn(b, hkv, s, d, generator=gen).to(DEVICE) for _ in range(2))
    mask = Dense().build_mask(q_lens=s, kv_lens=s, num_heads=1, q_block_size=16, kv_block_size=16, device=DEVICE)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend)
    to_varlen = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1], d)
    ref_out, ref_lse = attention_reference_varlen(
        to_varlen(q), to_varlen(k), to_varlen(v), [0, s, 2 * s], [0, s, 2 * s], None, True, d ** -0.5,
        compute_dtype=torch.float64,
    )
    torch.testing.assert_close(out.double(), ref_out.view(b, s, hq, d).transpose(1, 2), **TOL, msg=lambda m: f"{m} seed={seed}")
    torch.testing.assert_close(lse, ref_lse.view(hq, b, s).transpose(0, 1), **TOL, msg=lambda m: f"{m} seed={seed}")


@pytest.mark.skipif(not TRITON_RUNS, reason="triton cannot run here")
@pytest.mark.parametrize("field,blocks,head_dim", [
    ("q_block_size", (24, 16), 64), ("kv_block_size", (16, 48), 64), ("kv_block_size", (16, 8), 64),
    ("head_dim", (16, 16), 320),
])
def test_unsupported_shapes_raise(field, blocks, head_dim):
    """Block sizes must be powers of two >= 16 (tl.dot tiles), head_dim at most 256: ValueError naming the field."""
    q = k = v = torch.zeros(1, 1, 48, head_dim, device=DEVICE)
    mask = Dense().build_mask(q_lens=48, kv_lens=48, num_heads=1, q_block_size=blocks[0], kv_block_size=blocks[1], device=DEVICE)
    with pytest.raises(ValueError, match=field):
        block_sparse_attention(q, k, v, mask, backend="triton")


@pytest.mark.skipif(not TRITON_RUNS, reason="triton cannot run here")
@pytest.mark.parametrize("dtype", [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not ON_GPU, reason="the interpreter's bf16 tl.dot is wrong")),
])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_half_precision(rng, dtype, head_dim):
    """fp16/bf16 inputs (P is rounded to the input dtype before P @ V, as in every FlashAttention)."""
    gen, seed = rng
    if ON_GPU:
        q_lens, kv_lens, blocks = [300, 1, 129], [300, 700, 1000], (128, 64)
    else:
        q_lens, kv_lens, blocks = [40, 1], [40, 70], (32, 16)
    q, k, v = make_qkv(gen, q_lens, kv_lens, 4, 2, head_dim, dtype)
    mask = pattern_mask(AShape(sink_tokens=16, local_tokens=32), q_lens, kv_lens, 4, True, q, k, block=blocks)
    run_and_compare("triton", q, k, v, q_lens, kv_lens, mask, True, seed, tol=dict(atol=2e-2, rtol=2e-2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [16, 32])
def test_paged_keys(backend, page_size, rng):
    """Keys read through a block table from shuffled pages (prefill, chunked prefill over cached pages, decode)
    equal the varlen result; the Triton kernel loads each tile's page ids itself."""
    gen, seed = rng
    q_lens, kv_lens = [40, 1, 17], [70, 33, 17]
    q, k, v = make_qkv(gen, q_lens, kv_lens, 4, 2, 32)
    keep = torch.rand(3, 4, 3, 5, generator=gen) < 0.6
    mask = BlockSparseMask.from_block_bool(keep.to(DEVICE), q_block_size=16, kv_block_size=16, q_len=40, kv_len=70)
    want, want_lse = run_and_compare(backend, q, k, v, q_lens, kv_lens, mask, True, seed)
    pages_per_seq = [-(-n // page_size) for n in kv_lens]
    order = torch.randperm(sum(pages_per_seq) + 2, generator=gen).tolist()
    k_pages = torch.randn(len(order), page_size, 2, 32, generator=gen).to(DEVICE)
    v_pages = torch.randn(len(order), page_size, 2, 32, generator=gen).to(DEVICE)
    table = torch.zeros(3, max(pages_per_seq), dtype=torch.int32)
    cu = offsets(kv_lens)
    for b, n in enumerate(kv_lens):
        for i in range(pages_per_seq[b]):
            page = order.pop()
            table[b, i] = page
            rows = slice(cu[b] + i * page_size, min(cu[b] + (i + 1) * page_size, cu[b + 1]))
            k_pages[page, : rows.stop - rows.start] = k[rows]
            v_pages[page, : rows.stop - rows.start] = v[rows]
    got, got_lse = block_sparse_attention(
        q, k_pages, v_pages, mask, cu_seqlens_q=torch.tensor(offsets(q_lens), dtype=torch.int32, device=DEVICE),
        block_table=table.to(DEVICE), kv_lens=kv_lens, return_lse=True, backend=backend)
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(got_lse, want_lse, **TOL, msg=lambda m: f"seed {seed}: {m}")
