"""Head-proxy block estimation (ProxyAttn): one cheap proxy head per KV group scores the blocks for all its heads.

Steps, for one sequence:
1. Group the query heads by KV head (GQA groups; ``kv_heads_per_group`` merges several KV groups for MHA-like
   models). A group's proxy query is the mean of its heads' queries, its proxy key the mean of its KV heads' keys.
   With ``head_scores`` every query head is its own proxy (against its group's proxy key).
2. Score blocks with the proxy: ``softmax(Qg Kg^T * scale)`` on strided query rows (1 of ``q_stride``, aligned to
   each query block's last row), pooled to ``[proxies, num_q_blocks, num_kv_blocks]``: the max probability in the
   block (``pooling="max"``, ProxyAttn's) or the block's attention mass averaged over the rows (``"mean"``).
3. Per-head budget: on the last query block (and, with ``fit_blocks`` > 1, on query blocks spread evenly before
   it), the head's own attention probabilities are pooled to block masses (averaged over the block's rows); ``b_h``
   is the most blocks any of these query blocks needs for its mass to reach ``gamma_h`` (cumulative-mass
   selection), kept within ``[min_budget, max_budget]``. Budgets are tokens (int) or fractions of the context
   (float). The last block alone (ProxyAttn's rule) can under-serve the middle of a prompt: a prompt's final rows
   often attend to a few places while rows inside a long document spread their attention wider.
4. Head h keeps, in every query block, the first block (the attention sink), the diagonal block and its best
   blocks by its proxy's score up to ``b_h`` blocks in all.

The gamma rule adapts each head's budget to the text, so the density is not known in advance: on SmolLM2 the same
setting read 20-50% more blocks on some licence texts than on others. ``max_budget <= min_budget`` fixes the budget
instead (step 3 is then skipped), and so does ``gamma = 1`` (the whole mass: the maximum budget, at least the
minimum), which is how plans hold a density budget: a fraction-of-the-context budget has the same density on every
text and every length, and a token minimum under it keeps short contexts from shrinking a head to a few blocks. Measured on SmolLM2-135M at 4k tokens, per-head proxies roughly halve
the output error of group proxies at equal density (the three query heads of a group attend differently; the group
mean blurs them) for three times the scoring work, and mean pooling matches an oracle that knows the exact block
masses to within a few percent.

The estimation time is kept apart from the kernel's in :attr:`HeadProxy.stats`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .._validate import MAX_COUNT, check_int, check_real, shown
from ..masks import causal_block_bounds
from ..ops.attention import resolve_backend, triton_kernels
from ..ops.extension import extension_available, pooled_block_scores_cpu, select_block_rows_cpu, select_blocks_cpu
from .base import Pattern, SeqContext

__all__ = ["HeadProxy", "pooled_block_probs", "blocks_for_mass", "strided_rows", "POOLINGS"]

#: Block score pooling over a query block's sampled rows: the max probability, the mean block mass, or their sum.
POOLINGS = ("max", "mean")

#: Parameters that may hold one value per query head.
_PER_HEAD = ("gamma", "min_budget", "max_budget")

# Elements of one chunk of the score matrix on the PyTorch path (bounds its memory: 2**24 fp32 = 64 MiB).
_CHUNK_ELEMENTS = 1 << 24


def strided_rows(seq: SeqContext, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query rows sampled per query block: local offsets ``last, last - stride, ...`` of each block, so every
    block (also a short last one) keeps its final row. Returns local row ids and absolute positions, int64
    ``[num_q_blocks, ceil(q_block_size / stride)]``; empty slots are -1 in both."""
    nq, bq = seq.num_q_blocks, seq.q_block_size
    slots = -(-bq // stride)
    first = torch.arange(nq, device=seq.device) * bq
    block_rows = torch.clamp(seq.q_len - first, max=bq)  # rows in each block
    offset = block_rows[:, None] - 1 - stride * torch.arange(slots, device=seq.device)[None, :]
    rows = torch.where(offset >= 0, first[:, None] + offset, -1)
    return rows, torch.where(rows >= 0, rows + seq.q_offset, -1)


def pooled_block_probs(q, k, pos, kv_block_size, scale, causal, mean, backend=None) -> torch.Tensor:
    """Softmax probabilities of query rows over all keys, pooled per (head, query block, KV block).

    q ``[H, nq, R, D]`` (R rows per query block), k ``[Tk, Hk, D]`` (head h reads KV head ``h // (H // Hk)``),
    pos ``[nq, R]`` absolute row positions (-1: empty slot). ``mean=False``: max of P over the block's rows and keys;
    ``mean=True``: the block's mass ``sum_n P`` averaged over the rows. Returns fp32 ``[H, nq, num_kv_blocks]``
    (fp64 for fp64 inputs on the PyTorch path). The Triton kernel runs where ``backend`` resolves to "triton", the C++
    kernel (scores tile by tile, never the whole score matrix; from q and k rounded to bf16 or int16 where the CPU
    has those products, see :func:`~sparse_attn.ops.extension.pooled_block_scores_cpu`) for CPU tensors under
    "cpu", PyTorch otherwise.
    """
    name = resolve_backend(backend, q.device)
    if name == "triton" and kv_block_size >= 16 and not kv_block_size & (kv_block_size - 1):
        return triton_kernels().pooled_block_probs_fwd(q, k, pos.to(torch.int32), kv_block_size, scale, causal, mean)
    if (name == "cpu" and q.device.type == "cpu" and q.dtype != torch.float64
            and extension_available("pooled_block_scores")):
        return pooled_block_scores_cpu(q, k, pos, kv_block_size, scale, causal, mean)
    return _pooled_block_probs_torch(q, k, pos, kv_block_size, scale, causal, mean)


def _pooled_block_probs_torch(q, k, pos, kv_block_size, scale, causal, mean) -> torch.Tensor:
    heads, nq, rows, _ = q.shape
    kv_len = k.shape[0]
    nk = -(-kv_len // kv_block_size)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys = k.transpose(0, 1).to(dtype)[torch.arange(heads, device=q.device) // (heads // k.shape[1])]  # [H, Tk, D]
    key_pos = torch.arange(kv_len, device=q.device)
    out = torch.zeros(heads, nq, nk, dtype=dtype, device=q.device)
    # Causal chunks of query blocks read only the keys up to their last row: with 8 or more chunks the work is
    # within 1/8 of the causal half of the score matrix instead of all of it.
    chunk = max(1, min(_CHUNK_ELEMENTS // max(1, heads * rows * kv_len), -(-nq // 8) if causal else nq))
    for start in range(0, nq, chunk):
        stop = min(nq, start + chunk)
        p_pos = pos[start:stop]
        # Keys any row of the chunk sees, in whole blocks (every key without causality).
        blocks = min(nk, int(p_pos.max()) // kv_block_size + 1) if causal else nk
        seen = min(kv_len, blocks * kv_block_size)
        scores = torch.einsum("hird,hnd->hirn", q[:, start:stop].to(dtype), keys[:, :seen]) * scale
        allowed = (p_pos >= 0)[..., None] & ((key_pos[:seen] <= p_pos[..., None]) if causal else True)
        probs = torch.softmax(scores.masked_fill_(~allowed, float("-inf")), dim=-1)
        if bool((p_pos < 0).any()):
            probs.nan_to_num_(0.0)  # empty slots saw no key: probability 0, not NaN
        if blocks * kv_block_size > seen:
            probs = torch.nn.functional.pad(probs, (0, blocks * kv_block_size - seen))
        probs = probs.unflatten(-1, (blocks, kv_block_size))
        if mean:
            n_rows = (p_pos >= 0).sum(-1).clamp(min=1)
            out[:, start:stop, :blocks] = probs.sum(-1).sum(2) / n_rows[None, :, None]
        else:
            out[:, start:stop, :blocks] = probs.amax(-1).amax(2)
    return out


def blocks_for_mass(mass: torch.Tensor, gamma: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
    """Fewest blocks whose mass reaches ``gamma`` of the total: mass ``[H, nk]``, gamma ``[H]`` -> int64 ``[H]``.
    Blocks marked in ``first`` (bool ``[nk]``) are counted before the rest, whatever their mass (blocks a
    selection keeps anyway)."""
    order = mass if first is None else mass.masked_fill(first, float("inf"))
    ordered = mass.gather(-1, order.argsort(dim=-1, descending=True)).cumsum(-1)
    target = gamma.to(ordered.dtype) * ordered[:, -1:].squeeze(-1)
    return ((ordered < target[:, None]).sum(-1) + 1).clamp(max=mass.shape[-1])


def _is_budget(value, minimum: int = 1) -> bool:
    """Tokens (an int in [minimum, MAX_COUNT]) or a fraction of the context (a float in (0, 1])."""
    if isinstance(value, bool):
        return False
    return ((isinstance(value, int) and minimum <= value <= MAX_COUNT)
            or (isinstance(value, float) and 0.0 < value <= 1.0))


def _budget_blocks(budget: int | float, seq: SeqContext) -> int:
    """A budget in KV blocks: int budgets are tokens, float budgets a fraction of the context's ``kv_len`` keys."""
    tokens = budget * seq.kv_len if isinstance(budget, float) else budget
    return min(seq.num_kv_blocks, math.ceil(tokens / seq.kv_block_size))


@dataclass(frozen=True)
class HeadProxy(Pattern):
    """ProxyAttn block selection (see the module docstring).

    Args:
        gamma: cumulative attention mass each head's budget must reach on the last query block (0.95 or 0.90 in
            the paper); one float for all heads, or one per query head (how a plan gives heads their own).
        q_stride: keep 1 query row of every ``q_stride`` for the proxy scores.
        min_budget: fewest keys a head keeps per query block (rounded up to whole blocks): tokens (int) or a
            fraction of the context's keys (float in (0, 1]); one for all heads or one per query head.
        kv_heads_per_group: KV heads merged into one proxy group (1: the GQA groups).
        backend: "triton" to run the scoring kernel, "cpu"/"reference" for PyTorch, None: the best for the device.
        max_budget: most keys a head keeps per query block, like ``min_budget`` (None: no cap; the minimum wins
            where they cross). At or below ``min_budget``, or with gamma 1, the budget is fixed (the larger of
            the two) and no mass is computed.
        head_scores: score with every query head's own queries instead of its group's mean query.
        pooling: "max" (ProxyAttn) or "mean" (the block's mass averaged over the sampled rows).
        dense_tail: the query blocks holding the last ``dense_tail`` query rows read every block they can see. A
            prompt ends with its question: those rows decide what the first answer token retrieves, and their block
            rows are a small share of the causal area (one block row in ``num_q_blocks``).
        fit_blocks: query blocks the gamma budget is fitted on: the last one and ``fit_blocks - 1`` more spread
            evenly over the queries (each costs one query block of exact per-head scores); 1 is ProxyAttn's rule.
    """

    gamma: float | tuple[float, ...] = 0.95
    q_stride: int = 4
    min_budget: int | float | tuple[int | float, ...] = 2048
    kv_heads_per_group: int = 1
    backend: str | None = None
    max_budget: int | float | tuple[int | float | None, ...] | None = None
    head_scores: bool = False
    pooling: str = "max"
    dense_tail: int = 0
    fit_blocks: int = 1
    #: Filled by every estimate: ``seconds`` (estimation time of the last call, apart from the attention kernel),
    #: ``total_seconds`` and ``calls`` (running totals), ``budget_tokens`` (per head, last call).
    stats: dict = field(default_factory=dict, compare=False, repr=False)

    content_aware = True

    def __post_init__(self):
        for name in _PER_HEAD:
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.gamma, tuple):
            if not self.gamma:
                raise ValueError("gamma must lie in (0, 1], or be one such value per query head; got ()")
            for h, g in enumerate(self.gamma):
                check_real(f"gamma[{h}]", g, 0, 1, low_open=True)
        else:
            check_real("gamma", self.gamma, 0, 1, low_open=True)
        check_int("q_stride", self.q_stride)
        lows = self.min_budget if isinstance(self.min_budget, tuple) else (self.min_budget,)
        highs = self.max_budget if isinstance(self.max_budget, tuple) else (self.max_budget,)
        if not lows or not all(_is_budget(b, 0) for b in lows):
            raise ValueError(f"min_budget must be tokens (an int in [0, {MAX_COUNT}]) or a fraction of the context "
                             f"(a float in (0, 1]), or one of those per query head; got {shown(self.min_budget)}")
        if not highs or not all(b is None or _is_budget(b) for b in highs):
            raise ValueError(f"max_budget must be None, tokens (an int in [1, {MAX_COUNT}]) or a fraction of the "
                             f"context (a float in (0, 1]), or one of those per query head; got "
                             f"{shown(self.max_budget)}")
        if len(lows) == len(highs) or 1 in (len(lows), len(highs)):
            pairs = zip(lows * (len(highs) if len(lows) == 1 else 1), highs * (len(lows) if len(highs) == 1 else 1))
            if any(high is not None and type(high) is type(low) and high < low for low, high in pairs):
                raise ValueError(f"max_budget {shown(self.max_budget)} must be >= min_budget "
                                 f"{shown(self.min_budget)}")
        check_int("kv_heads_per_group", self.kv_heads_per_group)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not isinstance(self.head_scores, bool):
            raise ValueError(f"head_scores must be a bool, got {self.head_scores!r}")
        check_int("dense_tail", self.dense_tail, 0)
        check_int("fit_blocks", self.fit_blocks)

    def check_heads(self, num_heads: int, num_kv_heads: int) -> None:
        """ValueError where a per-head list (``gamma``, ``min_budget``, ``max_budget``) does not have ``num_heads``
        values or ``kv_heads_per_group`` does not divide ``num_kv_heads``."""
        if num_kv_heads % self.kv_heads_per_group:
            raise ValueError(f"kv_heads_per_group={self.kv_heads_per_group} must divide the {num_kv_heads} KV heads")
        for name in _PER_HEAD:
            self._per_head(name, num_heads)

    def keep_blocks(self, seq: SeqContext) -> torch.Tensor:
        nq, nk = seq.num_q_blocks, seq.num_kv_blocks
        if nq == 0 or nk == 0:
            return torch.zeros(1, nq, nk, dtype=torch.bool, device=seq.device)
        if self.dense_tail:
            _, last_row = seq.q_block_rows()
            if int(last_row[0]) >= seq.kv_len - self.dense_tail:  # every query block is in the tail (decode rows):
                return torch.ones(1, nq, nk, dtype=torch.bool, device=seq.device)  # nothing to estimate
        start = time.perf_counter()
        keep, budget = self.select(seq, *self.estimate(seq))
        self._record(seq, start, budget)
        return keep

    def block_rows(self, seq: SeqContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The mask rows of :meth:`keep_blocks` clipped to the visible blocks, ``(counts [Hq, nq], indices [Hq, nq,
        W])`` int32, from the C++ selection without the boolean block matrix (CPU tensors under the "cpu" backend;
        None elsewhere: build_mask then compresses keep_blocks)."""
        nq, nk = seq.num_q_blocks, seq.num_kv_blocks
        if not (nq and nk and seq.device.type == "cpu" and resolve_backend(self.backend, seq.device) == "cpu"
                and extension_available("select_block_rows")):
            return None
        if self.dense_tail and int(seq.q_block_rows()[1][0]) >= seq.kv_len - self.dense_tail:
            return None  # every query block is in the tail: nothing to estimate
        start = time.perf_counter()
        scores, mass = self.estimate(seq)
        budget, group_of_head, bound, diag, tail_from = self._selection(seq, scores, mass)
        counts, indices = select_block_rows_cpu(scores, budget, group_of_head, bound, diag, tail_from)
        self._record(seq, start, budget)
        return counts, indices

    def _record(self, seq: SeqContext, start: float, budget: torch.Tensor) -> None:
        if seq.device.type == "cuda":
            torch.cuda.synchronize(seq.device)
        elapsed = time.perf_counter() - start
        self.stats.update(seconds=elapsed, total_seconds=self.stats.get("total_seconds", 0.0) + elapsed,
                          calls=self.stats.get("calls", 0) + 1,
                          budget_tokens=(budget * seq.kv_block_size).tolist())

    @property
    def estimate_key(self) -> tuple:
        """The settings :meth:`estimate` depends on: settings with equal keys can share one estimate."""
        return (self.q_stride, self.kv_heads_per_group, self.head_scores, self.pooling, self.fit_blocks)

    def estimate(self, seq: SeqContext, with_mass: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Steps 1-3 before the budget: proxy block scores ``[proxies, nq, nk]`` and each head's block masses on
        the query blocks the budget is fitted on (:meth:`fit_block_ids`) ``[Hq, F, nk]`` (None where every budget is
        fixed, unless ``with_mass``). They depend on :attr:`estimate_key` only, not on the budget rule, so a
        calibration run can share them between settings."""
        q, k = seq.require_qk("HeadProxy")
        num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
        if num_kv_heads % self.kv_heads_per_group:
            raise ValueError(f"kv_heads_per_group={self.kv_heads_per_group} must divide the {num_kv_heads} KV heads")
        scale = seq.scale if seq.scale is not None else head_dim ** -0.5
        groups = num_kv_heads // self.kv_heads_per_group

        if self.kv_heads_per_group == 1:  # every KV head its own proxy key
            k_proxy = k
        else:
            k_proxy = k.unflatten(1, (groups, self.kv_heads_per_group)).float().mean(2).to(k.dtype)  # [Lk, G, D]
        rows, pos = strided_rows(seq, self.q_stride)
        q_rows = q[rows.clamp(min=0)]  # [nq, R, Hq, D]: the sampled rows only
        if not self.head_scores:  # a group's proxy query is the mean of its heads' (per-head: every head its own)
            q_rows = q_rows.unflatten(2, (groups, num_heads // groups)).float().mean(3).to(q.dtype)
        q_rows = q_rows.permute(2, 0, 1, 3)  # [G or Hq, nq, R, D]
        scores = pooled_block_probs(q_rows, k_proxy, pos, seq.kv_block_size, scale, seq.causal,
                                    mean=self.pooling == "mean", backend=self.backend).float()

        if not with_mass and self.fixed_budgets(seq, num_heads):
            return scores, None  # no budget depends on the fitted blocks' masses
        local = self.fit_block_ids(seq)[:, None] * seq.q_block_size + torch.arange(seq.q_block_size,
                                                                                   device=seq.device)
        inside = local < seq.q_len  # the last block may be short: its missing rows are empty slots
        q_fit = q[local.clamp(max=seq.q_len - 1)].permute(2, 0, 1, 3)  # [Hq, F, rows, D]
        pos = torch.where(inside, local + seq.q_offset, -1)
        mass = pooled_block_probs(q_fit, k, pos, seq.kv_block_size, scale, seq.causal, mean=True,
                                  backend=self.backend)
        return scores, mass

    def fit_block_ids(self, seq: SeqContext) -> torch.Tensor:
        """The query blocks the gamma budget is fitted on, ascending, the last one included: int64 ``[F]``,
        F = min(``fit_blocks``, number of query blocks)."""
        nq = seq.num_q_blocks
        count = min(self.fit_blocks, nq)
        return torch.tensor(sorted({nq * (j + 1) // count - 1 for j in range(count)}), device=seq.device)

    def select(self, seq: SeqContext, scores: torch.Tensor,
               mass: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 4: keep ``[Hq, nq, nk]`` (the first block, the attention sink, the diagonal block, the local
        context, and each head's best blocks by its proxy's score, b_h blocks in all; invisible blocks never) and
        the budgets ``b_h`` in blocks ``[Hq]``. Equal scores rank the lower block first on the C++ path (CPU tensors
        under the "cpu" backend); elsewhere ``torch.topk`` orders them."""
        num_heads, (_, nq, nk) = seq.num_heads, scores.shape
        budget, group_of_head, bound, diag, tail_from = self._selection(seq, scores, mass)
        if (resolve_backend(self.backend, seq.device) == "cpu" and seq.device.type == "cpu"
                and extension_available("select_blocks")):
            return select_blocks_cpu(scores, budget, group_of_head, bound, diag, tail_from), budget
        # The sink and diagonal blocks rank first, so they count within b_h: a fixed budget reads exactly
        # min(b_h, visible) blocks per query block (at least these two), whatever the content.
        # Each proxy ranks its blocks once (the best max(b_h) of them); head h keeps its proxy's first b_h.
        always = self._always(seq, diag, torch.arange(nq, device=seq.device))
        visible = torch.arange(nk, device=seq.device)[None, :] < bound[:, None]
        scores = scores.masked_fill(~visible, float("-inf")).masked_fill(always, float("inf"))
        width = max(1, min(nk, int(budget.max())))
        best = scores.topk(width, dim=-1).indices  # [proxies, nq, width], best first
        take = (torch.arange(width, device=seq.device) < budget[:, None, None]).expand(num_heads, nq, width)
        top = torch.zeros(num_heads, nq, nk, dtype=torch.bool, device=seq.device)
        top.scatter_(-1, best[group_of_head], take)
        top &= visible  # a budget larger than the visible blocks ranked invisible ones in
        top[:, tail_from:, :] = True
        return top | always, budget

    def _selection(self, seq: SeqContext, scores: torch.Tensor, mass: torch.Tensor | None):
        """What step 4 selects with: per head its budget in blocks and its proxy ``[Hq]``, per query block its
        visible-block bound and diagonal block ``[nq]``, and the first query block of the dense tail."""
        num_heads, (groups, nq, nk) = seq.num_heads, scores.shape
        gamma = torch.tensor(self._per_head("gamma", num_heads), dtype=torch.float64, device=seq.device)
        floor, cap = self._budget_bounds(seq, num_heads)
        _, last_row = seq.q_block_rows()
        if seq.causal:  # query block i sees blocks j < bound[i]; its diagonal block is kept beside the sink
            bound = causal_block_bounds(seq.q_len, seq.kv_len, seq.q_block_size, seq.kv_block_size, seq.device)
            diag = (last_row // seq.kv_block_size).clamp(max=nk - 1)
        else:
            bound = torch.full((nq,), nk, dtype=torch.int64, device=seq.device)
            diag = torch.full((nq,), -1, dtype=torch.int64, device=seq.device)
        # gamma 1 asks for the whole mass, which the cap bounds: those heads take their cap (at least the floor)
        # without the masses; so do heads whose cap is at or below their floor.
        fixed = torch.maximum(cap, floor).where(gamma >= 1.0, floor)
        if mass is not None:  # the gamma rule counts the sink and diagonal blocks first, as step 4 keeps them
            fitted = self.fit_block_ids(seq)
            if mass.dim() != 3 or mass.shape[1] != len(fitted):
                raise ValueError(f"select: mass must be [heads, {len(fitted)} fitted query blocks, kv blocks] as "
                                 f"estimate returns it, got {tuple(mass.shape)}")
            first = self._always(seq, diag, fitted)  # [F, nk]
            need = torch.stack([blocks_for_mass(mass[:, j], gamma, first[j]) for j in range(len(fitted))])
            rule = torch.maximum(torch.minimum(need.amax(0), cap), floor)
            budget = torch.where((gamma >= 1.0) | (cap <= floor), fixed, rule)
        elif self.fixed_budgets(seq, num_heads):
            budget = fixed
        else:
            raise ValueError("select: a budget depends on gamma, so it needs the masses "
                             "(estimate(seq, with_mass=True))")
        # Query blocks whose last row lies in the dense tail keep every block (causality is applied by build_mask).
        tail_from = int((last_row < seq.kv_len - self.dense_tail).sum()) if self.dense_tail else nq
        group_of_head = torch.arange(num_heads, device=seq.device) // (num_heads // groups)
        return budget, group_of_head, bound, diag, tail_from

    @staticmethod
    def _always(seq: SeqContext, diag: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Bool ``[len(blocks), nk]``: the KV blocks the query blocks ``blocks`` keep whatever their scores: the
        attention sink (cheap, and losing it costs far more than its share of mass) and the diagonal block
        (``diag``, -1: none)."""
        j = torch.arange(seq.num_kv_blocks, device=seq.device)[None, :]
        return (j == 0) | (j == diag[blocks][:, None])

    def _budget_bounds(self, seq: SeqContext, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per head, the minimum and maximum budget in KV blocks ``[Hq]`` each (no maximum: every block)."""
        low, high = self._per_head("min_budget", num_heads), self._per_head("max_budget", num_heads)
        floor = torch.tensor([_budget_blocks(b, seq) for b in low], device=seq.device)
        cap = torch.tensor([seq.num_kv_blocks if b is None else _budget_blocks(b, seq) for b in high],
                           device=seq.device)
        return floor, cap

    def fixed_budgets(self, seq: SeqContext, num_heads: int) -> bool:
        """Whether every head's budget is fixed on ``seq``, depending on neither the content nor a gamma below 1:
        its maximum at or below its minimum, or gamma 1 (the maximum, at least the minimum). The last query
        block's masses are then not computed."""
        floor, cap = self._budget_bounds(seq, num_heads)
        whole = torch.tensor([g >= 1.0 for g in self._per_head("gamma", num_heads)], device=cap.device)
        return bool(((cap <= floor) | whole).all())

    def _per_head(self, name: str, num_heads: int) -> tuple:
        value = getattr(self, name)
        if not isinstance(value, tuple):
            return (value,) * num_heads
        if len(value) != num_heads:
            raise ValueError(f"{name} has {len(value)} values but the layer has {num_heads} query heads")
        return value
