"""Double Sparsity: token selection for decode from a small "label" cache of each key's heavy channels.

Offline, :func:`calibrate_heavy_channels` ranks the head_dim channels of each KV head by how much they contribute to
q.k on calibration tokens (post-RoPE q/k as plain tensors) and keeps the top ``r``. At runtime the label cache holds
each key restricted to those channels (written as tokens arrive, paged like the KV cache), every cached token is
scored with ``q[channels] . k_label`` (r multiply-adds instead of D), the top-k tokens are selected and
:func:`sparse_attn.decode.sparse_decode_attention` attends exactly over them.

Decisions:
- One token set per KV head (``share_kv_group=True``): the query heads of a GQA group score every token, the group's
  scores are reduced (``group_reduce``: "max" keeps a token that any head of the group ranks high; "sum" scores with
  the group's summed query, which can let heads of opposite sign cancel) and the group reads one set of k tokens.
  Decode is memory-bound and the bytes read are the selected K/V rows per KV head, so a shared set costs k rows per
  KV head instead of up to ``k * Hq / Hkv``. ``share_kv_group=False`` selects per query head.
- The budget k counts every token read, sink and recent tokens included (they score +inf, so they are always kept).
  ``budget`` fixes k; otherwise ``k = max(min_budget, ceil(budget_fraction * seq_len))``, capped at seq_len. Sequences
  shorter than ``dense_below`` read every token (the selection lists them all; a batch entirely below it gets None,
  i.e. dense decode, and skips scoring). ``min_budget`` defaults to 256 = 4096 / 16, so k is continuous at the
  default threshold, and matches SGLang's heavy-token count.
- Labels are stored unquantized (``label_bits=16``: the model dtype) or symmetric per-(token, head) int8 / int4 with an
  fp16 scale (``amax / 127`` or ``amax / 7``, at least 2**-14 so it stays a normal fp16); int4 codes ``c + 8`` are
  packed two per byte (even channel in the low nibble). At r=16 that is 32, 18 or 10 bytes per token and KV head, next
  to 2 * D * 2 = 512 bytes of K/V at D=128. :attr:`LabelCache.nbytes` / :meth:`LabelCache.bytes_per_token` give the
  label memory so KV-cache accounting can include it.
- Top-k runs through :func:`topk_token_indices`, the one call site where a CUDA top-k (``sparse_attn._C.topk_tokens``)
  is used when the extension provides it; torch.topk otherwise. Label scores use the Triton kernel
  ``label_scores_fwd`` on GPU and PyTorch on CPU, both chosen by ``resolve_backend``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._validate import check_int, check_real
from ..masks import BlockSparseMask
from ..ops import extension
from ..ops.attention import cuda_extension, cuda_op_available, resolve_backend, triton_kernels
from .attention import check_block_table
from .paged import write_tokens

__all__ = [
    "DoubleSparsityConfig", "LabelCache", "calibrate_heavy_channels", "select_tokens", "select_tokens_cpu",
    "label_scores", "topk_token_indices", "quantize_labels", "dequantize_labels",
]

LABEL_BITS = (16, 8, 4)
_QMAX = {8: 127, 4: 7}
_MIN_SCALE = 2.0 ** -14  # smallest normal fp16
_CHUNK_BYTES = 128 << 20


# ---------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DoubleSparsityConfig:
    """Runtime settings of Double Sparsity (see the module docstring for the budget rule)."""

    r: int = 16
    budget: int | None = None
    budget_fraction: float = 1 / 16
    min_budget: int = 256
    sink_tokens: int = 4
    recent_tokens: int = 64
    dense_below: int = 4096
    label_bits: int = 16
    share_kv_group: bool = True
    group_reduce: str = "max"

    def __post_init__(self):
        check_int("r", self.r)
        if self.budget is not None:
            check_int("budget", self.budget)
        check_real("budget_fraction", self.budget_fraction, 0, 1, low_open=True)
        check_int("min_budget", self.min_budget)
        check_int("sink_tokens", self.sink_tokens, 0)
        check_int("recent_tokens", self.recent_tokens, 0)
        check_int("dense_below", self.dense_below, 0)
        protected = self.sink_tokens + self.recent_tokens
        for name in ("budget", "min_budget"):
            value = getattr(self, name)
            if value is not None and value < protected:
                raise ValueError(f"{name} ({value}) must be >= sink_tokens + recent_tokens ({protected}): they are always read")
        if self.label_bits not in LABEL_BITS:
            raise ValueError(f"label_bits must be one of {LABEL_BITS}, got {self.label_bits!r}")
        if self.label_bits == 4 and self.r % 2:
            raise ValueError(f"r must be even with label_bits=4 (two labels per byte), got {self.r}")
        if self.group_reduce not in ("max", "sum"):
            raise ValueError(f"group_reduce must be 'max' or 'sum', got {self.group_reduce!r}")

    def check_head_dim(self, head_dim: int) -> None:
        if self.r > head_dim:
            raise ValueError(f"r ({self.r}) must be <= head_dim ({head_dim})")

    def token_budget(self, seq_len: int) -> int:
        """Tokens read by a sequence of ``seq_len`` tokens."""
        if seq_len < self.dense_below:
            return seq_len
        k = self.budget if self.budget is not None else max(self.min_budget, math.ceil(self.budget_fraction * seq_len))
        return min(seq_len, k)

    def token_budgets(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """:meth:`token_budget` of every row, int64 ``[B]`` (same float64 arithmetic, no device sync)."""
        lens = seq_lens.long()
        if self.budget is not None:
            k = torch.full_like(lens, self.budget)
        else:
            k = torch.ceil(lens.double() * self.budget_fraction).long().clamp(min=self.min_budget)
        return torch.where(lens < self.dense_below, lens, torch.minimum(lens, k))

    def max_token_budget(self, max_seq_len: int) -> int:
        """An upper bound of :meth:`token_budget` over sequences up to ``max_seq_len`` (k grows with the length,
        except that dense rows below ``dense_below`` read all their tokens)."""
        return max(self.token_budget(max_seq_len), min(max_seq_len, self.dense_below - 1))


# ---------------------------------------------------------------------------------------------------- calibration
def calibrate_heavy_channels(q_samples: torch.Tensor, k_samples: torch.Tensor, r: int, mode: str = "qk") -> torch.Tensor:
    """The ``r`` heaviest channels of each KV head, most important first: LongTensor ``[Hkv, r]``.

    ``q_samples [..., Hq, D]`` and ``k_samples [..., Hkv, D]`` are post-RoPE queries and keys of the same calibration
    tokens (leading dims are flattened). A channel's importance is the mean over tokens, summed over the query heads
    of the KV head's group, of ``|q_c * k_c|`` ("qk", the channel's share of q.k), ``|q_c|`` ("q") or ``|k_c|`` ("k").
    """
    for name, t in (("q_samples", q_samples), ("k_samples", k_samples)):
        if not isinstance(t, torch.Tensor) or t.dim() < 3 or not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor [..., H, D], got {getattr(t, 'shape', type(t).__name__)}")
    if mode not in ("q", "k", "qk"):
        raise ValueError(f"mode must be 'q', 'k' or 'qk', got {mode!r}")
    hq, head_dim = q_samples.shape[-2:]
    hkv = k_samples.shape[-2]
    if k_samples.shape[-1] != head_dim:
        raise ValueError(f"k_samples head_dim {k_samples.shape[-1]} != q_samples head_dim {head_dim}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"number of query heads ({hq}) must be a positive multiple of the number of KV heads ({hkv})")
    if not isinstance(r, int) or not 0 < r <= head_dim:
        raise ValueError(f"r must be an int in [1, head_dim={head_dim}], got {r!r}")
    q = q_samples.reshape(-1, hkv, hq // hkv, head_dim).float().abs()  # [N, Hkv, G, D]
    k = k_samples.reshape(-1, hkv, 1, head_dim).float().abs()
    if mode == "qk" and q.shape[0] != k.shape[0]:
        raise ValueError(f"mode 'qk' pairs q and k per token: q_samples has {q.shape[0]} tokens, k_samples {k.shape[0]}")
    if (q.shape[0] if mode != "k" else k.shape[0]) == 0:
        raise ValueError("calibration needs at least one token")
    stat = {"qk": lambda: q * k, "q": lambda: q, "k": lambda: k}[mode]()
    importance = stat.mean(0).sum(1)  # [Hkv, D]
    return importance.topk(r, dim=-1).indices


# ---------------------------------------------------------------------------------------------------- label cache
def quantize_labels(labels: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of ``labels [..., r]``: int8 codes, or int4 codes packed two per uint8
    (``[..., r // 2]``), and fp16 scales ``[...]``."""
    qmax = _QMAX[bits]
    x = labels.float()
    scale = (x.abs().amax(-1) / qmax).clamp(min=_MIN_SCALE).half()
    codes = torch.round(x / scale.float().unsqueeze(-1)).clamp(-qmax, qmax)
    if bits == 8:
        return codes.to(torch.int8), scale
    nibbles = (codes + 8).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4), scale


def dequantize_labels(codes: torch.Tensor, scales: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Inverse of :func:`quantize_labels` (for ``bits=16`` the stored labels, as fp32)."""
    if bits == 16:
        return codes.float()
    if bits == 4:
        codes = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2).to(torch.int8) - 8
    return codes.float() * scales.float().unsqueeze(-1)


class LabelCache:
    """Paged label cache ``[num_pages, page_size, Hkv, r]`` (int4: ``r // 2`` bytes), addressed like the KV cache.

    ``channels [Hkv, r]`` are the heavy channels from :func:`calibrate_heavy_channels`. ``bits`` 16 stores labels in
    ``dtype`` unquantized; 8 and 4 quantize (module docstring). Pages and block tables are shared with the KV cache.
    """

    def __init__(self, channels: torch.Tensor, num_pages: int, page_size: int, *, bits: int = 16,
                 dtype: torch.dtype = torch.float16, device=None):
        if not isinstance(channels, torch.Tensor) or channels.dim() != 2 or channels.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"channels must be an integer tensor [Hkv, r], got {getattr(channels, 'shape', type(channels).__name__)}")
        for name, value in (("num_pages", num_pages), ("page_size", page_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if bits not in LABEL_BITS:
            raise ValueError(f"bits must be one of {LABEL_BITS}, got {bits!r}")
        hkv, r = channels.shape
        if hkv == 0 or r == 0 or (bits == 4 and r % 2):
            raise ValueError(f"channels must be [Hkv >= 1, r >= 1] (r even for 4 bits), got {tuple(channels.shape)}")
        if bits == 16 and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a float dtype for unquantized labels, got {dtype}")
        device = channels.device if device is None else torch.device(device)
        self.channels = channels.to(device=device, dtype=torch.int64)
        self.max_channel = int(channels.max())  # kept on the host: writes check it without a device sync
        if int(channels.min()) < 0:
            raise ValueError(f"channels must be non-negative channel ids, got min {int(channels.min())}")
        self.bits = bits
        shape = (num_pages, page_size, hkv)
        if bits == 16:
            self.labels = torch.zeros(*shape, r, dtype=dtype, device=device)
            self.scales = None
        else:
            width, code_dtype = (r, torch.int8) if bits == 8 else (r // 2, torch.uint8)
            self.labels = torch.zeros(*shape, width, dtype=code_dtype, device=device)
            self.scales = torch.zeros(*shape, dtype=torch.float16, device=device)

    @classmethod
    def over(cls, labels: torch.Tensor, channels: torch.Tensor) -> "LabelCache":
        """An unquantized label cache stored in an existing tensor ``labels [num_pages, page_size, Hkv, r]`` (any
        strides, e.g. a slice of a serving engine's KV pages; nothing is allocated). ``channels [Hkv, r]``."""
        if not isinstance(labels, torch.Tensor) or labels.dim() != 4 or not labels.is_floating_point():
            raise ValueError(f"labels must be a float tensor [num_pages, page_size, Hkv, r], got {getattr(labels, 'shape', type(labels).__name__)}")
        if (not isinstance(channels, torch.Tensor) or channels.dtype not in (torch.int32, torch.int64)
                or tuple(channels.shape) != tuple(labels.shape[2:]) or 0 in channels.shape):
            raise ValueError(f"channels must be an integer tensor [Hkv, r] = {tuple(labels.shape[2:])} matching labels, "
                             f"got {getattr(channels, 'shape', type(channels).__name__)}")
        if int(channels.min()) < 0:
            raise ValueError(f"channels must be non-negative channel ids, got min {int(channels.min())}")
        cache = cls.__new__(cls)
        cache.channels = channels.to(device=labels.device, dtype=torch.int64)
        cache.max_channel = int(channels.max())
        cache.bits, cache.labels, cache.scales = 16, labels, None
        return cache

    @classmethod
    def from_config(cls, config: DoubleSparsityConfig, channels: torch.Tensor, num_pages: int, page_size: int, *,
                    dtype: torch.dtype = torch.float16, device=None) -> "LabelCache":
        if channels.dim() != 2 or channels.shape[1] != config.r:
            raise ValueError(f"channels must be [Hkv, config.r={config.r}], got {tuple(channels.shape)}")
        return cls(channels, num_pages, page_size, bits=config.label_bits, dtype=dtype, device=device)

    @property
    def num_pages(self) -> int:
        return self.labels.shape[0]

    @property
    def page_size(self) -> int:
        return self.labels.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.channels.shape[0]

    @property
    def r(self) -> int:
        return self.channels.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by the labels and their scales."""
        return self.labels.nbytes + (self.scales.nbytes if self.scales is not None else 0)

    @staticmethod
    def bytes_per_token(num_kv_heads: int, r: int, bits: int = 16, dtype: torch.dtype = torch.float16) -> int:
        """Label bytes per cached token (all KV heads of one layer), for KV memory planning before allocation."""
        if bits == 16:
            return num_kv_heads * r * dtype.itemsize
        return num_kv_heads * (r * bits // 8 + torch.float16.itemsize)

    def write(self, k_new: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store the labels of new keys ``k_new [T, Hkv, D]`` at flat slots ``slot_mapping [T' <= T]`` (< 0 skipped)."""
        if not isinstance(k_new, torch.Tensor) or k_new.dim() != 3 or k_new.shape[1] != self.num_kv_heads:
            raise ValueError(f"k_new must be [T, Hkv={self.num_kv_heads}, D], got {getattr(k_new, 'shape', type(k_new).__name__)}")
        if self.max_channel >= k_new.shape[2]:
            raise ValueError(f"channels reach {self.max_channel} but k_new has head_dim {k_new.shape[2]}")
        if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dim() != 1 or slot_mapping.shape[0] > k_new.shape[0]:
            raise ValueError(f"slot_mapping must be 1-D with at most {k_new.shape[0]} slots, got {getattr(slot_mapping, 'shape', None)}")
        n = slot_mapping.shape[0]
        labels = k_new[:n].gather(2, self.channels.expand(n, -1, -1))  # [n, Hkv, r]
        if self.bits == 16:
            write_tokens(self.labels, slot_mapping, labels)
            return
        codes, scales = quantize_labels(labels, self.bits)
        write_tokens(self.labels, slot_mapping, codes)
        write_tokens(self.scales, slot_mapping, scales)

    def read(self, pages: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Dequantized fp32 labels ``[*pages.shape, Hkv, r]`` of the tokens at (pages, offsets)."""
        scales = self.scales[pages, offsets] if self.scales is not None else None
        return dequantize_labels(self.labels[pages, offsets], scales, self.bits)


# ---------------------------------------------------------------------------------------------------- selection
def label_scores(q, label_cache: LabelCache, block_table, seq_lens, width: int, config: DoubleSparsityConfig, *,
                 backend: str | None = None) -> torch.Tensor:
    """``q[channels] . k_label`` for every cached token: fp32 ``[B, Hkv or Hq, width]``.

    Sink and recent tokens score +inf (always selected), positions at or past ``seq_lens[b]`` score -inf (never).
    With ``config.share_kv_group`` a group's query heads are reduced by ``config.group_reduce``.
    """
    batch, hq, _ = q.shape
    hkv, r = label_cache.num_kv_heads, label_cache.r
    group = hq // hkv
    channels_q = label_cache.channels.repeat_interleave(group, 0)  # query head h reads KV head h // group
    q_label = q.gather(2, channels_q.expand(batch, -1, -1)).float()  # [B, Hq, r]
    name = resolve_backend(backend, q.device, cuda_op="label_scores_fwd")
    if name == "triton":
        return triton_kernels().label_scores_fwd(
            q_label, label_cache.labels, label_cache.scales, label_cache.bits, block_table, seq_lens, width,
            config.sink_tokens, config.recent_tokens, config.share_kv_group, config.group_reduce == "max",
        )
    if name == "cuda":
        return cuda_extension().label_scores_fwd(
            q_label, label_cache.labels, label_cache.scales, label_cache.bits, block_table, seq_lens, width,
            config.sink_tokens, config.recent_tokens, config.share_kv_group, config.group_reduce == "max",
        )

    heads = hkv if config.share_kv_group else hq
    q_groups = q_label.view(batch, hkv, group, r)
    lens = seq_lens.long()[:, None]
    rows, table, page_size = torch.arange(batch, device=q.device)[:, None], block_table.long(), label_cache.page_size
    step = max(1, _CHUNK_BYTES // max(1, batch * hq * r * 4 * 2))
    scores = torch.empty(batch, heads, width, dtype=torch.float32, device=q.device)
    for start in range(0, width, step):
        pos = torch.arange(start, min(start + step, width), device=q.device).expand(batch, -1)
        ok = pos < lens
        pos = pos.masked_fill(~ok, 0)
        page = table[rows, pos // page_size].masked_fill(~ok, 0)
        labels = label_cache.read(page, pos % page_size)  # [B, n, Hkv, r]
        s = torch.einsum("bhgr,bnhr->bhgn", q_groups, labels)
        if config.share_kv_group:
            s = s.amax(2) if config.group_reduce == "max" else s.sum(2)
        scores[..., start : start + step] = s.reshape(batch, heads, -1)
    pos = torch.arange(width, device=q.device)
    protected = (pos < config.sink_tokens) | (pos >= lens - config.recent_tokens)  # [B, width]
    scores.masked_fill_(protected[:, None, :], float("inf"))
    return scores.masked_fill_((pos >= lens)[:, None, :], float("-inf"))


def topk_token_indices(scores: torch.Tensor, budgets: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``budgets[b]`` best tokens of every row of ``scores [B, H, L]``: int32 indices ``[B, H, width]`` ascending
    within the count (0-padded past it) and int32 counts ``[B, H]``. ``width >= max(budgets)``.

    The one top-k call site: the extension's ``topk_tokens`` on CUDA where it is built, torch.topk otherwise. Sink,
    recent and past-the-end tokens are already scored +inf / -inf, so the op sees every row as full length.
    """
    if scores.is_cuda and cuda_op_available("topk_tokens"):
        full = torch.full((scores.shape[0],), scores.shape[-1], dtype=torch.int32, device=scores.device)
        return extension.topk_tokens(scores, full, width, budgets=budgets)
    best = scores.topk(width, dim=-1, sorted=True).indices  # descending score
    slot = torch.arange(width, device=scores.device)
    counts = budgets.long()[:, None].expand(scores.shape[:2])
    kept = slot < counts[..., None]
    indices = torch.where(kept, best, scores.shape[-1]).sort(-1).values  # kept ids ascending, sentinels last
    return torch.where(kept, indices, 0).to(torch.int32), counts.to(torch.int32)


def select_tokens(
    q: torch.Tensor,
    label_cache: LabelCache,
    channels: torch.Tensor | None,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    config: DoubleSparsityConfig,
    *,
    max_seq_len: int | None = None,
    backend: str | None = None,
    check_values: bool = True,
) -> BlockSparseMask | None:
    """Double Sparsity's decode selection for ``q [B, Hq, D]``: a :class:`BlockSparseMask` of token ids
    ``[B, Hkv (or Hq), 1, k]`` for :func:`sparse_decode_attention`, or None (dense) when every sequence is shorter
    than ``config.dense_below``.

    ``channels`` must be the label cache's channels (None: use them). ``max_seq_len`` (>= every seq_len) avoids a
    device sync and makes the selection width depend on it only.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a [B, Hq, D] tensor, got {getattr(q, 'shape', type(q).__name__)}")
    if not isinstance(label_cache, LabelCache):
        raise ValueError(f"label_cache must be a LabelCache, got {type(label_cache).__name__}")
    if not isinstance(config, DoubleSparsityConfig):
        raise ValueError(f"config must be a DoubleSparsityConfig, got {type(config).__name__}")
    batch, hq, head_dim = q.shape
    if channels is not None and (not isinstance(channels, torch.Tensor) or
                                 not torch.equal(channels.to(label_cache.channels), label_cache.channels)):
        raise ValueError("channels must equal label_cache.channels (the channels its labels were written with)")
    if label_cache.labels.device != q.device:
        raise ValueError(f"label_cache is on {label_cache.labels.device} but q is on {q.device}")
    if hq % label_cache.num_kv_heads:
        raise ValueError(f"number of query heads ({hq}) must be a multiple of the label cache's KV heads ({label_cache.num_kv_heads})")
    if label_cache.r != config.r:
        raise ValueError(f"label_cache has r={label_cache.r} channels but config.r={config.r}")
    config.check_head_dim(head_dim)
    check_block_table(block_table, seq_lens, batch, label_cache.page_size, label_cache.num_pages, q.device,
                      check_values=check_values)
    longest = None if max_seq_len is not None and not check_values else (int(seq_lens.max()) if batch else 0)
    if max_seq_len is None:
        max_seq_len = longest
    elif not isinstance(max_seq_len, int) or max_seq_len < 0 or (longest is not None and max_seq_len < longest):
        raise ValueError(f"max_seq_len must be an int >= every seq_len ({longest}), got {max_seq_len!r}")
    if max_seq_len < config.dense_below:
        return None
    budgets = config.token_budgets(seq_lens)
    width = config.max_token_budget(max_seq_len)
    if (q.device.type == "cpu" and resolve_backend(backend, q.device) == "cpu"
            and extension.extension_available("decode_select")):  # scores and top-k in one pass over the pages
        return select_tokens_cpu(q, label_cache.labels, label_cache.channels, block_table, seq_lens, budgets, width,
                                 config, max_seq_len, label_scales=label_cache.scales, label_bits=label_cache.bits)
    scores = label_scores(q, label_cache, block_table, seq_lens, max_seq_len, config, backend=backend)
    indices, counts = topk_token_indices(scores, budgets, width)
    return BlockSparseMask.from_token_indices(indices, counts, kv_len=max_seq_len)


def select_tokens_cpu(q: torch.Tensor, labels: torch.Tensor, channels: torch.Tensor, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, budgets: torch.Tensor, width: int, config: DoubleSparsityConfig,
                      kv_len: int, *, slot_keep: int = 0, label_scales: torch.Tensor | None = None,
                      label_bits: int = 16) -> BlockSparseMask:
    """:func:`select_tokens`'s C++ CPU pass (``sparse_attn._C.decode_select``) on inputs the caller checked or built:
    labels ``[num_pages, page_size, Hkv, r]`` read in place (unquantized, or int8 / int4 codes with their
    ``label_scales`` as :class:`LabelCache` stores them; or pruned K slots with ``slot_keep`` > 0, unpacked),
    ``budgets [B]`` tokens kept per row (<= ``width``). Returns the selection over ``kv_len`` keys."""
    indices, counts = extension.decode_select_cpu(
        q, labels, channels, block_table, seq_lens, budgets, width, sink=config.sink_tokens,
        recent=config.recent_tokens, per_group=config.share_kv_group, reduce_max=config.group_reduce == "max",
        slot_keep=slot_keep, label_scales=label_scales, label_bits=label_bits)
    return BlockSparseMask.from_token_indices(indices, counts, kv_len=kv_len)
