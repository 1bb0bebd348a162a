"""Decode methods for :class:`sparse_attn.SparseAttention`: Double Sparsity and KV-cache pruning as small objects.

A method (:class:`DoubleSparsity`, :class:`KVPruning`) is the setting; :meth:`new_state` makes the per-layer state
that lives beside the model's KV cache. Where the state lives: transformers' cache layers (``DynamicCache``) hold
exactly a key and a value tensor per layer and cannot carry a label cache or a compressed cache cleanly, so the state
sits on the layer's ``SparseAttention`` module and follows the KV cache by position:

- every forward passes the layer's whole context k/v ``[B, Hkv, L, D]`` (the normal cache after the new tokens were
  appended, as transformers hands it to the attention function) and the number of new tokens (q_len);
- when the new tokens continue what the state absorbed (``L - q_len == absorbed``, same batch size) only they are
  absorbed (label cache write / compressed cache append); otherwise (a new prompt, a shorter or replaced cache, a
  different batch) the state resets and absorbs the whole context again. A new prefill therefore resets it by
  itself; :func:`sparse_attn.reset_decode_state` drops it explicitly (e.g. to free its memory after generation).

Decode rows (q_len == 1) then attend through the state: Double Sparsity scores every cached token with its label,
keeps the top-k (:func:`select_tokens`) and attends exactly over them in the contiguous cache viewed as pages
(:func:`as_paged_cache`); KV pruning attends over the compressed cache, so every token that left the dense recent
window is read with its pruned K and V. Prefill attention (q_len > 1) is the module's pattern over the unpruned K/V,
as in Mustafar, which prunes the cache the prefill writes.
"""

from __future__ import annotations

import torch

from ..ops.attention import resolve_backend
from ..ops.extension import block_sparse_attention_cpu as block_sparse_attention_cpp
from ..ops.extension import cpu_kernel_available, extension_available
from .attention import sparse_decode_attention
from .double_sparsity import DoubleSparsityConfig, LabelCache, select_tokens, select_tokens_cpu
from .kv_pruning import KVPruningConfig, pruned_decode_attention

__all__ = ["DecodeMethod", "DoubleSparsity", "KVPruning", "DecodeState"]


class DecodeState:
    """Per-layer state of a decode method, keyed to one batch of sequences by the number of tokens absorbed."""

    def __init__(self):
        self.absorbed = 0
        self.batch_size: int | None = None
        #: Fraction of the context the last decode step read (1.0 for methods that read every token).
        self.last_read = 1.0

    def reset(self) -> None:
        self.absorbed, self.batch_size = 0, None

    def update(self, k: torch.Tensor, v: torch.Tensor, new_tokens: int) -> None:
        """Absorb the last ``new_tokens`` of the context ``k/v [B, Hkv, L, D]``, or all of it after a reset."""
        context = k.shape[2]
        if self.batch_size != k.shape[0] or context - new_tokens != self.absorbed:
            self.reset()
            self.batch_size = k.shape[0]
            self._rebuild(k, v)
        else:
            self._append(k, v, self.absorbed)
        self.absorbed = context

    def _rebuild(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self._append(k, v, 0)

    def _append(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               backend: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode attention of ``q [B, Hq, D]`` over the absorbed context: ``(out [B, Hq, D], lse [B, Hq])``."""
        raise NotImplementedError


class DecodeMethod:
    """Base of the decode settings a :class:`sparse_attn.SparseAttention` accepts as ``decode=``."""

    def for_layer(self, layer: int) -> "DecodeMethod":
        """The setting of model layer ``layer`` (per-layer calibrations pick theirs)."""
        return self

    def check_head_dim(self, head_dim: int) -> None:
        pass

    def new_state(self) -> DecodeState:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------- Double Sparsity
class DoubleSparsity(DecodeMethod):
    """Double Sparsity decode: ``config`` (budget, sink/recent tokens, label bits) and the heavy channels, either
    ``[Hkv, r]`` for one layer or ``{layer: [Hkv, r]}`` for a model (see :func:`calibrate_double_sparsity`)."""

    def __init__(self, config: DoubleSparsityConfig, channels: torch.Tensor | dict[int, torch.Tensor]):
        if not isinstance(config, DoubleSparsityConfig):
            raise ValueError(f"config must be a DoubleSparsityConfig, got {type(config).__name__}")
        per_layer = channels if isinstance(channels, dict) else {None: channels}
        for layer, c in per_layer.items():
            name = "channels" if layer is None else f"channels[{layer}]"
            if not isinstance(c, torch.Tensor) or c.dim() != 2 or c.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{name} must be an integer tensor [Hkv, r], got {getattr(c, 'shape', type(c).__name__)}")
            if c.shape[1] != config.r:
                raise ValueError(f"{name} has {c.shape[1]} channels per KV head but config.r={config.r}")
            if c.numel() and int(c.min()) < 0:
                raise ValueError(f"{name} must hold non-negative channel ids")
        self.config = config
        self.channels = channels

    @property
    def per_layer(self) -> bool:
        return isinstance(self.channels, dict)

    def for_layer(self, layer: int) -> "DoubleSparsity":
        if not self.per_layer:
            return self
        if layer not in self.channels:
            raise ValueError(f"channels: layer {layer} is missing from the calibration "
                             f"(calibrated layers: {sorted(self.channels)})")
        return DoubleSparsity(self.config, self.channels[layer])

    def check_head_dim(self, head_dim: int) -> None:
        self.config.check_head_dim(head_dim)
        channels = self.channels.values() if self.per_layer else [self.channels]
        top = max((int(c.max()) for c in channels if c.numel()), default=-1)
        if top >= head_dim:
            raise ValueError(f"channels reach channel {top} but head_dim is {head_dim}")

    def new_state(self) -> "DoubleSparsityState":
        if self.per_layer:
            raise ValueError("channels: a per-layer calibration needs a layer; use for_layer(layer) or "
                             "sparse_attn.configure(model, decode=...)")
        return DoubleSparsityState(self)

    def __repr__(self) -> str:
        shape = f"{len(self.channels)} layers" if self.per_layer else f"channels={tuple(self.channels.shape)}"
        return f"DoubleSparsity({self.config}, {shape})"


class DoubleSparsityState(DecodeState):
    """The label cache of one layer: one page of ``capacity`` tokens per sequence, addressed like the contiguous
    KV cache viewed by :func:`as_paged_cache` (token t of sequence b at page b, offset t)."""

    def __init__(self, method: DoubleSparsity):
        super().__init__()
        self.method = method
        self.labels: LabelCache | None = None
        self._step: _StepTensors | None = None

    def reset(self) -> None:
        super().reset()
        self.labels = None

    def _append(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        batch, _, context, head_dim = k.shape
        if self.labels is None:
            self.method.check_head_dim(head_dim)
        if self.labels is None or self.labels.page_size < context:
            # Grow by doubling: the whole context is at hand, so the new cache is written from it.
            capacity = max(context, 2 * self.labels.page_size if self.labels is not None else 0, 64)
            self.labels = LabelCache.from_config(self.method.config, self.method.channels, batch, capacity,
                                                 dtype=k.dtype, device=k.device)
            start = 0
        if self.labels.bits == 16:  # unquantized: the heavy channels of the new keys, copied into page b in place
            new = k[:, :, start:].transpose(1, 2)  # [B, n, Hkv, D]
            self.labels.labels[:, start:context] = new.gather(3, self.labels.channels.expand(*new.shape[:2], -1, -1))
            return
        new = k[:, :, start:].transpose(1, 2).reshape(-1, k.shape[1], head_dim)  # [B * n, Hkv, D], token-major
        pages = torch.arange(batch, device=k.device)[:, None]  # sequence b owns page b
        slots = pages * self.labels.page_size + torch.arange(start, context, device=k.device)
        self.labels.write(new, slots.reshape(-1))

    def attend(self, q, k, v, scale, backend):
        batch, context = q.shape[0], k.shape[2]
        k_pages, v_pages = k.transpose(1, 2), v.transpose(1, 2)  # the contiguous cache as one page per sequence
        config = self.method.config
        if (q.device.type == "cpu" and cpu_kernel_available()
                and extension_available("decode_select") and resolve_backend(backend, q.device) == "cpu"):
            # Every row holds `context` tokens, so the step's sizes are host numbers: one C++ selection pass over the
            # labels and one attention pass over the selected tokens, with no per-layer tensor bookkeeping between.
            step = self._step_tensors(batch, context, q.device)
            selection = None
            if context >= config.dense_below:
                selection = select_tokens_cpu(q, self.labels.labels, self.labels.channels, step.block_table,
                                              step.seq_lens, step.budgets, config.max_token_budget(context), config,
                                              context, label_scales=self.labels.scales, label_bits=self.labels.bits)
            self.last_read = 1.0 if selection is None else min(1.0, config.token_budget(context) / max(context, 1))
            out, lse = block_sparse_attention_cpp(
                q, k_pages, v_pages, step.cu_seqlens_q, None, selection, False, scale, block_table=step.block_table,
                kv_lens=step.seq_lens, q_block_size=1, checked=True)
            return out, lse.transpose(0, 1)
        block_table = torch.arange(batch, dtype=torch.int32, device=q.device)[:, None]
        seq_lens = torch.full((batch,), context, dtype=torch.int32, device=q.device)
        # The tables and lengths are built here, so their values need no checks (each would cost small tensor ops
        # per layer per token).
        selection = select_tokens(q, self.labels, None, block_table, seq_lens, config, max_seq_len=context,
                                  backend=backend, check_values=False)
        self.last_read = 1.0 if selection is None else float(selection.kv_num_blocks.float().mean()) / context
        return sparse_decode_attention(q, k_pages, v_pages, block_table, seq_lens, selection, scale=scale,
                                       backend=backend, check_values=False)

    def _step_tensors(self, batch: int, context: int, device) -> "_StepTensors":
        """The decode step's tables for ``batch`` rows of ``context`` tokens (page b of sequence b), rebuilt only
        when the batch changes; the lengths and budgets are refilled in place each step."""
        step = self._step
        if step is None or step.batch != batch or step.block_table.device != device:
            step = self._step = _StepTensors(batch, device)
        if step.context != context:
            step.context = context
            step.seq_lens.fill_(context)
            step.budgets.fill_(self.method.config.token_budget(context))
        return step


class _StepTensors:
    """Block table, cu_seqlens, lengths and budgets of a decode step over contiguous per-sequence pages."""

    def __init__(self, batch: int, device):
        self.batch, self.context = batch, -1
        self.block_table = torch.arange(batch, dtype=torch.int32, device=device)[:, None]
        self.cu_seqlens_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.budgets = torch.zeros(batch, dtype=torch.int32, device=device)


# ---------------------------------------------------------------------------------------------------- KV pruning
class KVPruning(DecodeMethod):
    """KV-cache pruning decode (Mustafar): every token that leaves the dense recent window is stored magnitude-pruned
    and compressed (``config``: sparsity in [0, 1), recent window, compression batch)."""

    def __init__(self, config: KVPruningConfig):
        if not isinstance(config, KVPruningConfig):
            raise ValueError(f"config must be a KVPruningConfig, got {type(config).__name__}")
        self.config = config

    def new_state(self) -> "KVPruningState":
        return KVPruningState(self)

    def __repr__(self) -> str:
        return f"KVPruning({self.config})"


class KVPruningState(DecodeState):
    """The compressed cache of one layer, a pruned copy of the normal KV cache's tokens."""

    def __init__(self, method: KVPruning):
        super().__init__()
        self.method = method
        self.cache = None

    def reset(self) -> None:
        super().reset()
        self.cache = None

    def _append(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        if self.cache is None:
            self.cache = self.method.config.make_cache(k.shape[1], k.shape[3], batch_size=k.shape[0], dtype=k.dtype,
                                                       device=k.device)
        self.cache.append(k[:, :, start:], v[:, :, start:])

    def attend(self, q, k, v, scale, backend):
        # The compressed cache has no Triton kernel: its own dispatch picks CPU / CUDA / reference.
        backend = None if backend == "triton" else backend
        return pruned_decode_attention(q, self.cache, scale=scale, backend=backend, return_lse=True)
