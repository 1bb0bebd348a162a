"""``SparseAttention``: a drop-in for ``F.scaled_dot_product_attention`` that reads only the blocks a pattern keeps."""

from __future__ import annotations

import torch
from torch import nn

from ..decode.methods import DecodeMethod, DecodeState
from ..masks import BlockSparseMask
from ..ops import block_sparse_attention, checks, dense_attention
from ..patterns import Dense, Pattern, default_pattern


class SparseAttention(nn.Module):
    """Block-sparse attention shaped like ``F.scaled_dot_product_attention``.

    q ``[B, Hq, S, D]``, k/v ``[B, Hkv, Skv, D]`` (GQA when Hq is a multiple of Hkv) -> out ``[B, Hq, S, D]``.
    Queries are the last S positions of the Skv-token context, so causal rows align bottom-right (chunked prefill
    and decode work as is). Contexts shorter than ``dense_below`` keys run dense attention (the estimate and the
    block bookkeeping cost more than they save there); longer ones build the pattern's mask and run
    :func:`sparse_attn.block_sparse_attention`.

    Example::

        attn = SparseAttention(AShape(sink_tokens=64, local_tokens=1024))
        out = attn(q, k, v)                        # like F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mask = attn.build_mask(q, k)               # plan once ...
        out = attn(q, k, v, mask=mask)             # ... run many times (e.g. several value tensors)
        print(attn.last_density)                   # fraction of the causal block area that was read

    Args:
        pattern: which blocks each head reads; per-head mixes use :class:`sparse_attn.PerHead`. None: the
            content-aware default (:func:`sparse_attn.patterns.default_pattern`, head-proxy estimation).
        q_block_size, kv_block_size: block sizes of the mask.
        dense_below: contexts with fewer keys run dense; 0 always runs the sparse path.
        backend: implementation for the sparse path (None: $SPARSE_ATTN_BACKEND, else the best for the device).
        decode: a decode method (:class:`sparse_attn.decode.DoubleSparsity` or :class:`sparse_attn.decode.KVPruning`)
            for rows with one query (q_len == 1), whatever the context length (the method has its own thresholds,
            e.g. ``DoubleSparsityConfig.dense_below``; KV pruning is a cache format, so every step reads it). Its
            per-layer state (label cache / compressed cache) lives on this module beside the caller's KV cache and
            absorbs the new keys of every call, prefill included; a call that does not continue the absorbed
            context (a new prompt) resets it (:mod:`sparse_attn.decode.methods`). :meth:`reset_decode_state`
            drops it. Prefill rows (q_len > 1) run the pattern as without a decode method.
        skip_mass: softmax thresholding inside the kept blocks (C++ CPU kernel): key tiles holding at most this
            fraction of a row's mass are skipped without an estimate (see :func:`sparse_attn.block_sparse_attention`);
            0 (default) is exact.
    """

    def __init__(
        self,
        pattern: Pattern | None = None,
        *,
        q_block_size: int = 64,
        kv_block_size: int = 64,
        dense_below: int = 1024,
        backend: str | None = None,
        decode: DecodeMethod | None = None,
        skip_mass: float = 0.0,
    ):
        super().__init__()
        pattern = default_pattern() if pattern is None else pattern
        if not isinstance(pattern, Pattern):
            raise ValueError(f"pattern must be a sparse_attn Pattern, got {type(pattern).__name__}")
        for name, value, minimum in (("q_block_size", q_block_size, 1), ("kv_block_size", kv_block_size, 1),
                                     ("dense_below", dense_below, 0)):
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        self.pattern = pattern
        self.q_block_size = q_block_size
        self.kv_block_size = kv_block_size
        self.dense_below = dense_below
        self.backend = backend
        if decode is not None and not isinstance(decode, DecodeMethod):
            raise ValueError(f"decode must be None, DoubleSparsity or KVPruning, got {type(decode).__name__}")
        self.decode = decode
        if not isinstance(skip_mass, (int, float)) or isinstance(skip_mass, bool) or not 0 <= skip_mass < 1:
            raise ValueError(f"skip_mass must be a number in [0, 1), got {skip_mass!r}")
        self.skip_mass = float(skip_mass)
        #: The decode method's state for the sequences this module last saw (None without a decode method).
        self.decode_state: DecodeState | None = decode.new_state() if decode is not None else None
        #: Density of the last mask run (1.0 after a dense run): a cheap dense-vs-sparse diagnostic.
        self.last_density = 1.0

    @classmethod
    def from_plan(cls, plan, layer: int, *, dense_below: int = 1024, backend: str | None = None) -> "SparseAttention":
        """Layer ``layer`` of a planner plan (a :class:`sparse_attn.planner.Plan` or a plan file's path): its
        per-head patterns, the plan's block sizes and the layer's decode method."""
        from ..planner import Plan, load_plan

        plan = plan if isinstance(plan, Plan) else load_plan(plan)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < plan.shape.num_layers:
            raise ValueError(f"layer must be an int in [0, {plan.shape.num_layers}) for this plan, got {layer!r}")
        return cls(plan.to_patterns()[layer], q_block_size=plan.q_block_size, kv_block_size=plan.kv_block_size,
                   dense_below=dense_below, backend=backend, decode=plan.decode_method(layer))

    def extra_repr(self) -> str:
        return (f"pattern={self.pattern!r}, q_block_size={self.q_block_size}, kv_block_size={self.kv_block_size}, "
                f"dense_below={self.dense_below}, backend={self.backend!r}, decode={self.decode!r}, "
                f"skip_mass={self.skip_mass}")

    def reset_decode_state(self) -> None:
        """Forget the decode method's label / compressed cache (the next call rebuilds it from its context)."""
        if self.decode_state is not None:
            self.decode_state.reset()

    def build_mask(
        self, q: torch.Tensor, k: torch.Tensor, is_causal: bool = True, scale: float | None = None
    ) -> BlockSparseMask:
        """The pattern's mask for these inputs (the plan step): q ``[B, Hq, S, D]``, k ``[B, Hkv, Skv, D]``."""
        checks.check_qkv(q, k, k, varlen=False)
        checks.check_lengths([q.shape[2]] * q.shape[0], [k.shape[2]] * q.shape[0], is_causal)
        return self._mask(self.pattern, q, k, is_causal, checks.check_scale(scale, q.shape[-1]))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool = True,
        scale: float | None = None,
        return_lse: bool = False,
        mask: BlockSparseMask | None = None,
    ):
        """Attention over the kept blocks; with ``return_lse`` also the fp32 log-sum-exp ``[B, Hq, S]``.

        A prebuilt ``mask`` (from :meth:`build_mask`) is used as is, whatever the context length.
        """
        checks.check_qkv(q, k, v, varlen=False)
        checks.check_lengths([q.shape[2]] * q.shape[0], [k.shape[2]] * q.shape[0], is_causal)
        scale = checks.check_scale(scale, q.shape[-1])
        if self.decode_state is not None and mask is None:
            self.decode_state.update(k, v, q.shape[2])
            if q.shape[2] == 1:
                out, lse = self.decode_state.attend(q[:, :, 0], k, v, scale, self.backend)
                self.last_density = self.decode_state.last_read
                return (out.unsqueeze(2), lse.unsqueeze(2)) if return_lse else out.unsqueeze(2)
        short = k.shape[2] < self.dense_below
        if mask is None and short and not return_lse:
            self.last_density = 1.0
            return dense_attention(q, k, v, causal=is_causal, scale=scale)
        dense = mask is None and (short or isinstance(self.pattern, Dense))
        if mask is None and not dense:
            mask = self._mask(self.pattern, q, k, is_causal, scale)
        # Dense reads every key without a mask (a short context with return_lse too: SDPA gives no log-sum-exp).
        result = block_sparse_attention(q, k, v, None if dense else mask, causal=is_causal, scale=scale,
                                        return_lse=return_lse, q_block_size=self.q_block_size, backend=self.backend,
                                        skip_mass=self.skip_mass if q.device.type == "cpu" else 0.0)
        self.last_density = 1.0 if dense else mask.density(causal=is_causal)  # after the op has validated the mask
        return result

    def _mask(self, pattern: Pattern, q: torch.Tensor, k: torch.Tensor, is_causal: bool, scale: float) -> BlockSparseMask:
        batch, num_heads, q_len, kv_len = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        sizes = dict(num_heads=num_heads, q_block_size=self.q_block_size, kv_block_size=self.kv_block_size,
                     causal=is_causal, device=q.device, scale=scale)
        if not pattern.content_aware:
            # Positions only: every sequence gets the same mask, built once and broadcast over the batch.
            return pattern.build_mask(q_lens=q_len, kv_lens=kv_len, **sizes)
        # Content-aware patterns read q and k in the varlen layout [T, H, D].
        q_tokens = q.transpose(1, 2).reshape(-1, num_heads, q.shape[-1])
        k_tokens = k.transpose(1, 2).reshape(-1, k.shape[1], k.shape[-1])
        return pattern.build_mask(q_lens=[q_len] * batch, kv_lens=[kv_len] * batch, q=q_tokens, k=k_tokens, **sizes)
