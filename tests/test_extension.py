"""The C++ extension's CPU operators (sparse_attn._C): top-k token selection and decode on the compressed KV cache,
against PyTorch references (float64 for attention), and their argument checks (Python wrappers and C++)."""

import os

import pytest
import torch

from sparse_attn.decode.compressed import (
    compress_kv, compressed_decode_attention, compressed_decode_attention_torch, context_tokens, keep_count,
)
from sparse_attn.decode.kv_pruning import KVPruningConfig, compressed_kv_attention
from sparse_attn.ops.extension import extension, extension_available, topk_tokens, write_slots_cpu
from sparse_attn.ops.reference import attention_reference_varlen

OPS = ("topk_tokens", "compressed_decode_attention", "block_sparse_attention_cpu", "pooled_block_scores", "write_slots")
requires_extension = pytest.mark.skipif(
    not extension_available(), reason="sparse_attn._C is not built (pip install --no-build-isolation -e .)"
)


def test_extension_is_built_when_required():
    """CI builds the extension and sets SPARSE_ATTN_REQUIRE_EXTENSION=1, so a broken build fails here."""
    required = os.environ.get("SPARSE_ATTN_REQUIRE_EXTENSION", "0") == "1"
    if not extension_available():
        if required:
            pytest.fail("SPARSE_ATTN_REQUIRE_EXTENSION=1 but sparse_attn._C is not importable")
        pytest.skip("sparse_attn._C is not built")
    missing = [op for op in OPS if not extension_available(op)]
    assert not missing, f"sparse_attn._C lacks {missing}"
    assert isinstance(extension().with_cuda, bool)


def test_missing_extension_error_names_the_fix(monkeypatch):
    import sparse_attn.ops.extension as ext_module

    monkeypatch.setattr(ext_module, "cuda_extension", lambda: None)
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        ext_module.topk_tokens(torch.randn(1, 1, 4), torch.tensor([4]), 2)


# ---------------------------------------------------------------------------------------------- slot writes
@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_tokens_cpp_matches_index_put(dtype):
    """write_tokens on CPU pages runs the C++ op: K and V written into strided views of vLLM's token-major pages
    (labels after them), separately or side by side in one pass, padding slots (-1) skipped, extra value rows
    ignored; the same pages as PyTorch's index_put, which writes pages that do not merge into one view of slots."""
    from sparse_attn.decode.paged import flat_slots, write_tokens

    torch.manual_seed(0)
    num_pages, page, hkv, d, r = 5, 4, 3, 8, 2
    kv = torch.randn(num_pages, page, hkv, 2 * d + r, dtype=dtype)  # LBNHC: token-major pages [P, page, Hkv, C]
    assert flat_slots(kv[..., :d]) is not None  # the C++ path
    want = kv.clone()
    slots = torch.tensor([3, -1, 17, 0, 19, -1])
    k_new, v_new = torch.randn(8, hkv, d, dtype=dtype), torch.randn(8, hkv, d, dtype=dtype)  # 2 rows past the slots
    real = slots >= 0
    for values, cols in ((k_new, slice(0, d)), (v_new, slice(d, 2 * d))):
        want[slots[real] // page, slots[real] % page, :, cols] = values[:6][real]
    separate, both = kv.clone(), kv.clone()
    write_tokens(separate[..., :d], slots, k_new)
    write_tokens(separate[..., d : 2 * d], slots, v_new)
    write_tokens(both[..., : 2 * d], slots, k_new, v_new)
    assert torch.equal(separate, want) and torch.equal(both, want)
    strided = torch.randn(2 * num_pages, page, hkv, 2 * d, dtype=dtype)[::2]  # every other page: no view of slots
    assert flat_slots(strided) is None
    expected = strided.clone()
    expected[slots[real] // page, slots[real] % page] = torch.cat([k_new, v_new], -1)[:6][real]
    write_tokens(strided, slots, k_new, v_new)
    assert torch.equal(strided, expected)
    with pytest.raises(ValueError, match="summing to 16"):
        write_tokens(strided, slots, k_new)


@requires_extension
def test_write_slots_checks_its_arguments():
    dst = torch.zeros(8, 2, 4)
    with pytest.raises(RuntimeError, match=r"slots\[1\] = 8 is past the cache's 8 slots"):
        extension().write_slots(dst, torch.tensor([0, 8]), [torch.zeros(2, 2, 4)])
    with pytest.raises(RuntimeError, match="src must be"):
        extension().write_slots(dst, torch.tensor([0, 1]), [torch.zeros(1, 2, 4)])
    with pytest.raises(RuntimeError, match="src has unsupported dtype"):
        extension().write_slots(dst, torch.tensor([0]), [torch.zeros(1, 2, 4, dtype=torch.float64)])
    with pytest.raises(RuntimeError, match="widths sum to 3, dst is 4 wide"):
        extension().write_slots(dst, torch.tensor([0]), [torch.zeros(1, 2, 2), torch.zeros(1, 2, 1)])
    with pytest.raises(RuntimeError, match="channels must lie in"):
        extension().write_slots(dst, torch.tensor([0]), [torch.zeros(1, 2, 3)], torch.zeros(1, 2, 4),
                                torch.tensor([[0], [4]]))
    with pytest.raises(RuntimeError, match="label_src and channels go together"):
        extension().write_slots(dst, torch.tensor([0]), [torch.zeros(1, 2, 3)], torch.zeros(1, 2, 4))
    with pytest.raises(RuntimeError, match="widths sum to 5, dst is 4 wide"):
        extension().write_slots(dst, torch.tensor([0]), [torch.zeros(1, 2, 3)], torch.zeros(1, 2, 4),
                                torch.tensor([[0, 1], [2, 3]]))
    assert not dst.any()  # nothing written by a refused call


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_slots_with_labels(rng, dtype):
    """K, V and each head's label (the key at its channels) in one pass, from strided sources (vLLM's key and value
    are views into one projection output), padding slots skipped."""
    gen, seed = rng
    num_slots, hkv, d, r, t = 40, 3, 8, 3, 5
    qkv = torch.randn(t + 2, hkv * 3, d, generator=gen).to(dtype)
    key, value = qkv[:, hkv : 2 * hkv], qkv[:, 2 * hkv :]
    channels = torch.stack([torch.randperm(d, generator=gen)[:r] for _ in range(hkv)])
    slots = torch.tensor([7, -1, 0, 39, 12])
    dst = torch.randn(num_slots, hkv, 2 * d + r, generator=gen).to(dtype)
    want = dst.clone()
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            label = torch.stack([key[i, h, channels[h]] for h in range(hkv)])
            want[slot] = torch.cat([key[i], value[i], label], -1)
    assert write_slots_cpu(dst, slots, key, value, label_src=key, channels=channels)
    assert torch.equal(dst, want), f"seed {seed}"


# ---------------------------------------------------------------------------------------------- top-k tokens
def topk_reference(scores, lengths, k, sink=0, recent=0, budgets=None):
    """Per row: sink + recent tokens, then the best others by a stable descending sort (torch.topk with
    deterministic ties: the lower index first; NaN as -inf)."""
    batch, heads, _ = scores.shape
    indices = torch.zeros(batch, heads, k, dtype=torch.int32)
    counts = torch.zeros(batch, heads, dtype=torch.int32)
    for b in range(batch):
        n = int(lengths[b])
        budget = k if budgets is None else min(int(budgets[b]), k)
        for h in range(heads):
            if n <= budget:
                chosen = list(range(n))
            else:
                forced = set(range(min(sink, n))) | set(range(max(n - recent, min(sink, n)), n))
                middle = torch.tensor([i for i in range(n) if i not in forced], dtype=torch.long)
                row = torch.nan_to_num(scores[b, h, middle], nan=float("-inf"))
                order = torch.sort(row, descending=True, stable=True).indices[: max(budget - len(forced), 0)]
                chosen = sorted(forced | set(middle[order].tolist()))
            indices[b, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
            counts[b, h] = len(chosen)
    return indices, counts


@requires_extension
@pytest.mark.parametrize("k, sink, recent", [(1, 0, 0), (8, 0, 0), (8, 2, 3), (12, 4, 4), (50, 0, 0), (64, 1, 1)])
def test_topk_tokens_matches_reference(k, sink, recent):
    torch.manual_seed(k + sink)
    scores = torch.randn(3, 4, 50)
    lengths = torch.tensor([50, 17, 0], dtype=torch.int32)  # ragged, one empty row; k >= len for some rows
    indices, counts = topk_tokens(scores, lengths, k, sink=sink, recent=recent)
    ref_indices, ref_counts = topk_reference(scores, lengths, k, sink, recent)
    assert indices.dtype == torch.int32 and counts.dtype == torch.int32 and indices.shape == (3, 4, k)
    assert torch.equal(counts, ref_counts) and torch.equal(indices, ref_indices)
    assert torch.equal(counts, torch.minimum(lengths[:, None], torch.tensor(k)).int().expand(3, 4))


@requires_extension
def test_topk_tokens_equals_torch_topk_without_sink_or_recent():
    scores = torch.randn(2, 3, 300)
    indices, counts = topk_tokens(scores, torch.tensor([300, 300], dtype=torch.int32), 20)
    assert torch.equal(indices.long(), scores.topk(20, dim=-1).indices.sort(-1).values)
    assert bool((counts == 20).all())


@requires_extension
def test_topk_tokens_ties_nan_inf_are_deterministic():
    scores = torch.randint(0, 3, (2, 3, 40)).float()  # many ties: the lower index must win
    scores[0, 0, 5] = float("nan")
    scores[0, 1, 7] = float("inf")
    scores[1, 2, :] = 1.0  # all equal
    lengths = torch.tensor([40, 33], dtype=torch.int32)
    for sink, recent in ((0, 0), (3, 2)):
        indices, counts = topk_tokens(scores, lengths, 9, sink=sink, recent=recent)
        ref = topk_reference(scores, lengths, 9, sink, recent)
        assert torch.equal(indices, ref[0]) and torch.equal(counts, ref[1])
    assert topk_tokens(scores, lengths, 9)[0][1, 2].tolist() == list(range(9))


@requires_extension
def test_topk_tokens_budgets_and_long_rows():
    scores = torch.randn(2, 2, 4096)
    lengths = torch.tensor([4096, 1000], dtype=torch.int32)
    budgets = torch.tensor([256, 5], dtype=torch.int32)
    indices, counts = topk_tokens(scores, lengths, 256, sink=2, recent=2, budgets=budgets)
    ref = topk_reference(scores, lengths, 256, 2, 2, budgets)
    assert torch.equal(indices, ref[0]) and torch.equal(counts, ref[1])
    assert counts.tolist() == [[256, 256], [5, 5]]


@requires_extension
def test_topk_tokens_bad_input():
    scores, lengths = torch.randn(2, 3, 10), torch.tensor([10, 4], dtype=torch.int32)
    for bad_k in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="k must be"):
            topk_tokens(scores, lengths, bad_k)
    with pytest.raises(ValueError, match="sink"):
        topk_tokens(scores, lengths, 4, sink=-1)
    with pytest.raises(ValueError, match="must not exceed k"):
        topk_tokens(scores, lengths, 4, sink=3, recent=2)
    with pytest.raises(ValueError, match="scores"):
        topk_tokens(scores[0], lengths, 4)
    with pytest.raises(ValueError, match="scores"):
        topk_tokens(scores.long(), lengths, 4)
    with pytest.raises(ValueError, match="lengths"):
        topk_tokens(scores, lengths[:1], 4)
    with pytest.raises(ValueError, match="lengths"):
        topk_tokens(scores, torch.tensor([11, 4]), 4)
    with pytest.raises(ValueError, match="lengths"):
        topk_tokens(scores, lengths.float(), 4)
    with pytest.raises(ValueError, match="budgets"):
        topk_tokens(scores, lengths, 4, budgets=torch.tensor([5, 1]))
    # The C++ checks name the argument too (direct calls bypass the wrappers).
    ext = extension()
    for args, name in (((scores.double(), lengths, 4), "scores"), ((scores, lengths.long(), 4), "lengths"),
                       ((scores, lengths, 0), "k"), ((scores, lengths[:1], 4), "lengths")):
        with pytest.raises(RuntimeError, match=name):
            ext.topk_tokens(*args)


# ---------------------------------------------------------------------------------------------- compressed decode
def make_case(comp_lens, rec_lens, kv_heads, group, dim, dtype, sparsity=0.5, window=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch, keep = len(comp_lens), keep_count(dim, sparsity)
    k = torch.randn(batch, kv_heads, max(max(comp_lens), 1), dim, generator=g).to(dtype)
    v = torch.randn(k.shape, generator=g).to(dtype)
    compressed = compress_kv(k, v, torch.tensor(comp_lens), k_keep=keep, v_keep=keep)
    k_rec = torch.randn(batch, kv_heads, window, dim, generator=g).to(dtype)
    v_rec = torch.randn(k_rec.shape, generator=g).to(dtype)
    q = torch.randn(batch, kv_heads * group, dim, generator=g).to(dtype)
    return q, compressed, k_rec, v_rec, torch.tensor(rec_lens, dtype=torch.int32)


def float64_reference(q, compressed, k_rec, v_rec, rec, scale):
    """The oracle on the decompressed (= pruned, see test_kv_pruning) context, in float64."""
    k, v, cu = context_tokens(compressed, k_rec, v_rec, rec)
    out, lse = attention_reference_varlen(q.double(), k.double(), v.double(), list(range(q.shape[0] + 1)), cu, None,
                                          False, scale, compute_dtype=torch.float64)
    return out, lse.transpose(0, 1)


@requires_extension
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("lens", [([37, 0, 5, 1], [4, 3, 0, 4]), ([0, 0], [1, 4]), ([70, 0], [0, 0])])
def test_compressed_decode_matches_float64_reference(dim, group, lens):
    q, compressed, k_rec, v_rec, rec = make_case(*lens, kv_heads=2, group=group, dim=dim, dtype=torch.float32)
    scale = dim ** -0.5
    out, lse = compressed_decode_attention(q, compressed, k_rec, v_rec, rec, scale=scale)
    ref_out, ref_lse = float64_reference(q, compressed, k_rec, v_rec, rec, scale)
    empty = torch.tensor([c + r == 0 for c, r in zip(*lens)])
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty].double(), atol=1e-5, rtol=1e-5)
    assert bool((lse[empty] == float("-inf")).all()) and bool((out[empty] == 0).all())
    # The PyTorch path agrees with the C++ op.
    torch_out, torch_lse = compressed_decode_attention_torch(q, compressed, k_rec, v_rec, rec, scale)
    torch.testing.assert_close(out, torch_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch_lse, atol=1e-5, rtol=1e-5)


@requires_extension
@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_compressed_decode_half_precision(dtype, atol):
    q, compressed, k_rec, v_rec, rec = make_case([33, 2, 0], [3, 0, 2], 3, 3, 128, dtype, sparsity=0.7)
    out, lse = compressed_decode_attention(q, compressed, k_rec, v_rec, rec, scale=0.1)
    ref_out, ref_lse = float64_reference(q, compressed, k_rec, v_rec, rec, 0.1)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=atol)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=atol, rtol=atol)


@requires_extension
def test_cache_decode_dispatches_to_the_extension(monkeypatch):
    """On CPU tensors the "cpu" backend runs the C++ op (capacity layout of a growing cache)."""
    import sparse_attn.decode.kv_pruning as kv_pruning

    cache = KVPruningConfig(sparsity=0.5, recent_tokens=4, compress_every=8).make_cache(2, 64, batch_size=2,
                                                                                         dtype=torch.float32)
    cache.append(torch.randn(2, 2, 30, 64), torch.randn(2, 2, 30, 64))
    cache.append(torch.randn(2, 9, 64), torch.randn(2, 9, 64), seq=1)
    calls = []
    monkeypatch.setattr(kv_pruning, "compressed_decode_attention_ext",
                        lambda *a, **kw: calls.append(1) or compressed_decode_attention(*a, **kw))
    q = torch.randn(2, 6, 64)
    out = kv_pruning.pruned_decode_attention(q, cache, backend="cpu")
    ref = kv_pruning.pruned_decode_attention(q, cache, backend="reference")
    assert calls == [1]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@requires_extension
def test_compressed_decode_bad_input():
    q, compressed, k_rec, v_rec, rec = make_case([5, 2], [1, 1], 2, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="q must be"):
        compressed_decode_attention(q.int(), compressed, k_rec, v_rec, rec)
    with pytest.raises(ValueError, match="max_context"):
        compressed_decode_attention(q, compressed, k_rec, v_rec, rec, max_context=-1)
    with pytest.raises(ValueError, match="recent_lengths"):
        compressed_kv_attention(q, compressed, k_rec, v_rec, rec[:1])
    # The C++ checks name the argument (direct calls).
    c, ext = compressed, extension()
    args = dict(q=q, k_bitmaps=c.k_bitmaps, k_values=c.k_values, k_keep=c.k_keep, v_bitmaps=c.v_bitmaps,
                v_values=c.v_values, v_keep=c.v_keep, offsets=c.offsets, comp_lengths=c.lengths, k_recent=k_rec,
                v_recent=v_rec, recent_lengths=rec, scale=0.125)
    ext.compressed_decode_attention(**args)  # valid
    for name, bad in (("k_values", c.k_values.half()), ("offsets", c.offsets + 1000), ("k_keep", 0),
                      ("q", q[0]), ("recent_lengths", rec + 10), ("scale", -1.0), ("comp_lengths", c.lengths.long())):
        with pytest.raises(RuntimeError, match=name):
            ext.compressed_decode_attention(**{**args, name: bad})
