"""Content-aware patterns: the blocks read depend on q and k, estimated cheaply before the sparse kernel runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validate import check_int
from .base import Pattern, SeqContext


def _group_map(seq: SeqContext, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Query head -> KV head index (GQA)."""
    return torch.arange(q.shape[1], device=q.device) // (q.shape[1] // k.shape[1])


@dataclass(frozen=True)
class VerticalSlash(Pattern):
    """MInference's vertical-slash pattern, estimated from the last ``last_q`` queries of the sequence.

    Their attention probabilities ``P[m, n]`` (causal, per head) score every key column ("vertical": sum over m of
    P[m, n]) and every diagonal ("slash": sum of P[m, n] with ``pos(m) - n = d``). The top ``vertical`` columns and
    top ``slash`` diagonals, in tokens, are kept, always including the first column (the attention sink) and the
    main diagonal (local context). A block is read when it holds a kept column, or a kept diagonal crosses it.
    """

    vertical: int = 1000
    slash: int = 6096
    last_q: int = 64

    def __post_init__(self):
        check_int("vertical", self.vertical)
        check_int("slash", self.slash)
        check_int("last_q", self.last_q)

    content_aware = True

    def keep_blocks(self, seq: SeqContext) -> torch.Tensor:
        q, k = seq.require_qk("VerticalSlash")
        nq, nk = seq.num_q_blocks, seq.num_kv_blocks
        if seq.kv_len == 0 or seq.q_len == 0:
            return torch.zeros(1, nq, nk, dtype=torch.bool, device=seq.device)
        scale = seq.scale if seq.scale is not None else q.shape[-1] ** -0.5
        n_last = min(self.last_q, seq.q_len)
        q_last = q[-n_last:].transpose(0, 1).float()  # [Hq, n_last, D]
        keys = k.transpose(0, 1).float()[_group_map(seq, q, k)]  # [Hq, kv_len, D]
        scores = torch.einsum("hmd,hnd->hmn", q_last, keys) * scale
        q_pos = torch.arange(seq.kv_len - n_last, seq.kv_len, device=seq.device)
        key_pos = torch.arange(seq.kv_len, device=seq.device)
        if seq.causal:
            scores = scores.masked_fill(key_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)

        vertical_score = probs.sum(1)  # [Hq, kv_len]
        vertical_score[:, 0] = float("inf")  # the sink column is always kept
        cols = vertical_score.topk(min(self.vertical, seq.kv_len), dim=-1).indices

        # Diagonal d = pos(m) - n; for causal attention d >= 0. Scatter-add the probabilities per diagonal.
        diag = (q_pos[:, None] - key_pos[None, :]).clamp(min=0) if seq.causal else (q_pos[:, None] - key_pos[None, :])
        # Shift so that every diagonal id is non-negative: non-causal d >= 1 - n_last, and n_last may exceed kv_len.
        shift = 0 if seq.causal else max(seq.kv_len, n_last)
        diag = diag + shift
        n_diag = seq.kv_len + shift
        slash_score = torch.zeros(q.shape[1], n_diag, device=seq.device)
        slash_score.scatter_add_(1, diag.flatten().expand(q.shape[1], -1), probs.flatten(1))
        slash_score[:, shift] = float("inf")  # the main diagonal is always kept
        diags = slash_score.topk(min(self.slash, n_diag), dim=-1).indices - shift

        heads = q.shape[1]
        keep = torch.zeros(heads, nq, nk + 1, dtype=torch.bool, device=seq.device)
        # Columns: block of each kept column, for every query block.
        col_blocks = torch.zeros(heads, nk, dtype=torch.bool, device=seq.device)
        col_blocks.scatter_(1, cols // seq.kv_block_size, True)
        keep[..., :nk] |= col_blocks[:, None, :]
        # Diagonals: query block i with rows [first, last] meets diagonal d in keys [first - d, last - d].
        first_row, last_row = seq.q_block_rows()
        lo = (first_row[None, :, None] - diags[:, None, :]).clamp(min=0)  # [H, nq, S]
        hi = last_row[None, :, None] - diags[:, None, :]
        hit = (hi >= 0) & (lo < seq.kv_len)
        lo_blk = (lo // seq.kv_block_size).clamp(max=nk)
        hi_blk = (hi.clamp(min=0, max=seq.kv_len - 1) // seq.kv_block_size + 1).clamp(max=nk)
        # Mark the block range [lo_blk, hi_blk) of each hit with a +1/-1 difference array and a prefix sum.
        delta = torch.zeros(heads, nq, nk + 1, dtype=torch.int32, device=seq.device)
        one = hit.to(torch.int32)
        delta.scatter_add_(2, torch.where(hit, lo_blk, nk), one)
        delta.scatter_add_(2, torch.where(hit, hi_blk, nk), -one)
        keep |= delta.cumsum(-1) > 0
        return keep[..., :nk]


@dataclass(frozen=True)
class TopKBlocks(Pattern):
    """Keep, per query block and head, the ``k`` highest-scoring KV blocks.

    ``scores`` may be given explicitly (``[H or 1, num_q_blocks, num_kv_blocks]``, e.g. from an estimator); without
    them blocks are scored by mean-pooled q against mean-pooled k (a cheap estimate of the block's attention logit).
    Causally invisible blocks are never chosen. The blocks holding the query block's own rows are always kept (they
    count toward k), so every row sees itself.
    """

    k: int = 16
    scores: torch.Tensor | None = None

    def __post_init__(self):
        check_int("k", self.k)

    @property
    def content_aware(self) -> bool:  # type: ignore[override]
        return self.scores is None

    def keep_blocks(self, seq: SeqContext) -> torch.Tensor:
        nq, nk = seq.num_q_blocks, seq.num_kv_blocks
        if nk == 0 or nq == 0:
            return torch.zeros(1, nq, nk, dtype=torch.bool, device=seq.device)
        scores = self.scores if self.scores is not None else self._pooled_scores(seq)
        if scores.dim() != 3 or scores.shape[1:] != (nq, nk):
            raise ValueError(f"TopKBlocks scores must be [H or 1, {nq}, {nk}], got {tuple(scores.shape)}")
        scores = scores.to(seq.device).float()
        if seq.causal:
            scores = scores.masked_fill(~seq.causal_keep(), float("-inf")).masked_fill(seq.own_blocks(), float("inf"))
        top = scores.topk(min(self.k, nk), dim=-1)
        keep = torch.zeros(scores.shape, dtype=torch.bool, device=seq.device)
        keep = keep.scatter(-1, top.indices, top.values > float("-inf"))
        return keep | seq.own_blocks()[None] if seq.causal else keep

    @staticmethod
    def _pooled_scores(seq: SeqContext) -> torch.Tensor:
        q, k = seq.require_qk("TopKBlocks without scores")
        def pool(x: torch.Tensor, block: int, n: int) -> torch.Tensor:  # [len, H, D] -> [H, n, D] block means
            pad = n * block - x.shape[0]
            x = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, pad))
            counts = torch.clamp(x.shape[0] - pad - torch.arange(n, device=x.device) * block, max=block)
            return x.view(n, block, *x.shape[1:]).sum(1).transpose(0, 1) / counts[None, :, None]
        qp = pool(q, seq.q_block_size, seq.num_q_blocks)
        kp = pool(k, seq.kv_block_size, seq.num_kv_blocks)[_group_map(seq, q, k)]
        return torch.einsum("hid,hjd->hij", qp, kp)
