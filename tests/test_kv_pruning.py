"""KV-cache pruning: magnitude pruning, the bitmap-compressed format, the growing cache, byte accounting, and decode
on the compressed cache (PyTorch path and reference backend) against a float64 oracle on the pruned tensors."""

import pytest
import torch

from sparse_attn.decode.compressed import (
    TILE,
    CompressedKV,
    compress_kv,
    compress_tokens,
    compressed_decode_attention_torch,
    decompress_tokens,
    keep_count,
    num_tiles,
    tile_masks,
)
from sparse_attn.decode.kv_pruning import (
    KVPruningConfig,
    compressed_kv_attention,
    prune_magnitude,
    pruned_decode_attention,
)
from backends import pruned_reference


# ---------------------------------------------------------------------------------------------- pruning and format
@pytest.mark.parametrize("dim, sparsity, keep", [(128, 0.5, 64), (128, 0.7, 38), (64, 0.7, 19), (64, 0.0, 64),
                                                 (64, 0.999, 1), (96, 0.5, 48)])
def test_keep_count(dim, sparsity, keep):
    assert keep_count(dim, sparsity) == keep


def test_prune_magnitude_keeps_largest_and_breaks_ties_low():
    x = torch.tensor([[1.0, -5.0, 3.0, 0.5], [2.0, 2.0, 2.0, 2.0]])
    assert torch.equal(prune_magnitude(x, 0.5), torch.tensor([[0.0, -5.0, 3.0, 0.0], [2.0, 2.0, 0.0, 0.0]]))
    x = torch.randn(5, 7, 64)
    pruned = prune_magnitude(x, 0.7)
    kept = pruned != 0
    assert torch.equal(kept.sum(-1), torch.full((5, 7), 19))
    smallest_kept = torch.where(kept, x.abs(), torch.inf).amin(-1)
    largest_dropped = torch.where(kept, -torch.inf, x.abs()).amax(-1)
    assert bool((smallest_kept >= largest_dropped).all())
    assert torch.equal(pruned[kept], x[kept])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [32, 64, 96, 128])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7])
def test_compression_round_trip_is_exact(dim, sparsity, dtype):
    x = torch.randn(3, 41, dim).to(dtype)
    x[0, 0, :5] = 0  # exact zeros among the kept entries are stored as zeros
    pruned = prune_magnitude(x, sparsity)
    keep = keep_count(dim, sparsity)
    bitmaps, values = compress_tokens(pruned, keep)
    assert bitmaps.dtype == torch.int64 and bitmaps.shape == (3, 41, num_tiles(dim))
    assert values.dtype == dtype and values.shape == (3, 41, keep)
    assert torch.equal(decompress_tokens(bitmaps, values, dim), pruned)
    # Compressing the unpruned tensor selects the same entries.
    assert torch.equal(decompress_tokens(*compress_tokens(x, keep), dim), pruned)


@pytest.mark.parametrize("dim", [64, 96, 128])
def test_bitmap_invariants(dim):
    keep = keep_count(dim, 0.5)
    x = torch.randn(200, dim)
    x[0, 63] = 100.0  # channel 63: the sign bit of tile 0
    bitmaps, values = compress_tokens(x, keep)
    assert int(bitmaps[0, 0]) < 0
    all_bits = tile_masks(bitmaps, num_tiles(dim) * TILE)
    assert torch.equal(all_bits.sum(-1), torch.full((200,), keep))  # popcount over a token's tiles == keep
    assert not bool(all_bits[:, dim:].any())  # no bit past head_dim
    # Tile c's values start after the popcounts of the earlier tiles, in channel order.
    channels = all_bits.nonzero()[:, 1].view(200, keep)
    assert bool((channels.diff(dim=-1) > 0).all())
    assert torch.equal(values, x.gather(-1, channels))
    first_tile_count = tile_masks(bitmaps[:, :1], TILE).sum(-1)
    assert torch.equal(first_tile_count, (channels < TILE).sum(-1))


# ---------------------------------------------------------------------------------------------- the growing cache
def _cache(sparsity=0.5, recent=4, every=8, heads=2, dim=64, batch=1, dtype=torch.float32, **kw):
    return KVPruningConfig(sparsity=sparsity, recent_tokens=recent, compress_every=every, **kw).make_cache(
        heads, dim, batch_size=batch, dtype=dtype)


@pytest.mark.parametrize("chunks", [[1] * 40, [30, 1, 1, 1, 9, 1], [100], [3, 50, 2]])
def test_cache_compresses_in_batches_and_round_trips(chunks):
    recent, every = 4, 8
    cache = _cache(recent=recent, every=every)
    k_all, v_all = torch.randn(2, sum(chunks), 64), torch.randn(2, sum(chunks), 64)
    start = 0
    for n in chunks:
        before = cache.comp_lengths[0]
        cache.append(k_all[:, start:start + n], v_all[:, start:start + n])
        start += n
        comp, rec = cache.comp_lengths[0], cache.recent_lengths[0]
        assert comp + rec == start and rec < recent + every
        if comp != before:  # a compression leaves exactly the recent window dense
            assert rec == recent
        k, v = cache.decompress()
        assert torch.equal(k[:, :comp], prune_magnitude(k_all[:, :comp], 0.5))
        assert torch.equal(v[:, :comp], prune_magnitude(v_all[:, :comp], 0.5))
        assert torch.equal(k[:, comp:], k_all[:, comp:start]) and torch.equal(v[:, comp:], v_all[:, comp:start])


def test_batched_cache_append_per_sequence_and_all():
    cache = _cache(batch=3)
    data = [torch.randn(2, n, 64) for n in (23, 0, 9)]
    for b, x in enumerate(data):
        cache.append(x, -x, seq=b)
    both = torch.randn(3, 2, 5, 64)
    cache.append(both, both)
    assert cache.lengths == [28, 5, 14]
    for b, x in enumerate(data):
        k, v = cache.decompress(b)
        full = torch.cat([x, both[b]], 1)
        comp = cache.comp_lengths[b]
        assert torch.equal(k[:, :comp], prune_magnitude(full[:, :comp], 0.5))
        assert torch.equal(k[:, comp:], full[:, comp:])
    cv = cache.compressed()
    cv.validate()
    assert cv.offsets.tolist() == [[0, cache.capacity], [2 * cache.capacity, 3 * cache.capacity],
                                   [4 * cache.capacity, 5 * cache.capacity]]


@pytest.mark.parametrize("sparsity, keep", [(0.5, 64), (0.7, 38)])
def test_byte_accounting(sparsity, keep):
    heads, dim, batch = 4, 128, 2
    cache = _cache(sparsity=sparsity, recent=32, every=256, heads=heads, dim=dim, batch=batch, dtype=torch.float16)
    cache.append(torch.randn(batch, heads, 1056, dim), torch.randn(batch, heads, 1056, dim))  # compresses 1024
    assert cache.comp_lengths == [1024, 1024] and cache.recent_lengths == [32, 32]
    per_compressed = 2 * (2 * 8) + 2 * keep * 2  # K and V: two int64 bitmaps and `keep` fp16 values each
    per_dense = 2 * dim * 2
    expected = batch * heads * (1024 * per_compressed + 32 * per_dense) + batch * heads * 8 + 2 * batch * 4
    assert cache.nbytes == expected
    assert cache.dense_nbytes == batch * heads * 1056 * per_dense
    report = cache.memory_report()
    assert report["ratio"] == pytest.approx(expected / cache.dense_nbytes)
    if sparsity == 0.7:
        assert per_compressed / per_dense <= 0.40  # the KV-memory target for 70% sparsity
    assert cache.allocated_nbytes >= cache.nbytes - (batch * heads * 8 + 2 * batch * 4)


def test_unpruned_side_keeps_everything():
    cache = _cache(prune_keys=False)
    k, v = torch.randn(2, 20, 64), torch.randn(2, 20, 64)
    cache.append(k, v)
    kd, vd = cache.decompress()
    comp = cache.comp_lengths[0]
    assert comp > 0 and cache.k_keep == 64
    assert torch.equal(kd, k) and torch.equal(vd[:, :comp], prune_magnitude(v[:, :comp], 0.5))


# ---------------------------------------------------------------------------------------------- decode
def make_case(comp_lens, rec_lens, kv_heads, group, dim, dtype, sparsity=0.5, window=None, seed=0):
    """A ragged batch: compressed (tightly packed) and recent parts, plus the pruned per-sequence contexts."""
    g = torch.Generator().manual_seed(seed)
    batch, window = len(comp_lens), window or max(max(rec_lens), 1)
    keep = keep_count(dim, sparsity)
    max_comp = max(max(comp_lens), 1)
    k = torch.randn(batch, kv_heads, max_comp, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, max_comp, dim, generator=g).to(dtype)
    compressed = compress_kv(k, v, torch.tensor(comp_lens), k_keep=keep, v_keep=keep)
    k_rec = torch.randn(batch, kv_heads, window, dim, generator=g).to(dtype)
    v_rec = torch.randn(batch, kv_heads, window, dim, generator=g).to(dtype)
    rec = torch.tensor(rec_lens, dtype=torch.int32)
    q = torch.randn(batch, kv_heads * group, dim, generator=g).to(dtype)
    parts = list(enumerate(zip(comp_lens, rec_lens)))
    keys = [torch.cat([prune_magnitude(k[b, :, :c], sparsity), k_rec[b, :, :r]], 1) for b, (c, r) in parts]
    values = [torch.cat([prune_magnitude(v[b, :, :c], sparsity), v_rec[b, :, :r]], 1) for b, (c, r) in parts]
    return q, compressed, k_rec, v_rec, rec, keys, values


def assert_matches_reference(out, lse, q, keys, values, scale, atol):
    ref_out, ref_lse = pruned_reference(q, keys, values, scale)
    empty = torch.tensor([k.shape[1] == 0 for k in keys])
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=atol)
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty].double(), atol=atol, rtol=atol)
    assert bool((lse[empty] == float("-inf")).all()) and bool((out[empty] == 0).all())


CASES = [  # (compressed lengths, recent lengths): ragged, window boundaries (0 / full), nothing compressed, empty
    ([37, 0, 5, 1], [4, 3, 0, 4]),
    ([0, 0], [1, 4]),
    ([64, 0], [0, 0]),
]


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("lens", CASES)
def test_torch_decode_matches_float64_reference(dim, group, lens):
    q, compressed, k_rec, v_rec, rec, keys, values = make_case(*lens, kv_heads=2, group=group, dim=dim,
                                                               dtype=torch.float32)
    scale = dim ** -0.5
    out, lse = compressed_decode_attention_torch(q, compressed, k_rec, v_rec, rec, scale)
    assert_matches_reference(out, lse, q, keys, values, scale, atol=1e-5)
    out, lse = compressed_kv_attention(q, compressed, k_rec, v_rec, rec, backend="reference", return_lse=True)
    assert_matches_reference(out, lse, q, keys, values, scale, atol=1e-5)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_torch_decode_half_precision(dtype, atol):
    q, compressed, k_rec, v_rec, rec, keys, values = make_case([20, 3], [2, 0], 2, 3, 64, dtype)
    out, lse = compressed_decode_attention_torch(q, compressed, k_rec, v_rec, rec, 0.125)
    assert_matches_reference(out, lse, q, keys, values, 0.125, atol=atol)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_decode_through_the_cache(backend):
    cache = _cache(sparsity=0.7, recent=4, every=8, heads=3, dim=64, batch=2)
    data = [(torch.randn(3, n, 64), torch.randn(3, n, 64)) for n in (29, 6)]
    for b, (k, v) in enumerate(data):
        cache.append(k, v, seq=b)
    q = torch.randn(2, 9, 64)
    out, lse = pruned_decode_attention(q, cache, backend=backend, return_lse=True)
    keys = [torch.cat([prune_magnitude(k[:, :c], 0.7), k[:, c:]], 1) for (k, _), c in zip(data, cache.comp_lengths)]
    values = [torch.cat([prune_magnitude(v[:, :c], 0.7), v[:, c:]], 1) for (_, v), c in zip(data, cache.comp_lengths)]
    assert_matches_reference(out, lse, q, keys, values, 0.125, atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, name", [
    ({"sparsity": -0.1}, "sparsity"), ({"sparsity": 1.0}, "sparsity"), ({"sparsity": "0.5"}, "sparsity"),
    ({"sparsity": True}, "sparsity"), ({"recent_tokens": -1}, "recent_tokens"),
    ({"compress_every": 0}, "compress_every"), ({"prune_keys": "yes"}, "prune_keys"),
])
def test_config_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        KVPruningConfig(**kwargs)


def test_prune_and_cache_bad_input():
    with pytest.raises(ValueError, match="sparsity"):
        prune_magnitude(torch.randn(4, 64), 1.5)
    cache = _cache(batch=2)
    with pytest.raises(ValueError, match="seq"):
        cache.append(torch.randn(2, 3, 64), torch.randn(2, 3, 64))
    with pytest.raises(ValueError, match="KV heads"):
        cache.append(torch.randn(3, 3, 64), torch.randn(3, 3, 64), seq=0)
    with pytest.raises(ValueError, match="head_dim"):
        KVPruningConfig().make_cache(2, 300)


def test_decode_bad_input():
    q, compressed, k_rec, v_rec, rec, _, _ = make_case([5, 2], [1, 1], 2, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="q must be"):
        compressed_kv_attention(q[0], compressed, k_rec, v_rec, rec)
    with pytest.raises(ValueError, match="recent_lengths"):
        compressed_kv_attention(q, compressed, k_rec, v_rec, torch.tensor([1, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="k_recent"):
        compressed_kv_attention(q, compressed, k_rec[:, :1], v_rec, rec)
    with pytest.raises(ValueError, match="compressed values"):
        compressed_kv_attention(q.half(), compressed, k_rec.half(), v_rec.half(), rec)
    with pytest.raises(ValueError, match="scale"):
        compressed_kv_attention(q, compressed, k_rec, v_rec, rec, scale=-1.0)
    bad = CompressedKV(compressed.k_bitmaps, compressed.k_values, compressed.v_bitmaps, compressed.v_values,
                       compressed.offsets + 100, compressed.lengths, 64, compressed.k_keep, compressed.v_keep)
    with pytest.raises(ValueError, match="slot"):
        compressed_kv_attention(q, bad, k_rec, v_rec, rec)
    with pytest.raises(ValueError, match="triton"):
        compressed_kv_attention(q, compressed, k_rec, v_rec, rec, backend="triton")
    with pytest.raises(ValueError, match="cuda"):
        compressed_kv_attention(q, compressed, k_rec, v_rec, rec, backend="cuda")
