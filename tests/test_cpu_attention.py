"""The C++ CPU kernel of block-sparse attention (sparse_attn._C.block_sparse_attention_cpu): against the float64
reference and the PyTorch CPU op on fresh random inputs and edge shapes, its dispatch, and its argument checks."""

import pytest
import torch

import sparse_attn.ops.attention as attention
from sparse_attn import BlockSparseMask, Dense, block_sparse_attention
from sparse_attn.ops.cpu import block_sparse_attention_cpu as torch_op
from sparse_attn.ops.extension import block_sparse_attention_cpu as cpp_op
from sparse_attn.ops.extension import extension, extension_available
from sparse_attn.ops.reference import attention_reference_varlen

pytestmark = pytest.mark.skipif(
    not extension_available("block_sparse_attention_cpu"),
    reason="sparse_attn._C with block_sparse_attention_cpu is not built (pip install --no-build-isolation -e .)",
)

# Max abs error against the float64 reference: fp32 accumulation, and for fp16/bf16 one rounding of the output.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def random_mask(gen, batch, heads, q_len, kv_len, bq, bk, density):
    """Random kept blocks, causal future included (the kernel masks those), so some rows read nothing."""
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    keep = torch.rand(batch, heads, nq, nk, generator=gen) < density
    return BlockSparseMask.from_block_bool(keep, q_block_size=bq, kv_block_size=bk, q_len=q_len, kv_len=kv_len)


def ragged(gen, q_lens, kv_lens, hq, hkv, dim, dtype):
    q = torch.randn(sum(q_lens), hq, dim, generator=gen).to(dtype)
    k = torch.randn(sum(kv_lens), hkv, dim, generator=gen).to(dtype)
    v = torch.randn(sum(kv_lens), hkv, dim, generator=gen).to(dtype)
    cu = lambda lens: [sum(lens[:i]) for i in range(len(lens) + 1)]  # noqa: E731
    return q, k, v, cu(q_lens), cu(kv_lens)


def check_against_reference(q, k, v, cu_q, cu_k, mask, causal, scale, seed, tol=None):
    out, lse = cpp_op(q, k, v, cu_q, cu_k, mask, causal, scale)
    batch = len(cu_q) - 1
    ref_out, ref_lse = attention_reference_varlen(q.double(), k.double(), v.double(), cu_q, cu_k,
                                                  mask.expand(batch, q.shape[1]), causal, scale, torch.float64)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    assert lse.shape == (q.shape[1], q.shape[0])
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), f"seed {seed}: rows without keys differ"
    assert torch.all(out.transpose(0, 1)[empty] == 0), f"seed {seed}: rows without keys must be 0"
    err = (out.double() - ref_out).abs().max().item() if out.numel() else 0.0
    assert err < (tol or TOL[q.dtype]), f"seed {seed}: max abs error {err}"
    if (~empty).any():
        lse_err = (lse.double() - ref_lse)[~empty].abs().max().item()
        assert lse_err < (tol or 1e-4), f"seed {seed}: lse error {lse_err}"
    return out, lse


@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2), (8, 2)])
@pytest.mark.parametrize("q_len, kv_len", [(1, 77), (45, 150), (150, 150), (300, 300)])
@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("density", [1.0, 0.4])
def test_matches_reference_fp32(rng, hq, hkv, q_len, kv_len, block, density):
    """GQA 1/3/4, decode (q_len 1), chunked prefill (q_len < kv_len), lengths off the block grid; blocks of 16 are
    gathered into tiles, blocks of 64 read in place; kv_len 300 spans several 256-key tiles."""
    gen, seed = rng
    q, k, v, cu_q, cu_k = ragged(gen, [q_len], [kv_len], hq, hkv, 32, torch.float32)
    if density == 1.0:
        mask = Dense().build_mask(q_lens=q_len, kv_lens=kv_len, num_heads=1, q_block_size=block, kv_block_size=block)
    else:
        mask = random_mask(gen, 1, hq, q_len, kv_len, block, block, density)
    check_against_reference(q, k, v, cu_q, cu_k, mask, True, 32 ** -0.5, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_ragged_batch_dtypes_and_empty_sequences(rng, dtype, causal):
    """A batch with a sequence of no queries, one of no keys (non-causal only), one decode row and chunked prefill;
    random per-(sequence, head) masks with empty rows and blocks past a sequence's end."""
    gen, seed = rng
    q_lens, kv_lens = ([0, 70, 1, 33], [40, 130, 90, 33]) if causal else ([0, 70, 5, 33], [40, 130, 0, 90])
    q, k, v, cu_q, cu_k = ragged(gen, q_lens, kv_lens, 6, 2, 64, dtype)
    mask = random_mask(gen, len(q_lens), 6, max(q_lens), max(kv_lens), 32, 32, 0.5)
    out, lse = check_against_reference(q, k, v, cu_q, cu_k, mask, causal, 0.125, seed)
    if dtype == torch.float32:
        ref_out, ref_lse = torch_op(q, k, v, cu_q, cu_k, mask, causal, 0.125)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bq, bk", [(1, 1), (1, 16), (32, 8), (16, 64), (48, 320)])
def test_block_shapes(rng, bq, bk):
    """Token-level decode masks (blocks of 1), query blocks larger or smaller than KV blocks, and a KV block longer
    than one tile of keys."""
    gen, seed = rng
    q_len, kv_len = (1, 700) if bq == 1 else (96, 700)
    q, k, v, cu_q, cu_k = ragged(gen, [q_len, q_len], [kv_len, kv_len - 37], 4, 2, 16, torch.float32)
    mask = random_mask(gen, 2, 4, q_len, kv_len, bq, bk, 0.5)
    check_against_reference(q, k, v, cu_q, cu_k, mask, True, 0.25, seed)


def test_gqa_heads_with_equal_mask_rows(rng):
    """Per-head masks whose query heads agree within a KV group for some query blocks and not for others: agreeing
    heads share one stacked Q tile in the kernel, the others run alone."""
    gen, seed = rng
    q, k, v, cu_q, cu_k = ragged(gen, [120], [200], 8, 2, 32, torch.float32)
    keep = torch.rand(1, 2, 4, 7, generator=gen) < 0.5
    keep = keep.repeat_interleave(4, dim=1)  # [1, 8, 4, 7]: the 4 heads of a group agree
    keep[0, 1, 2] = ~keep[0, 1, 2]  # except head 1 on query block 2
    mask = BlockSparseMask.from_block_bool(keep, q_block_size=32, kv_block_size=32, q_len=120, kv_len=200)
    check_against_reference(q, k, v, cu_q, cu_k, mask, True, 0.2, seed)


def test_empty_mask_rows_give_zero_and_neg_inf(rng):
    gen, seed = rng
    q, k, v, cu_q, cu_k = ragged(gen, [64], [64], 2, 1, 16, torch.float32)
    keep = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    keep[0, 0, 3, :2] = True  # head 0 reads two blocks in its last query block; everything else reads nothing
    mask = BlockSparseMask.from_block_bool(keep, q_block_size=16, kv_block_size=16, q_len=64, kv_len=64)
    out, lse = check_against_reference(q, k, v, cu_q, cu_k, mask, True, 0.25, seed)
    assert torch.isfinite(lse[0, 48:]).all() and torch.isneginf(lse[0, :48]).all() and torch.isneginf(lse[1]).all()
    assert torch.all(out[:48] == 0) and torch.all(out[:, 1] == 0)


def test_broadcast_mask_strided_inputs_and_large_logits(rng):
    """A mask of batch 1 and head 1 read through broadcasting; q/k/v as views of one packed projection (token stride
    larger than heads * head_dim, read in place); logits of magnitude ~100 (the online softmax rescales)."""
    gen, seed = rng
    hq, hkv, dim, lens = 4, 2, 32, [130, 200]
    qkv = torch.randn(sum(lens), hq + 2 * hkv, dim, generator=gen) * 3
    q, k, v = qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]
    cu = [0, lens[0], sum(lens)]
    mask = random_mask(gen, 1, 1, max(lens), max(lens), 64, 64, 0.7)
    for causal in (True, False):
        out, _ = check_against_reference(q, k, v, cu, cu, mask, causal, 1.0, seed, tol=1e-3)  # fp32 logits ~ 1e2
        ref_out, _ = attention_reference_varlen(q.double(), k.double(), v.double(), cu, cu, mask, causal, 1.0,
                                                torch.float64)
        torch_err = (torch_op(q, k, v, cu, cu, mask.expand(2, hq), causal, 1.0)[0].double() - ref_out).abs().max()
        assert (out.double() - ref_out).abs().max() <= 4 * torch_err + 1e-6, f"seed {seed}: worse than the PyTorch op"


def test_loops_match_blas(rng):
    """The vectorized loops (the path without a BLAS in torch) agree with the sgemm path."""
    gen, seed = rng
    q, k, v, cu_q, cu_k = ragged(gen, [100, 37], [260, 37], 6, 3, 48, torch.float32)
    for block in (16, 64):
        mask = random_mask(gen, 2, 6, 100, 260, block, block, 0.6)
        out, lse = cpp_op(q, k, v, cu_q, cu_k, mask, True, 0.2)
        m = mask.expand(2, 6)
        loops = extension().block_sparse_attention_cpu(
            q, k, v, torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32), m.kv_num_blocks,
            m.kv_indices, block, block, True, 0.2, use_blas=False)
        torch.testing.assert_close(loops[0], out, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
        torch.testing.assert_close(loops[1], lse, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")


def test_result_does_not_depend_on_thread_count(rng):
    gen, _ = rng
    q, k, v, cu_q, cu_k = ragged(gen, [200, 50], [200, 90], 4, 2, 32, torch.float32)
    mask = random_mask(gen, 2, 4, 200, 200, 32, 32, 0.5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp_op(q, k, v, cu_q, cu_k, mask, True, 0.2)
        torch.set_num_threads(2)
        two = cpp_op(q, k, v, cu_q, cu_k, mask, True, 0.2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_cpu_backend_dispatches_to_the_kernel(monkeypatch, rng):
    gen, _ = rng
    q = torch.randn(1, 4, 40, 16, generator=gen)
    k, v = torch.randn(1, 2, 40, 16, generator=gen), torch.randn(1, 2, 40, 16, generator=gen)
    mask = Dense().build_mask(q_lens=40, kv_lens=40, num_heads=1, q_block_size=16, kv_block_size=16)
    calls = []
    import sparse_attn.ops.extension as ext_module

    def spy(*args, **kwargs):
        calls.append(1)
        return cpp_op(*args, **kwargs)

    monkeypatch.setattr(ext_module, "block_sparse_attention_cpu", spy)
    fast = block_sparse_attention(q, k, v, mask, backend="cpu")
    assert calls == [1]
    monkeypatch.setattr(attention, "cpu_kernel_available", lambda: False)  # the PyTorch fallback
    slow = block_sparse_attention(q, k, v, mask, backend="cpu")
    assert calls == [1]
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_inputs_that_need_gradients_take_the_differentiable_op(rng):
    gen, _ = rng
    q = torch.randn(1, 4, 40, 16, generator=gen, requires_grad=True)
    k, v = torch.randn(1, 2, 40, 16, generator=gen), torch.randn(1, 2, 40, 16, generator=gen)
    mask = Dense().build_mask(q_lens=40, kv_lens=40, num_heads=1, q_block_size=16, kv_block_size=16)
    out = block_sparse_attention(q, k, v, mask, backend="cpu")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(block_sparse_attention(q, k, v, mask, backend="cpu"), out.detach(), atol=1e-5,
                                   rtol=1e-5)


def _raw_args(**overrides):
    q, k = torch.randn(32, 4, 16), torch.randn(32, 2, 16)
    mask = Dense().build_mask(q_lens=32, kv_lens=32, num_heads=1, q_block_size=16, kv_block_size=16)
    args = dict(q=q, k=k, v=k.clone(), cu_seqlens_q=torch.tensor([0, 32], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 32], dtype=torch.int32), kv_num_blocks=mask.kv_num_blocks,
                kv_indices=mask.kv_indices, q_block_size=16, kv_block_size=16, causal=True, scale=0.25)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, message", [
    (dict(k=torch.randn(32, 2, 16).double()), "k has unsupported dtype"),
    (dict(q=torch.randn(32, 3, 16)), "multiple of the KV heads"),
    (dict(q=torch.randn(32, 16, 4).transpose(1, 2)), "unit stride along head_dim"),
    (dict(cu_seqlens_q=torch.tensor([0, 31], dtype=torch.int32)), "cu_seqlens_q ends at 31"),
    (dict(cu_seqlens_k=torch.tensor([0, 32, 32], dtype=torch.int32)), "cu_seqlens_k must have 2"),
    (dict(kv_num_blocks=torch.full((1, 1, 2), 3, dtype=torch.int32)), "kv_num_blocks must lie in"),
    (dict(kv_indices=torch.full((1, 1, 2, 2), -1, dtype=torch.int32)), "negative block ids"),
    (dict(q_block_size=8), "too few for q_len 32"),
    (dict(scale=0.0), "scale must be positive"),
])
def test_kernel_checks_its_arguments(overrides, message):
    with pytest.raises(RuntimeError, match=message):
        extension().block_sparse_attention_cpu(**_raw_args(**overrides))


def test_wrapper_raises_value_error():
    q, k = torch.randn(32, 4, 16), torch.randn(32, 2, 16)
    mask = Dense().build_mask(q_lens=32, kv_lens=32, num_heads=1, q_block_size=16, kv_block_size=16)
    with pytest.raises(ValueError, match="cu_seqlens_k ends at 30"):
        cpp_op(q, k, k, [0, 32], [0, 30], mask, True, None)
    with pytest.raises(ValueError, match="k has dtype"):
        cpp_op(q, k.half(), k.half(), [0, 32], [0, 32], mask, True, None)
