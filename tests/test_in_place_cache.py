"""sparse_attn.InPlaceCache: the same keys and values as transformers' DynamicCache after every update (prefill,
decode steps, growth past the reserved rows, crop, beam reordering, batch selection), without copying the filled
rows on an update that fits; and what model.generate uses once sparse_attn.configure ran."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

import sparse_attn  # noqa: E402
from sparse_attn.integrations import cache as cache_module  # noqa: E402


def states(batch, heads, n, dim=8, generator=None):
    return (torch.randn(batch, heads, n, dim, generator=generator, dtype=torch.float64),
            torch.randn(batch, heads, n, dim, generator=generator, dtype=torch.float64))


def assert_same(got: tuple, want: tuple):
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert torch.equal(g, w)


def test_updates_match_dynamic_cache_and_append_in_place(monkeypatch):
    monkeypatch.setattr(cache_module, "MIN_SPARE", 8)  # small reserve: the steps below grow the buffers twice
    gen = torch.Generator().manual_seed(0)
    ours, theirs = sparse_attn.InPlaceCache(), DynamicCache()
    lengths = [37, 1, 1, 5, 1] + [1] * 20 + [30]
    grown = 0
    for n in lengths:
        for layer in range(2):
            k, v = states(2, 3, n, generator=gen)
            before = ours.layers[layer]._key_buffer if layer < len(ours.layers) else None
            got = ours.update(k, v, layer)
            assert_same(got, theirs.update(k, v, layer))
            buffer = ours.layers[layer]._key_buffer
            if before is not None and buffer.data_ptr() != before.data_ptr():
                grown += 1
            else:  # appended in place: the returned keys are a view of the same buffer
                assert got[0].data_ptr() == buffer.data_ptr()
    assert grown >= 4  # each layer reallocated at least twice
    assert ours.get_seq_length() == theirs.get_seq_length() == sum(lengths)


def test_crop_reorder_and_batch_select_keep_matching():
    gen = torch.Generator().manual_seed(1)
    ours, theirs = sparse_attn.InPlaceCache(), DynamicCache()
    k, v = states(3, 2, 20, generator=gen)
    for c in (ours, theirs):
        c.update(k, v, 0)
    for c in (ours, theirs):
        c.crop(-6)  # drop the last 6 tokens; the next update overwrites those rows of the buffer
    k, v = states(3, 2, 2, generator=gen)
    assert_same(ours.update(k, v, 0), theirs.update(k, v, 0))
    beams = torch.tensor([2, 0, 0])
    for c in (ours, theirs):
        c.reorder_cache(beams)
    k, v = states(3, 2, 1, generator=gen)
    assert_same(ours.update(k, v, 0), theirs.update(k, v, 0))
    for c in (ours, theirs):
        c.batch_select_indices(torch.tensor([0, 2]))
    k, v = states(2, 2, 1, generator=gen)
    assert_same(ours.update(k, v, 0), theirs.update(k, v, 0))
    assert ours.get_seq_length() == theirs.get_seq_length() == 18
    ours.reset()
    k, v = states(2, 2, 4, generator=gen)
    assert_same(ours.update(k, v, 0), (k, v))


def test_mismatched_update_is_an_error():
    ours = sparse_attn.InPlaceCache()
    ours.update(*states(1, 2, 4), 0)
    with pytest.raises(RuntimeError):
        ours.update(*states(1, 3, 1), 0)  # a different number of heads cannot continue this layer
