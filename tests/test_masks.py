"""Invariants of the shared sparse representation (BlockSparseMask) and its validation errors."""

import random

import pytest
import torch

from sparse_attn import BlockSparseMask
from sparse_attn.masks import causal_block_bounds, num_blocks


def random_keep(b, h, nq, nk, p=0.4, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else random.randrange(1 << 30))
    return torch.rand(b, h, nq, nk, generator=g) < p


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (1, 4, 9, 2), (3, 1, 4, 4)])
def test_block_bool_round_trip(shape):
    keep = random_keep(*shape)
    keep[0, 0, 0] = False  # an empty row
    b, h, nq, nk = shape
    mask = BlockSparseMask.from_block_bool(keep, q_block_size=16, kv_block_size=32, q_len=nq * 16 - 3, kv_len=nk * 32 - 1)
    assert mask.kv_num_blocks.dtype == torch.int32 and mask.kv_indices.dtype == torch.int32
    assert torch.equal(mask.kv_num_blocks, keep.sum(-1).int())
    assert torch.equal(mask.to_block_bool(), keep)
    mask.validate()
    # ascending within the count, padding zero past it
    for idx, n in zip(mask.kv_indices.reshape(-1, mask.kv_indices.shape[-1]), mask.kv_num_blocks.flatten()):
        used = idx[: int(n)]
        assert torch.all(used[1:] > used[:-1])
        assert torch.all(idx[int(n):] == 0)


def test_token_mask_expands_blocks():
    keep = torch.tensor([[[[True, False, True], [False, True, False]]]])
    mask = BlockSparseMask.from_block_bool(keep, q_block_size=2, kv_block_size=3, q_len=3, kv_len=8)
    tokens = mask.to_token_mask()
    assert tokens.shape == (1, 1, 3, 8)
    expected = torch.tensor([
        [1, 1, 1, 0, 0, 0, 1, 1],
        [1, 1, 1, 0, 0, 0, 1, 1],
        [0, 0, 0, 1, 1, 1, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(tokens[0, 0], expected)


def test_token_indices_are_a_mask_with_unit_blocks():
    idx = torch.tensor([[[0, 3, 7], [1, 2, 0]]])
    counts = torch.tensor([[3, 2]])
    mask = BlockSparseMask.from_token_indices(idx, counts, kv_len=9)
    assert (mask.q_block_size, mask.kv_block_size, mask.num_q_blocks) == (1, 1, 1)
    tokens = mask.to_token_mask()
    assert tokens[0, 0, 0].nonzero().flatten().tolist() == [0, 3, 7]
    assert tokens[0, 1, 0].nonzero().flatten().tolist() == [1, 2]


@pytest.mark.parametrize("q_len,kv_len,bq,bk", [(1, 1, 64, 64), (100, 100, 16, 32), (7, 130, 4, 16), (64, 64, 64, 64)])
def test_causal_block_bounds_match_token_rule(q_len, kv_len, bq, bk):
    bounds = causal_block_bounds(q_len, kv_len, bq, bk)
    assert bounds.shape == (num_blocks(q_len, bq),)
    offset = kv_len - q_len
    for i, bound in enumerate(bounds.tolist()):
        last_row = min((i + 1) * bq, q_len) - 1 + offset
        visible = {key // bk for key in range(last_row + 1)}
        assert bound == max(visible) + 1


def test_density_and_expand():
    nq = 4
    keep = torch.ones(1, 1, nq, nq, dtype=torch.bool).tril()
    mask = BlockSparseMask.from_block_bool(keep, q_block_size=8, kv_block_size=8, q_len=32, kv_len=32)
    assert mask.density(causal=True) == pytest.approx(1.0)
    assert mask.density(causal=False) == pytest.approx(10 / 16)
    wide = mask.expand(3, 5)
    assert wide.kv_num_blocks.shape == (3, 5, nq) and wide.kv_num_blocks.stride(0) == 0
    with pytest.raises(ValueError, match="broadcast"):
        wide.expand(2, 5)


def _mask(**overrides):
    fields = dict(
        kv_num_blocks=torch.tensor([[[1, 2]]], dtype=torch.int32),
        kv_indices=torch.tensor([[[[0, 0], [0, 1]]]], dtype=torch.int32),
        q_block_size=16, kv_block_size=16, q_len=32, kv_len=32,
    )
    fields.update(overrides)
    return BlockSparseMask(**fields)


@pytest.mark.parametrize("overrides,field", [
    (dict(kv_num_blocks=torch.tensor([[[1, 2]]])), "kv_num_blocks must be int32"),
    (dict(kv_indices=torch.zeros(1, 1, 2, 2, dtype=torch.float32)), "kv_indices must be int32"),
    (dict(kv_num_blocks=torch.ones(1, 2, dtype=torch.int32)), "kv_num_blocks must be"),
    (dict(kv_indices=torch.zeros(1, 1, 3, 2, dtype=torch.int32)), "kv_indices must be"),
    (dict(q_block_size=0), "q_block_size"),
    (dict(kv_len=-1), "kv_len"),
    (dict(q_len=100), "query blocks"),
])
def test_structure_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        _mask(**overrides)


@pytest.mark.parametrize("overrides,message", [
    (dict(kv_indices=torch.tensor([[[[0, 0], [0, 2]]]], dtype=torch.int32)), "out of range"),
    (dict(kv_indices=torch.tensor([[[[-1, 0], [0, 1]]]], dtype=torch.int32)), "out of range"),
    (dict(kv_indices=torch.tensor([[[[0, 0], [1, 0]]]], dtype=torch.int32)), "ascending"),
    (dict(kv_num_blocks=torch.tensor([[[1, 3]]], dtype=torch.int32)), "kv_num_blocks must lie"),
])
def test_value_errors_name_the_problem(overrides, message):
    mask = _mask(**overrides)  # structure is fine: values are checked on demand
    with pytest.raises(ValueError, match=message):
        mask.validate()


def test_from_block_bool_checks_shape():
    with pytest.raises(ValueError, match="need"):
        BlockSparseMask.from_block_bool(torch.ones(1, 1, 2, 2, dtype=torch.bool), q_block_size=16, kv_block_size=16, q_len=40, kv_len=32)
    with pytest.raises(ValueError, match="bool"):
        BlockSparseMask.from_block_bool(torch.ones(1, 1, 2, 2), q_block_size=16, kv_block_size=16, q_len=32, kv_len=32)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (1, 4, 9, 33), (3, 1, 2, 0)])
def test_block_rows_compression_matches_the_pytorch_rule(shape, monkeypatch):
    """from_block_bool on CPU compresses in one C++ pass where the extension is built; the rows equal the PyTorch
    rule's (ascending ids, zero past the count, width the largest count), empty rows included."""
    from sparse_attn.masks import block_mask

    g = torch.Generator().manual_seed(sum(shape))
    keep = torch.rand(shape, generator=g) < 0.4
    if keep.numel():
        keep[0, 0, 0] = False  # an empty row
    q_len, kv_len = shape[2] * 16, max(shape[3] * 16 - 5, 0)
    sizes = dict(q_block_size=16, kv_block_size=16, q_len=q_len, kv_len=kv_len)
    fast = BlockSparseMask.from_block_bool(keep, **sizes)
    monkeypatch.setattr(block_mask, "_BLOCK_ROWS", None)  # the PyTorch rule
    slow = BlockSparseMask.from_block_bool(keep, **sizes)
    assert fast.kv_num_blocks.dtype == slow.kv_num_blocks.dtype == torch.int32
    assert torch.equal(fast.kv_num_blocks, slow.kv_num_blocks) and torch.equal(fast.kv_indices, slow.kv_indices)
    assert torch.equal(fast.to_block_bool(), keep)
