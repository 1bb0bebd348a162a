"""A transformers KV cache that appends in place: :class:`InPlaceCache`.

transformers' default ``DynamicCache`` grows each layer with ``torch.cat``, so every decode step copies the whole
cache of every layer (at 6k tokens of SmolLM2, 30 layers x 9 MB read and written per token: more bytes than Double
Sparsity's attention reads). :class:`InPlaceCache` keeps each full-attention layer's keys and values in buffers
``[B, Hkv, capacity, D]`` with room to spare, writes new tokens into the free rows and hands the attention function
views ``[B, Hkv, L, D]`` of the filled rows (the sparse kernels read any strides; SDPA accepts them too). A buffer
that fills up is reallocated with a quarter more room, so the copies of a long generation stay linear in its length.

    cache = sparse_attn.InPlaceCache(model.config)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

Layers of other types (sliding windows) are transformers' own. Cropping, beam reordering and batch selection keep
working: they replace a layer's tensors, and the next update adopts whatever the layer holds.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["InPlaceCache", "InPlaceLayer"]

#: Spare rows reserved on (re)allocation: a quarter of the filled length, at least this many.
MIN_SPARE = 256


class InPlaceLayer(DynamicLayer):
    """A full-attention cache layer whose keys / values are views of buffers with spare rows."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def _holds_views(self) -> bool:
        """Whether ``keys`` / ``values`` are still the filled rows of this layer's buffers (crop keeps them so;
        reordering, batch selection, offloading or a reset replace them)."""
        for held, buffer in ((self.keys, self._key_buffer), (self.values, self._value_buffer)):
            if (buffer is None or held is None or held.dim() != 4 or held.data_ptr() != buffer.data_ptr()
                    or held.stride() != buffer.stride() or held.shape[:2] != buffer.shape[:2]
                    or held.shape[3] != buffer.shape[3] or held.dtype != buffer.dtype or held.device != buffer.device):
                return False
        return True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.keys.shape[-2] if self.keys is not None and self.keys.dim() == 4 else 0
        end = held + key_states.shape[-2]
        if not self._holds_views() or end > self._key_buffer.shape[2] \
                or key_states.shape[:2] != self._key_buffer.shape[:2]:
            self._reallocate(key_states, value_states, held, end)
        self._key_buffer[:, :, held:end].copy_(key_states)
        self._value_buffer[:, :, held:end].copy_(value_states)
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    def _reallocate(self, key_states: torch.Tensor, value_states: torch.Tensor, held: int, end: int) -> None:
        capacity = end + max(MIN_SPARE, end // 4)
        batch, heads = key_states.shape[:2]
        keys = key_states.new_empty(batch, heads, capacity, key_states.shape[3])
        values = value_states.new_empty(batch, heads, capacity, value_states.shape[3])
        if held:
            keys[:, :, :held].copy_(self.keys)
            values[:, :, :held].copy_(self.values)
        self._key_buffer, self._value_buffer = keys, values

    def reset(self) -> None:
        super().reset()
        self._key_buffer = self._value_buffer = None


class InPlaceCache(DynamicCache):
    """``DynamicCache`` whose full-attention layers append in place (:class:`InPlaceLayer`); pass ``config`` (the
    model's config) so that layers of other types get transformers' own layer classes."""

    def __init__(self, config=None, **kwargs):
        super().__init__(config=config, **kwargs)
        if self.layer_class_to_replicate is DynamicLayer:
            self.layer_class_to_replicate = InPlaceLayer
        self.layers = [InPlaceLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
