"""Decode-side calibration: how well Double Sparsity settings (r heavy channels, token budget) and KV pruning ratios
keep each head's attention, measured on the queries of the last query block (decode-like: each sees its whole
prefix), with the project's own selection and pruning code.

Per layer and setting: ``recall`` (attention mass of the tokens read), ``error`` (relative error of the attention
output) per query head, and the mean fraction of the context read (Double Sparsity). Double Sparsity's heavy
channels come from :func:`sparse_attn.decode.calibrate_heavy_channels` on the layer's calibration q and k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..decode import DoubleSparsityConfig, LabelCache, calibrate_heavy_channels, label_scores, topk_token_indices
from ..decode.kv_pruning import KVPruningConfig, prune_magnitude

__all__ = ["DecodeCandidates", "heavy_channel_ranking", "profile_decode"]


@dataclass(frozen=True)
class DecodeCandidates:
    """Double Sparsity ``(r, budget_fraction)`` pairs and KV pruning sparsities to profile."""

    double_sparsity: tuple[tuple[int, float], ...] = ((8, 1 / 16), (16, 1 / 16), (8, 1 / 8), (16, 1 / 8), (16, 1 / 4))
    kv_pruning: tuple[float, ...] = (0.5, 0.7)


def heavy_channel_ranking(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Every channel of each KV head, heaviest first ``[Hkv, D]`` (the first r are Double Sparsity's channels)."""
    return calibrate_heavy_channels(q, k, r=q.shape[-1])


def _attention(q_rows, keys, values, rows, scale, group):
    """Exact causal probabilities ``[R, Hq, L]`` and outputs ``[R, Hq, D]`` of query rows over their prefixes."""
    scores = torch.einsum("rhd,nhd->rhn", q_rows, keys.repeat_interleave(group, 1)) * scale
    scores.masked_fill_(torch.arange(keys.shape[0])[None, None, :] > rows[:, None, None], float("-inf"))
    probs = torch.softmax(scores, -1)
    return probs, torch.einsum("rhn,nhd->rhd", probs, values.repeat_interleave(group, 1))


def _relative_error(out: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return ((out - exact).norm(dim=-1) / exact.norm(dim=-1).clamp(min=1e-30)).mean(0)  # [Hq]


@torch.no_grad()
def profile_decode(q, k, v, rows, channels, candidates: DecodeCandidates, scale: float) -> dict[str, torch.Tensor]:
    """Decode measurements for query rows ``rows`` of one layer (q ``[L, Hq, D]``, k/v ``[L, Hkv, D]``):
    ``ds_recall``/``ds_error`` ``[S, Hq]``, ``ds_read`` ``[S]`` (mean fraction of the context read) for the
    Double Sparsity candidates, ``prune_error`` ``[P, Hq]`` for the pruning sparsities."""
    seq_len, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    keys, values, q_rows = k.float().cpu(), v.float().cpu(), q[rows].float().cpu()
    rows = rows.cpu()
    probs, exact = _attention(q_rows, keys, values, rows, scale, group)
    seq_lens = (rows + 1).to(torch.int32)
    block_table = torch.zeros(len(rows), 1, dtype=torch.int32)  # every row reads the one page holding the context

    result = {name: [] for name in ("ds_recall", "ds_error", "ds_read", "prune_error")}
    for r, fraction in candidates.double_sparsity:
        # dense_below=0: measure the selection itself (the runtime reads everything below its own threshold).
        config = DoubleSparsityConfig(r=r, budget_fraction=fraction, dense_below=0)
        cache = LabelCache(channels[:, :r].contiguous(), 1, seq_len, dtype=torch.float32)
        cache.write(keys, torch.arange(seq_len))
        scores = label_scores(q_rows, cache, block_table, seq_lens, seq_len, config, backend="cpu")
        budgets = config.token_budgets(seq_lens)
        indices, counts = topk_token_indices(scores, budgets, int(budgets.max()))
        valid = torch.arange(indices.shape[-1]) < counts[..., None]
        selected = torch.zeros(*scores.shape[:2], seq_len + 1, dtype=torch.bool)
        selected.scatter_(-1, torch.where(valid, indices.long(), seq_len), True)
        selected = selected[..., :seq_len]
        if selected.shape[1] != num_heads:  # one token set per KV head, shared by its query heads
            selected = selected.repeat_interleave(group, 1)
        kept = probs * selected
        mass = kept.sum(-1)
        out = torch.einsum("rhn,nhd->rhd", kept, values.repeat_interleave(group, 1)) / mass.clamp(min=1e-30)[..., None]
        result["ds_recall"].append(mass.mean(0))
        result["ds_error"].append(_relative_error(out, exact))
        result["ds_read"].append((counts.double() / seq_lens[:, None]).mean().float())
    expand = lambda t: t.repeat_interleave(group, 1)  # noqa: E731  [L, Hkv, D] -> [L, Hq, D]
    causal = torch.arange(seq_len)[None, None, :] > rows[:, None, None]
    for sparsity in candidates.kv_pruning:
        recent = KVPruningConfig(sparsity=sparsity).recent_tokens  # the newest tokens stay dense
        dense = (torch.arange(seq_len)[None, :] > rows[:, None] - recent)[:, None, :]  # [R, 1, L]
        pruned_k, pruned_v = expand(prune_magnitude(keys, sparsity)), expand(prune_magnitude(values, sparsity))
        scores = torch.where(dense, torch.einsum("rhd,nhd->rhn", q_rows, expand(keys)),
                             torch.einsum("rhd,nhd->rhn", q_rows, pruned_k)) * scale
        p = torch.softmax(scores.masked_fill_(causal, float("-inf")), -1)
        out = torch.einsum("rhn,nhd->rhd", p * dense, expand(values)) + torch.einsum("rhn,nhd->rhd", p * ~dense, pruned_v)
        result["prune_error"].append(_relative_error(out, exact))
    return {name: torch.stack(values) if values else torch.empty(0) for name, values in result.items()}
