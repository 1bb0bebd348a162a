"""Sparse decode attention over paged KV caches (CPU op and the Triton kernel under the CPU interpreter) against the
float64 reference, on fresh random inputs (the seed is in every failure message).

Pages a sequence does not own, and the slots past its length, hold NaN: an op that reads anything it should not
fails loudly. With CUDA and TRITON_INTERPRET=0 the same tests run the compiled kernel.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/conftest.py does the same)


import pytest
import torch

from sparse_attn import BlockSparseMask
from sparse_attn.decode import (
    as_paged_cache,
    decode_attention_reference,
    gather_tokens,
    merge_attention_states,
    sparse_decode_attention,
    split_vllm_kv_cache,
    token_slots,
    write_tokens,
)
from backends import BACKENDS, DEVICE, ON_GPU

TOL = dict(atol=2e-5, rtol=2e-5)


def paged_cache(lens, num_kv_heads, head_dim, page_size, gen, *, dtype=torch.float32, spare_pages=3, vllm_layout=False):
    """Random K/V for sequences of ``lens`` tokens in shuffled physical pages; every other slot holds NaN.

    With ``vllm_layout`` the caches are the strided views of a ``[num_pages, Hkv, page_size, 2D]`` tensor.
    Returns (k_cache, v_cache, block_table int32, seq_lens int32, backing tensor).
    """
    max_pages = max(1, max(-(-n // page_size) for n in lens))
    num_pages = len(lens) * max_pages + spare_pages
    if vllm_layout:
        backing = torch.full((num_pages, num_kv_heads, page_size, 2 * head_dim), float("nan"), dtype=dtype)
        k_cache, v_cache = split_vllm_kv_cache(backing, head_dim)
    else:
        backing = torch.full((2, num_pages, page_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
        k_cache, v_cache = backing[0], backing[1]
    block_table = torch.randperm(num_pages, generator=gen)[: len(lens) * max_pages].view(len(lens), max_pages)
    block_table = block_table.to(torch.int32)
    for b, n in enumerate(lens):
        slots = token_slots(block_table, b, torch.arange(n), page_size)
        write_tokens(k_cache, slots, torch.randn(n, num_kv_heads, head_dim, generator=gen))
        write_tokens(v_cache, slots, torch.randn(n, num_kv_heads, head_dim, generator=gen))
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return to(k_cache), to(v_cache), to(block_table), to(seq_lens), backing


def random_selection(lens, heads, gen, *, width=None, kv_len=None):
    """A random token subset per (sequence, head), sizes from 0 to the sequence length, ascending."""
    kv_len = kv_len or max(lens)
    width = width or kv_len
    indices = torch.zeros(len(lens), heads, width, dtype=torch.int32)
    counts = torch.zeros(len(lens), heads, dtype=torch.int32)
    for b, n in enumerate(lens):
        for h in range(heads):
            c = int(torch.randint(0, min(n, width) + 1, (1,), generator=gen))
            picked = torch.randperm(n, generator=gen)[:c].sort().values
            indices[b, h, :c], counts[b, h] = picked.to(torch.int32), c
    return BlockSparseMask.from_token_indices(indices.to(DEVICE), counts.to(DEVICE), kv_len=kv_len)


def check_against_reference(q, k_cache, v_cache, block_table, seq_lens, selection, backend, seed, **kwargs):
    ref_out, ref_lse = decode_attention_reference(q, k_cache, v_cache, block_table, seq_lens, selection)
    out, lse = sparse_decode_attention(q, k_cache, v_cache, block_table, seq_lens, selection, backend=backend, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:2] and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, **TOL, msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(lse, ref_lse, **TOL, msg=lambda m: f"seed {seed}: {m}")
    return out, lse


# ---------------------------------------------------------------------------------------------------- dense decode
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_dense_decode_matches_reference(rng, backend, page_size, group):
    gen, seed = rng
    lens, hkv = [1, 17, 40], 2
    k_cache, v_cache, table, seq_lens, _ = paged_cache(lens, hkv, 16, page_size, gen)
    q = torch.randn(len(lens), hkv * group, 16, generator=gen).to(DEVICE)
    check_against_reference(q, k_cache, v_cache, table, seq_lens, None, backend, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequence_gives_zero_and_minus_inf(rng, backend):
    gen, seed = rng
    k_cache, v_cache, table, seq_lens, _ = paged_cache([0, 5], 1, 16, 4, gen)
    q = torch.randn(2, 2, 16, generator=gen).to(DEVICE)
    out, lse = check_against_reference(q, k_cache, v_cache, table, seq_lens, None, backend, seed)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()


# ---------------------------------------------------------------------------------------------------- selections
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("heads", ["one", "kv", "q"])
def test_selected_tokens_match_reference(rng, backend, group, heads):
    gen, seed = rng
    lens, hkv, page_size = [1, 9, 37], 2, 4
    k_cache, v_cache, table, seq_lens, _ = paged_cache(lens, hkv, 16, page_size, gen)
    hq = hkv * group
    q = torch.randn(len(lens), hq, 16, generator=gen).to(DEVICE)
    selection = random_selection(lens, {"one": 1, "kv": hkv, "q": hq}[heads], gen, width=24)
    check_against_reference(q, k_cache, v_cache, table, seq_lens, selection, backend, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_selection_and_positions_past_the_sequence(rng, backend):
    """A batch-1 selection shared by all sequences; entries at or past a sequence's length are ignored."""
    gen, seed = rng
    lens = [3, 30]
    k_cache, v_cache, table, seq_lens, _ = paged_cache(lens, 2, 16, 8, gen)
    q = torch.randn(2, 4, 16, generator=gen).to(DEVICE)
    indices = torch.tensor([[[0, 2, 5, 11, 29]]], dtype=torch.int32, device=DEVICE)
    selection = BlockSparseMask.from_token_indices(indices, torch.tensor([[5]], device=DEVICE), kv_len=30)
    check_against_reference(q, k_cache, v_cache, table, seq_lens, selection, backend, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_page_level_selection(rng, backend):
    """kv_block_size > 1: each listed id is a block of tokens (e.g. Quest-style pages); a partial last block is cut."""
    gen, seed = rng
    lens, block = [7, 26], 4
    k_cache, v_cache, table, seq_lens, _ = paged_cache(lens, 2, 16, block, gen)
    q = torch.randn(2, 6, 16, generator=gen).to(DEVICE)
    counts = torch.tensor([[[2], [1]], [[3], [2]]], dtype=torch.int32)
    indices = torch.tensor([[[[0, 1, 0]], [[1, 0, 0]]], [[[0, 3, 6]], [[2, 6, 0]]]], dtype=torch.int32)
    selection = BlockSparseMask(counts.to(DEVICE), indices.to(DEVICE), 1, block, 1, 26)
    check_against_reference(q, k_cache, v_cache, table, seq_lens, selection, backend, seed)


# ---------------------------------------------------------------------------------------------------- cache forms
@pytest.mark.parametrize("backend", BACKENDS)
def test_vllm_strided_cache_views(rng, backend):
    """vLLM's [num_pages, Hkv, page, 2D] page, split into K/V views: writes land in it and decode reads it in place."""
    gen, seed = rng
    lens = [5, 33]
    k_cache, v_cache, table, seq_lens, backing = paged_cache(lens, 2, 16, 16, gen, vllm_layout=True)
    assert not k_cache.is_contiguous() and k_cache.data_ptr() == backing.data_ptr()
    assert torch.isfinite(backing[table[1, 0].long(), :, :, :]).all()  # the writes went through the views
    q = torch.randn(2, 6, 16, generator=gen).to(DEVICE)
    check_against_reference(q, k_cache, v_cache, table, seq_lens, None, backend, seed)
    check_against_reference(q, k_cache, v_cache, table, seq_lens, random_selection(lens, 2, gen), backend, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_contiguous_cache_viewed_as_pages(rng, backend):
    """[B, Hkv, S, D] caches (e.g. transformers') decode without a copy and match plain softmax attention."""
    gen, seed = rng
    k = torch.randn(2, 2, 12, 16, generator=gen).to(DEVICE)
    v = torch.randn(2, 2, 12, 16, generator=gen).to(DEVICE)
    q = torch.randn(2, 4, 16, generator=gen).to(DEVICE)
    (k_pages, table), (v_pages, _) = as_paged_cache(k), as_paged_cache(v)
    assert k_pages.data_ptr() == k.data_ptr() and k_pages.shape == (2, 12, 2, 16)
    seq_lens = torch.tensor([12, 7], dtype=torch.int32, device=DEVICE)
    out, _ = sparse_decode_attention(q, k_pages, v_pages, table, seq_lens, backend=backend)
    for b, n in enumerate([12, 7]):
        keys, vals = k[b, :, :n].repeat_interleave(2, 0).double(), v[b, :, :n].repeat_interleave(2, 0).double()
        probs = torch.softmax(torch.einsum("hd,hnd->hn", q[b].double(), keys) / 4.0, -1)
        torch.testing.assert_close(out[b].double(), torch.einsum("hn,hnd->hd", probs, vals), **TOL, msg=f"seed {seed}")
    torch.testing.assert_close(gather_tokens(k_pages, table, 1, torch.tensor([0, 6])), k[1, :, [0, 6]].transpose(0, 1))


# ---------------------------------------------------------------------------------------------------- split-K
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("selected", [False, True])
def test_split_k_equals_no_split(rng, backend, selected):
    gen, seed = rng
    lens = [2, 23, 61]
    k_cache, v_cache, table, seq_lens, _ = paged_cache(lens, 2, 16, 8, gen)
    q = torch.randn(3, 6, 16, generator=gen).to(DEVICE)
    selection = random_selection(lens, 2, gen) if selected else None
    whole = sparse_decode_attention(q, k_cache, v_cache, table, seq_lens, selection, num_splits=1, backend=backend)
    for splits in (3, 9) if backend == "triton" else (3, 70):  # more splits than tokens: some are empty
        parts = sparse_decode_attention(q, k_cache, v_cache, table, seq_lens, selection, num_splits=splits, backend=backend)
        for a, b in zip(parts, whole):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m: f"seed {seed}, splits {splits}: {m}")


def test_merge_attention_states_is_exact(rng):
    """Attention over disjoint key subsets, merged, equals attention over their union (float64, to 1e-12)."""
    gen, seed = rng
    q, keys, vals = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((3, 8), (3, 50, 8), (3, 50, 8)))
    scores = torch.einsum("hd,hnd->hn", q, keys)
    part = torch.randint(0, 4, (50,), generator=gen)
    part[:4] = torch.arange(4)  # parts 0..3 non-empty; part 4 is empty
    outs, lses = [], []
    for p in range(5):
        s = scores.masked_fill(part != p, float("-inf"))
        lse = torch.logsumexp(s, -1)
        probs = torch.exp(s - lse.clamp(min=-1e300)[:, None]) if p < 4 else torch.zeros_like(s)
        outs.append(torch.einsum("hn,hnd->hd", probs, vals))
        lses.append(lse)
    out, lse = merge_attention_states(outs, lses)
    torch.testing.assert_close(out, torch.einsum("hn,hnd->hd", torch.softmax(scores, -1), vals), atol=1e-12, rtol=1e-12,
                               msg=f"seed {seed}")
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-6)
    stacked_out, _ = merge_attention_states(torch.stack(outs), torch.stack(lses))
    assert torch.equal(stacked_out, out)
    # Every part empty: 0 and -inf, no NaN.
    empty_out, empty_lse = merge_attention_states(torch.zeros(2, 3, 8), torch.full((2, 3), float("-inf")))
    assert torch.equal(empty_out, torch.zeros(3, 8)) and torch.isneginf(empty_lse).all()
    with pytest.raises(ValueError, match="lses"):
        merge_attention_states(torch.zeros(2, 3, 8), torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(rng, backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not ON_GPU:
        pytest.skip("the Triton CPU interpreter computes bf16 tl.dot wrongly (triton 3.9)")
    gen, seed = rng
    lens = [4, 40]
    k_cache, v_cache, table, seq_lens, _ = paged_cache(lens, 2, 16, 16, gen, dtype=dtype)
    q = torch.randn(2, 6, 16, generator=gen).to(DEVICE, dtype)
    for selection in (None, random_selection(lens, 2, gen)):
        ref, _ = decode_attention_reference(q, k_cache, v_cache, table, seq_lens, selection)
        out, _ = sparse_decode_attention(q, k_cache, v_cache, table, seq_lens, selection, num_splits=2, backend=backend)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2, msg=lambda m: f"seed {seed}: {m}")


# ---------------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_value_errors_naming_the_argument():
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache, table, seq_lens, _ = paged_cache([3, 10], 2, 16, 4, gen)
    k_cache, v_cache = (torch.nan_to_num(t) for t in (k_cache, v_cache))
    q = torch.randn(2, 4, 16).to(DEVICE)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=table, seq_lens=seq_lens)

    def fails(match, selection=None, **changes):
        with pytest.raises(ValueError, match=match):
            sparse_decode_attention(**{**args, **{k: v for k, v in changes.items() if k in args}}, selection=selection,
                                    **{k: v for k, v in changes.items() if k not in args})

    fails("q must be", q=q[0])
    fails("q has dtype", q=q.to(torch.int32))
    fails("k_cache has dtype", k_cache=k_cache.double())
    fails("v_cache must be a paged cache", v_cache=v_cache[0])
    fails("k_cache and v_cache", v_cache=v_cache[:, :2])
    fails("head_dim", q=q[..., :8])
    fails("multiple of the number of KV heads", q=q[:, :3])
    fails("block_table must be int32", block_table=table.float())
    fails("block_table must be a rank-2", block_table=table[:1])
    fails("seq_lens must be a rank-1", seq_lens=seq_lens[:, None])
    fails("seq_lens must lie", seq_lens=torch.tensor([3, 99], dtype=torch.int32, device=DEVICE))
    fails("seq_lens must lie", seq_lens=torch.tensor([-1, 3], dtype=torch.int32, device=DEVICE))
    bad_table = table.clone()
    bad_table[1, 0] = 10_000
    fails("block_table entries", block_table=bad_table)
    fails("num_splits", num_splits=0)
    fails("scale", scale=-1.0)
    fails("backend must be", backend="fast")
    fails("selection must be a BlockSparseMask", selection=torch.zeros(2, 2, 3))
    sel = lambda heads, kv_len=10: BlockSparseMask.from_token_indices(  # noqa: E731
        torch.zeros(2, heads, 1, dtype=torch.int32, device=DEVICE), torch.ones(2, heads, device=DEVICE), kv_len=kv_len)
    fails("selection heads", selection=sel(3))
    fails("selection was built for kv_len", selection=sel(2, kv_len=5))
    unsorted = BlockSparseMask.from_token_indices(torch.tensor([[[3, 1]]] * 2, dtype=torch.int32, device=DEVICE),
                                                  torch.full((2, 1), 2, device=DEVICE), kv_len=10)
    fails("ascending", selection=unsorted)
    fails("backend 'cuda'", backend="cuda")  # no CUDA decode kernel is built
