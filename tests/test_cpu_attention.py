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


@pytest.mark.parametrize("hq, hkv, bq", [(6, 2, 32), (9, 3, 16), (8, 1, 32)])
def test_gqa_heads_with_nearly_equal_mask_rows_share_a_tile(rng, hq, hkv, bq):
    """Per-head masks whose heads in a KV group keep nearly the same blocks (each head differs in about one block of
    a row, so the union of a group's rows costs less than 1.2x the rows alone) and, on one query block, unrelated
    rows: the kernel stacks the first kind into one Q tile over the union of the group's rows, each head's keys
    outside its own row masked out, and runs the others alone. Exact against the float64 reference."""
    gen, seed = rng
    q_len, kv_len, dim = 200, 330, 64
    nq, nk = -(-q_len // bq), -(-kv_len // bq)
    base = torch.rand(1, hkv, nq, nk, generator=gen) < 0.6
    keep = base.repeat_interleave(hq // hkv, dim=1).clone()
    flip = torch.rand(1, hq, nq, nk, generator=gen) < 0.05  # each head differs in about 1 block in 20
    keep ^= flip
    keep[:, :, 1] = torch.rand(1, hq, nk, generator=gen) < 0.5  # query block 1: unrelated rows per head
    mask = BlockSparseMask.from_block_bool(keep, q_block_size=bq, kv_block_size=bq, q_len=q_len, kv_len=kv_len)
    q, k, v, cu_q, cu_k = ragged(gen, [q_len], [kv_len], hq, hkv, dim, torch.float32)
    check_against_reference(q, k, v, cu_q, cu_k, mask, True, 0.15, seed)


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


@pytest.mark.parametrize("dim", [16, 48, 64, 80, 128])
@pytest.mark.parametrize("hq, hkv, block", [(5, 1, 16), (9, 3, 64), (2, 2, 32)])
def test_tall_tiles_head_dims(rng, dim, hq, hkv, block):
    """Prefill tiles of 5 to 192 rows (register tiles of 12 and 6 rows leave every remainder), tiles of keys that
    are not a multiple of 16, head dims with one to eight vectors per row and one (80) that is not a multiple of
    16 (the BLAS or loop path)."""
    gen, seed = rng
    q, k, v, cu_q, cu_k = ragged(gen, [131, 7], [300, 45], hq, hkv, dim, torch.float32)
    dense = Dense().build_mask(q_lens=[131, 7], kv_lens=[300, 45], num_heads=1, q_block_size=block,
                               kv_block_size=block)
    check_against_reference(q, k, v, cu_q, cu_k, dense, True, dim ** -0.5, seed)
    mask = random_mask(gen, 2, hq, 131, 300, block, block, 0.5)
    check_against_reference(q, k, v, cu_q, cu_k, mask, True, dim ** -0.5, seed)


def test_loops_match_blas(rng):
    """The portable vectorized loops (the path without a BLAS in torch or AVX-512) agree with the default path."""
    gen, seed = rng
    q, k, v, cu_q, cu_k = ragged(gen, [100, 37], [260, 37], 6, 3, 48, torch.float32)
    for block in (16, 64):
        mask = random_mask(gen, 2, 6, 100, 260, block, block, 0.6)
        out, lse = cpp_op(q, k, v, cu_q, cu_k, mask, True, 0.2)
        m = mask.expand(2, 6)
        loops = extension().block_sparse_attention_cpu(
            q, k, v, torch.tensor(cu_q, dtype=torch.int32), cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32),
            kv_num_blocks=m.kv_num_blocks, kv_indices=m.kv_indices, q_block_size=block, kv_block_size=block,
            causal=True, scale=0.2, use_blas=False)
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

    def spy(*args, **kwargs):
        calls.append(1)
        return cpp_op(*args, **kwargs)

    monkeypatch.setattr(attention, "block_sparse_attention_cpp", spy)
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
    (dict(kv_indices=torch.full((1, 1, 2, 2), -1, dtype=torch.int32)), "negative block id"),
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


# ---------------------------------------------------------------------------------------------- paged keys
def paged_copy(gen, k, v, cu_k, page_size, spare=3):
    """The varlen k/v of every sequence scattered over shuffled pages of ``page_size`` tokens (with ``spare``
    unused pages of noise): ``(k_pages, v_pages [P, page_size, Hkv, D], block_table int32 [B, max_pages])``."""
    lens = [b - a for a, b in zip(cu_k, cu_k[1:])]
    per_seq = [-(-n // page_size) for n in lens]
    total = sum(per_seq) + spare
    order = torch.randperm(total, generator=gen)
    k_pages = torch.randn(total, page_size, *k.shape[1:], generator=gen).to(k.dtype)
    v_pages = torch.randn(total, page_size, *v.shape[1:], generator=gen).to(v.dtype)
    table = torch.zeros(len(lens), max(max(per_seq), 1), dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):
        for i in range(per_seq[b]):
            page = int(order[used])
            used += 1
            table[b, i] = page
            rows = slice(cu_k[b] + i * page_size, min(cu_k[b] + (i + 1) * page_size, cu_k[b + 1]))
            count = rows.stop - rows.start
            k_pages[page, :count] = k[rows]
            v_pages[page, :count] = v[rows]
    return k_pages, v_pages, table


@pytest.mark.parametrize("page_size", [16, 32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_keys_match_varlen(rng, page_size, dtype):
    """Keys read in place from shuffled pages give what the same keys give in the varlen layout: prefill, chunked
    prefill over a cached prefix, and decode rows in one ragged batch; block and page boundaries misaligned."""
    gen, seed = rng
    q_lens, kv_lens = [70, 33, 1], [130, 200, 90]
    q, k, v, cu_q, cu_k = ragged(gen, q_lens, kv_lens, 6, 2, 32, dtype)
    mask = random_mask(gen, 3, 6, max(q_lens), max(kv_lens), 16, 16, 0.6)
    k_pages, v_pages, table = paged_copy(gen, k, v, cu_k, page_size)
    out, lse = cpp_op(q, k_pages, v_pages, cu_q, None, mask, True, 0.2, block_table=table, kv_lens=kv_lens)
    ref_out, ref_lse = check_against_reference(q, k, v, cu_q, cu_k, mask, True, 0.2, seed)
    torch.testing.assert_close(out, ref_out, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_paged_keys_through_the_entry_point(rng):
    """block_sparse_attention reads pages on every backend (the C++ kernel in place, the others gathered)."""
    gen, seed = rng
    q, k, v, cu_q, cu_k = ragged(gen, [40, 1], [100, 77], 4, 2, 16, torch.float32)
    k_pages, v_pages, table = paged_copy(gen, k, v, cu_k, 16)
    mask = random_mask(gen, 2, 4, 40, 100, 16, 16, 0.7)
    want = block_sparse_attention(q, k, v, mask, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="reference")
    for backend in ("cpu", "reference"):
        got = block_sparse_attention(q, k_pages, v_pages, mask, cu_seqlens_q=cu_q, block_table=table,
                                     kv_lens=[100, 77], backend=backend)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, msg=f"seed {seed}, {backend}")
    with pytest.raises(ValueError, match="block_table entries"):
        block_sparse_attention(q, k_pages, v_pages, mask, cu_seqlens_q=cu_q, block_table=table + 100,
                               kv_lens=[100, 77])
    with pytest.raises(ValueError, match="kv_lens must lie"):
        block_sparse_attention(q, k_pages, v_pages, mask, cu_seqlens_q=cu_q, block_table=table, kv_lens=[100, 900])


@pytest.mark.parametrize("q_lens, kv_lens", [([1], [3000]), ([1, 1, 1], [700, 1, 2100]), ([4], [1500])])
def test_dense_rows_split_over_the_context(rng, q_lens, kv_lens):
    """Few rows over long contexts (decode) are split into slices read by different threads and merged exactly;
    mask=None reads every key (the dense setting without a mask)."""
    gen, seed = rng
    q, k, v, cu_q, cu_k = ragged(gen, q_lens, kv_lens, 6, 2, 64, torch.float32)
    full = BlockSparseMask.full(q_len=max(q_lens), kv_len=max(kv_lens), q_block_size=64, kv_block_size=64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out, lse = cpp_op(q, k, v, cu_q, cu_k, None, True, 0.125)
    finally:
        torch.set_num_threads(threads)
    ref_out, ref_lse = check_against_reference(q, k, v, cu_q, cu_k, full, True, 0.125, seed)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_per_kv_group_selection(rng):
    """A decode selection with one token list per KV head (kv_block_size 1) serves the group's query heads."""
    gen, seed = rng
    q, k, v, cu_q, cu_k = ragged(gen, [1, 1], [300, 180], 6, 2, 32, torch.float32)
    keep = torch.rand(2, 2, 1, 300, generator=gen) < 0.3
    mask = BlockSparseMask.from_block_bool(keep, q_block_size=1, kv_block_size=1, q_len=1, kv_len=300)
    out, lse = cpp_op(q, k, v, cu_q, cu_k, mask, True, 0.2, checked=True)
    per_head = BlockSparseMask.from_block_bool(keep.repeat_interleave(3, 1), q_block_size=1, kv_block_size=1,
                                               q_len=1, kv_len=300)
    check_against_reference(q, k, v, cu_q, cu_k, per_head, True, 0.2, seed)
    torch.testing.assert_close(out, cpp_op(q, k, v, cu_q, cu_k, per_head, True, 0.2)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("decode", [False, True])
def test_pruned_slots_and_fresh_tokens(rng, dtype, decode):
    """KV-pruned page slots are unpacked inside the kernel, and the step's own tokens (new_k/new_v) replace their
    pruned copies: the result equals attention over the unpacked context with the new tokens exact (prefill rows,
    and decode rows, which read every KV head of a key in one pass)."""
    from sparse_attn.decode.pruned_pages import PrunedSlotFormat

    gen, seed = rng
    q_lens, kv_lens, hkv, dim = ([30, 1], [120, 75], 2, 64) if not decode else ([1, 1, 1], [700, 33, 1], 2, 64)
    q, k, v, cu_q, cu_k = ragged(gen, q_lens, kv_lens, 4, hkv, dim, dtype)
    fmt = PrunedSlotFormat.for_sparsity(dim, 0.5, dtype)
    slots = fmt.pack(k, v)  # [Tk, Hkv, width]
    pages, _, table = paged_copy(gen, slots, slots, cu_k, 16)
    new_k = torch.cat([k[cu_k[b + 1] - n : cu_k[b + 1]] for b, n in enumerate(q_lens)])
    new_v = torch.cat([v[cu_k[b + 1] - n : cu_k[b + 1]] for b, n in enumerate(q_lens)])
    mask = random_mask(gen, len(q_lens), 4, max(q_lens), max(kv_lens), 16, 16, 0.7)
    if decode:  # one selection for every head
        mask = BlockSparseMask(mask.kv_num_blocks[:, :1], mask.kv_indices[:, :1], 16, 16, max(q_lens), max(kv_lens))
    out, lse = cpp_op(q, pages, pages, cu_q, None, mask, True, 0.125, block_table=table, kv_lens=kv_lens,
                      slot_keep=fmt.keep, new_k=new_k, new_v=new_v, checked=True)
    k_ctx, v_ctx = fmt.unpack(slots)
    for b, n in enumerate(q_lens):  # the new tokens exact, earlier ones pruned
        k_ctx[cu_k[b + 1] - n : cu_k[b + 1]] = k[cu_k[b + 1] - n : cu_k[b + 1]]
        v_ctx[cu_k[b + 1] - n : cu_k[b + 1]] = v[cu_k[b + 1] - n : cu_k[b + 1]]
    check_against_reference(q, k_ctx, v_ctx, cu_q, cu_k, mask, True, 0.125, seed)
    ref_out = attention_reference_varlen(q.double(), k_ctx.double(), v_ctx.double(), cu_q, cu_k,
                                         mask.expand(len(q_lens), 4),
                                         True, 0.125, torch.float64)[0]
    assert (out.double() - ref_out).abs().max() < TOL[dtype], f"seed {seed}"


@pytest.mark.parametrize("dim", [16, 40, 64, 80, 128])
@pytest.mark.parametrize("hq, hkv", [(3, 3), (9, 3), (8, 2), (16, 2)])
@pytest.mark.parametrize("pruned", [False, True])
def test_decode_rows_on_pages(rng, dim, hq, hkv, pruned):
    """Decode rows (one query per sequence, 1-8 query heads per KV head) read their keys in place from the pages
    (or unpack pruned slots per tile): every head size, group size and context length (1, a partial page, several
    tiles of keys) against the float64 reference, dense and with a per-KV-head token selection."""
    from sparse_attn.decode.pruned_pages import PrunedSlotFormat

    gen, seed = rng
    kv_lens = [1, 15, 17, 300, 1029]
    q, k, v, cu_q, cu_k = ragged(gen, [1] * len(kv_lens), kv_lens, hq, hkv, dim, torch.float32)
    if pruned:
        fmt = PrunedSlotFormat.for_sparsity(dim, 0.5, torch.float32)
        slots = fmt.pack(k, v)
        k_pages, v_pages, table = paged_copy(gen, slots, slots, cu_k, 16)
        k, v = fmt.unpack(slots)  # what the kernel must attend to
        extra = dict(slot_keep=fmt.keep)
    else:
        k_pages, v_pages, table = paged_copy(gen, k, v, cu_k, 16)
        k_pages, v_pages = torch.cat([k_pages, v_pages], -1).split(dim, -1)  # vLLM's rows: K and V of each head
        extra = {}
    batch = len(kv_lens)
    full = BlockSparseMask.full(q_len=1, kv_len=max(kv_lens), q_block_size=1, kv_block_size=64)
    keep = torch.rand(batch, hkv, 1, max(kv_lens), generator=gen) < 0.3
    per_group = BlockSparseMask.from_block_bool(keep, q_block_size=1, kv_block_size=1, q_len=1, kv_len=max(kv_lens))
    per_head = BlockSparseMask.from_block_bool(keep.repeat_interleave(hq // hkv, 1), q_block_size=1,
                                               kv_block_size=1, q_len=1, kv_len=max(kv_lens))
    shared = BlockSparseMask.from_block_bool(keep[:, :1], q_block_size=1, kv_block_size=1, q_len=1,
                                             kv_len=max(kv_lens))  # one selection for every head
    for mask, ref_mask, causal in ((None, full, True), (per_group, per_head, False), (shared, shared, False)):
        out, lse = cpp_op(q, k_pages, v_pages, cu_q, None, mask, causal, dim ** -0.5, block_table=table,
                          kv_lens=kv_lens, q_block_size=1, checked=True, **extra)
        ref_out, ref_lse = attention_reference_varlen(q.double(), k.double(), v.double(), cu_q, cu_k,
                                                      ref_mask.expand(batch, hq), causal, dim ** -0.5, torch.float64)
        empty = torch.isneginf(ref_lse)
        assert torch.equal(torch.isneginf(lse), empty), f"seed {seed}"
        assert (out.double() - ref_out).abs().max() < TOL[torch.float32], f"seed {seed}, mask {mask is not None}"
        assert (lse.double() - ref_lse)[~empty].abs().max() < 1e-4, f"seed {seed}"


def test_threshold_skipping(rng):
    """skip_threshold=0 is exact; a threshold skips tiles whose every row is far below its running max, and the
    error stays within the mass those tiles could hold (n e^-threshold per row, relative)."""
    gen, seed = rng
    q, k, v, cu_q, cu_k = ragged(gen, [512], [4096], 2, 1, 32, torch.float32)
    shared = 1.5 * torch.randn(32, generator=gen)
    q += shared  # every query attends strongly to an early stretch of keys
    k[:256] += 2 * shared
    mask = BlockSparseMask.full(q_len=512, kv_len=4096, q_block_size=64, kv_block_size=64)
    exact, _, none = cpp_op(q, k, v, cu_q, cu_k, None, True, 1.0, return_stats=True)
    assert int(none[1]) == 0
    approx, _, stats = cpp_op(q, k, v, cu_q, cu_k, None, True, 1.0, skip_threshold=8.0, return_stats=True)
    ref = check_against_reference(q, k, v, cu_q, cu_k, mask, True, 1.0, seed, tol=5e-4)[0]  # logits near 100
    torch.testing.assert_close(exact, ref, atol=5e-4, rtol=1e-5)
    assert int(stats[1]) > 0, "some tiles lie far below the running maxima here"
    bound = 256 * torch.exp(torch.tensor(-8.0)) * 2 * v.abs().max()
    assert (approx - exact).abs().max() <= bound, f"seed {seed}"
