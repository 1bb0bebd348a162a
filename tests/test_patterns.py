"""Pattern builders: each one's block choice checked against its token-level definition."""

import random

import pytest
import torch

from sparse_attn import AShape, BlockSparseMask, Dense, PerHead, Strided, TopKBlocks, VerticalSlash
from sparse_attn.masks import causal_block_bounds


def build(pattern, q_len, kv_len, heads=2, bq=16, bk=16, causal=True, **kw):
    return pattern.build_mask(q_lens=q_len, kv_lens=kv_len, num_heads=heads, q_block_size=bq, kv_block_size=bk, causal=causal, **kw)


def causal_blocks(q_len, kv_len, bq, bk):
    bounds = causal_block_bounds(q_len, kv_len, bq, bk)
    return torch.arange(-(-kv_len // bk))[None, :] < bounds[:, None]


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (40, 40), (17, 100), (1, 77)])
def test_dense_is_every_causal_block(q_len, kv_len):
    mask = build(Dense(), q_len, kv_len)
    assert torch.equal(mask.to_block_bool()[0, 0], causal_blocks(q_len, kv_len, 16, 16))
    assert mask.density() == pytest.approx(1.0)
    non_causal = build(Dense(), q_len, kv_len, causal=False)
    assert bool(non_causal.to_block_bool().all())


@pytest.mark.parametrize("sink,local,q_len,kv_len", [(16, 32, 128, 128), (0, 1, 64, 64), (20, 50, 33, 150), (100, 16, 1, 300)])
def test_a_shape_matches_token_definition(sink, local, q_len, kv_len):
    bq = bk = 16
    keep = build(AShape(sink, local), q_len, kv_len).to_block_bool()[0, 0]
    offset = kv_len - q_len
    for i in range(keep.shape[0]):
        rows = range(i * bq + offset, min((i + 1) * bq, q_len) + offset)
        for j in range(keep.shape[1]):
            keys = range(j * bk, min((j + 1) * bk, kv_len))
            wanted = any(c < sink or r - local < c <= r for r in rows for c in keys if c <= r)
            assert bool(keep[i, j]) == wanted, (i, j)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_strided_heads_cover_the_context(stride):
    mask = build(Strided(stride=stride, local_blocks=0), 160, 160, heads=stride)
    union = mask.to_block_bool()[0].any(0)
    assert torch.equal(union, causal_blocks(160, 160, 16, 16))
    if stride > 1:
        assert mask.density() < 1.0 / stride + 0.25


def test_top_k_blocks_with_explicit_scores():
    nq = nk = 6
    scores = torch.randn(2, nq, nk)
    k = 3
    keep = build(TopKBlocks(k=k, scores=scores), 96, 96).to_block_bool()[0]
    visible = causal_blocks(96, 96, 16, 16)
    for h in range(2):
        for i in range(nq):
            row = keep[h, i]
            assert int(row.sum()) == min(k, i + 1)
            assert bool(row[i])  # the diagonal block is always kept
            assert not bool((row & ~visible[i]).any())
            others = [j for j in range(i) if j != i]
            chosen = [j for j in others if row[j]]
            if len(others) > k - 1:  # the rest are the best-scoring visible blocks
                best = sorted(others, key=lambda j: -float(scores[h, i, j]))[: k - 1]
                assert sorted(chosen) == sorted(best)


def test_top_k_blocks_content_aware_finds_planted_block():
    torch.manual_seed(random.randrange(1 << 30))
    heads, d, n = 2, 16, 128
    q = torch.randn(n, heads, d) * 0.1
    k = torch.randn(n, 1, d) * 0.1
    direction = torch.randn(d)
    q[-16:] += direction  # the last query block ...
    k[32:48] += direction  # ... strongly matches KV block 2
    keep = build(TopKBlocks(k=2), n, n, heads=heads, q=q, k=k).to_block_bool()[0]
    assert bool(keep[:, -1, 2].all()) and bool(keep[:, -1, -1].all())


def test_vertical_slash_with_full_budget_is_dense_and_finds_planted_column():
    torch.manual_seed(random.randrange(1 << 30))
    n, heads, d = 160, 3, 16
    q, k = torch.randn(n, heads, d), torch.randn(n, 1, d)
    full = build(VerticalSlash(vertical=n, slash=n, last_q=16), n, n, heads=heads, q=q, k=k)
    assert torch.equal(full.to_block_bool()[0], causal_blocks(n, n, 16, 16).expand(heads, -1, -1))

    q, k = torch.randn(n, heads, d) * 0.05, torch.randn(n, 1, d) * 0.05
    direction = torch.randn(d) * 3
    q += direction  # every query attends to key 70 (a "vertical" line in KV block 4)
    k[70] += direction
    keep = build(VerticalSlash(vertical=2, slash=1, last_q=16), n, n, heads=heads, q=q, k=k).to_block_bool()[0]
    visible = causal_blocks(n, n, 16, 16)
    assert bool(keep[:, 5:, 4].all())  # the column's block, for every query block that can see it
    assert bool(keep[:, :, 0].all())  # the sink column is always kept
    diag = torch.eye(keep.shape[1], dtype=torch.bool)
    assert bool(keep[:, diag].all())  # the main diagonal is always kept
    assert not bool((keep & ~visible).any())
    assert full.density() > build(VerticalSlash(vertical=2, slash=1, last_q=16), n, n, heads=heads, q=q, k=k).density()


def test_per_head_mixes_patterns():
    mask = build(PerHead((Dense(), AShape(16, 16), Strided(2, 0))), 96, 96, heads=3)
    keep = mask.to_block_bool()[0]
    assert torch.equal(keep[0], build(Dense(), 96, 96).to_block_bool()[0, 0])
    assert torch.equal(keep[1], build(AShape(16, 16), 96, 96).to_block_bool()[0, 0])
    assert torch.equal(keep[2], build(Strided(2, 0), 96, 96, heads=3).to_block_bool()[0, 2])
    with pytest.raises(ValueError, match="query heads"):
        build(PerHead((Dense(), Dense())), 96, 96, heads=3)


def test_ragged_batch_uses_each_sequence_offset():
    # sequence 0: 3 new queries at the end of a 50-token context; sequence 1: a fresh 40-token prompt
    mask = Dense().build_mask(q_lens=[3, 40], kv_lens=[50, 40], num_heads=1, q_block_size=16, kv_block_size=16)
    keep = mask.to_block_bool()[:, 0]
    assert mask.q_len == 40 and mask.kv_len == 50
    assert keep[0, 0].tolist() == [True, True, True, True]  # rows 47..49 see every block of the 50 keys
    assert not bool(keep[0, 1:].any())  # no query block 1, 2 in sequence 0
    assert keep[1, 0].tolist() == [True, False, False, False]
    assert keep[1, 2].tolist() == [True, True, True, False]


@pytest.mark.parametrize("make,message", [
    (lambda: VerticalSlash().build_mask(q_lens=8, kv_lens=8, num_heads=1), "needs q and k"),
    (lambda: Dense().build_mask(q_lens=9, kv_lens=8, num_heads=1), "q_len <= kv_len"),
    (lambda: Dense().build_mask(q_lens=[1, 2], kv_lens=[3], num_heads=1), "same, non-empty batch"),
    (lambda: Dense().build_mask(q_lens=8, kv_lens=8, num_heads=1, q_block_size=0), "q_block_size"),
    (lambda: AShape(sink_tokens=-1), "sink_tokens"),
    (lambda: Strided(stride=0), "stride"),
    (lambda: TopKBlocks(k=0), "k must be"),
    (lambda: VerticalSlash(vertical=0), "vertical"),
    (lambda: TopKBlocks(k=2, scores=torch.zeros(1, 2, 2)).build_mask(q_lens=48, kv_lens=48, num_heads=1, q_block_size=16, kv_block_size=16), "scores must be"),
])
def test_bad_configuration_raises(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_every_builder_returns_valid_masks():
    n, heads = 90, 4
    q, k = torch.randn(n, heads, 8), torch.randn(n, 2, 8)
    for pattern in (Dense(), AShape(8, 24), Strided(3), VerticalSlash(5, 5, 8), TopKBlocks(2)):
        mask = build(pattern, n, n, heads=heads, q=q, k=k)
        assert isinstance(mask, BlockSparseMask)
        mask.validate()
        assert not bool((mask.to_block_bool()[0] & ~causal_blocks(n, n, 16, 16)).any())


@pytest.mark.parametrize("pattern", [Strided(stride=2, local_blocks=1), TopKBlocks(k=1), AShape(0, 1)])
@pytest.mark.parametrize("q_len,kv_len,bq,bk", [(70, 70, 32, 16), (20, 45, 16, 16), (9, 100, 64, 16)])
def test_every_row_keeps_its_own_key(pattern, q_len, kv_len, bq, bk):
    """Query blocks wider than KV blocks, or offsets off the block grid, span several KV blocks: none may drop a row."""
    q, k = torch.randn(q_len, 2, 8), torch.randn(kv_len, 1, 8)
    mask = build(pattern, q_len, kv_len, heads=2, bq=bq, bk=bk, q=q, k=k)
    tokens = mask.to_token_mask()[0]  # [H, q_len, kv_len]
    rows = torch.arange(q_len) + kv_len - q_len
    assert bool(tokens[:, torch.arange(q_len), rows].all())
