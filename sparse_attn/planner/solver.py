"""Budgeted choice of one setting per head: maximise a summed value (recall, or minus the output error) subject
to a mean-cost budget.

This is a multiple-choice knapsack. Each head's options are reduced to their upper convex hull in the
(cost, value) plane; starting from every head's cheapest option, hull steps are taken in order of marginal value
per unit of cost (a Lagrangian sweep: the step order is the order in which the multiplier admits them) until the
budget is spent, then any remaining budget buys the best single upgrade that still fits. Exact for the convex
relaxation, within one step of the optimum otherwise; no solver library involved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..patterns import HeadProxy, SeqContext
from .calibrate import Candidate, Profile
from .plan import HeadSetting, Plan

__all__ = ["choose", "KernelTimeModel", "make_plan"]


def _hull(cost: list[float], value: list[float]) -> list[int]:
    """Option ids on the upper-left convex hull, by increasing cost (dominated and non-concave options dropped)."""
    order = sorted(range(len(cost)), key=lambda i: (cost[i], -value[i]))
    hull: list[int] = []
    for i in order:
        if hull and value[i] <= value[hull[-1]]:
            continue  # costs at least as much, is worth no more
        # Drop the last point while it lies on or below the segment from the one before it to i.
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (value[b] - value[a]) * (cost[i] - cost[a]) <= (value[i] - value[a]) * (cost[b] - cost[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def choose(value: torch.Tensor, cost: torch.Tensor, budget: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """One option per unit maximising the summed ``value`` (e.g. recall) with the mean ``cost`` over units at most
    ``budget``; both ``[units, options]``.

    ``allowed`` (bool ``[units, options]``) limits the options. Returns the option index per unit (int64 ``[units]``);
    raises ValueError when even the cheapest options exceed the budget.
    """
    if value.shape != cost.shape or value.dim() != 2 or value.shape[1] == 0:
        raise ValueError(f"value and cost must both be [units, options], got {tuple(value.shape)} and {tuple(cost.shape)}")
    units = value.shape[0]
    allowed = torch.ones_like(value, dtype=torch.bool) if allowed is None else allowed
    if not bool(allowed.any(1).all()):
        raise ValueError("allowed: every unit needs at least one allowed option")
    v, c, ok = value.double().tolist(), cost.double().tolist(), allowed.tolist()
    total = budget * units
    slack = 1e-6 * max(1.0, total)  # float32 costs summed in float64

    hulls = []
    for u in range(units):
        ids = [i for i in range(len(v[u])) if ok[u][i]]
        hulls.append([ids[j] for j in _hull([c[u][i] for i in ids], [v[u][i] for i in ids])])
    pick = [h[0] for h in hulls]
    spent = sum(c[u][pick[u]] for u in range(units))
    if spent > total + slack:
        raise ValueError(f"budget {budget:.4f} is below the cheapest plan's mean cost {spent / units:.4f}")

    # Hull steps, best marginal value per cost first; within a unit the ratios fall, so steps stay in order.
    steps = [((v[u][b] - v[u][a]) / max(c[u][b] - c[u][a], 1e-12), u, s)
             for u, h in enumerate(hulls) for s, (a, b) in enumerate(zip(h, h[1:]))]
    steps.sort(key=lambda t: -t[0])
    position = [0] * units  # hull position reached per unit
    blocked = [False] * units
    for _, u, s in steps:
        if blocked[u] or s != position[u]:
            continue
        a, b = hulls[u][s], hulls[u][s + 1]
        extra = c[u][b] - c[u][a]
        if spent + extra <= total + slack:
            spent += extra
            pick[u], position[u] = b, s + 1
        else:
            blocked[u] = True  # later steps of this unit build on this one

    # Spend what is left: repeatedly take the single option switch with the largest gain that fits.
    while True:
        best = None
        for u in range(units):
            for i in range(len(v[u])):
                gain, extra = v[u][i] - v[u][pick[u]], c[u][i] - c[u][pick[u]]
                if ok[u][i] and gain > 1e-12 and spent + extra <= total + slack and (best is None or gain > best[0]):
                    best = (gain, u, i, extra)
        if best is None:
            break
        _, u, i, extra = best
        pick[u], spent = i, spent + extra
    return torch.tensor(pick, dtype=torch.int64)


@dataclass(frozen=True)
class KernelTimeModel:
    """A head's prefill attention time relative to dense attention over the same causal area:

        time = sparse_factor * density + estimation overhead of its pattern,

    with overheads from the work each estimator does relative to dense (QK^T only, so half of attention's flops):
    HeadProxy scores 1 of ``q_stride`` rows per proxy (one per group of heads, or one per head with
    ``head_scores``) and, where a budget depends on gamma, reads one full query block per head; VerticalSlash
    reads ``last_q`` rows; TopKBlocks compares block means. A coarse model for budgeting, not a timer.
    """

    sparse_factor: float = 1.0

    def cost(self, candidate: Candidate, density: torch.Tensor, heads_per_group: int, q_block_size: int,
             context_len: int) -> torch.Tensor:
        params = dict(candidate.params)
        if candidate.pattern == "HeadProxy":
            pattern = candidate.build()
            group = 1 if pattern.head_scores else heads_per_group * pattern.kv_heads_per_group
            seq = SeqContext(context_len, context_len, 1, q_block_size, q_block_size, True, torch.device("cpu"))
            budget_rule = 0.0 if pattern.fixed_budgets(seq, 1) else 0.5 * q_block_size / context_len
            overhead = 0.5 / pattern.q_stride / group + budget_rule
        elif candidate.pattern == "VerticalSlash":
            overhead = params.get("last_q", 64) / context_len
        elif candidate.pattern == "TopKBlocks":
            overhead = 0.5 / q_block_size
        else:
            overhead = 0.0
        return self.sparse_factor * density + overhead


#: The fewest keys a HeadProxy head of a plan reads per query block at run time (its ``min_budget``). Calibration
#: measures each head's fixed fraction at one context length (4096 tokens by default); below ``MIN_KEYS / fraction``
#: tokens that fraction would leave a head a few blocks, and a head that retrieves needs reach in absolute terms. On
#: SmolLM2's plan the floor raises the density at 3k tokens from 38% to 62% and at 8k from 33% to 36% of the causal
#: blocks (attention is a small share of the forward at short contexts), and keeps retrieval answers the plan
#: otherwise loses at 3k (a word needle in a mixed haystack, at 40% density).
MIN_KEYS = 1024


def make_plan(
    profile: Profile,
    *,
    target_density: float | None = None,
    target_time: float | None = None,
    time_model: KernelTimeModel | None = None,
    patterns: list[str] | None = None,
    objective: str | None = None,
    decode_budget: float | None = 1 / 8,
    kv_budget: float | None = None,
    min_keys: int = MIN_KEYS,
) -> Plan:
    """Choose a candidate per (layer, head) of ``profile`` under one budget: ``target_density`` (mean fraction
    of the causal block area read) or ``target_time`` (mean attention time relative to dense under
    ``time_model``). ``objective`` "error" minimises the summed relative output error (the default where the
    profile measured it), "recall" maximises the summed attention-mass recall. ``patterns`` limits the pattern
    names used (Dense is always allowed).

    Where the profile measured decode settings: ``decode_budget`` (mean fraction of the context read per decode
    step) picks a Double Sparsity setting per layer minimising the output error (None: dense decode), and
    ``kv_budget`` (mean fraction of K/V entries kept) a KV pruning sparsity per layer (None: no pruning).

    ``min_keys``: the HeadProxy heads' run-time floor of keys per query block (:data:`MIN_KEYS`; 0 keeps the
    calibrated candidates' own floor). The heads' recorded density, recall and error stay the calibration's."""
    if isinstance(min_keys, bool) or not isinstance(min_keys, int) or min_keys < 0:
        raise ValueError(f"min_keys must be an int >= 0, got {min_keys!r}")
    objective = objective or ("error" if profile.error is not None else "recall")
    if objective not in ("error", "recall") or (objective == "error" and profile.error is None):
        raise ValueError(f"objective must be 'recall' or 'error' (with a profile that measured it), got {objective!r}")
    if (target_density is None) == (target_time is None):
        raise ValueError("give exactly one of target_density and target_time")
    target = target_density if target_density is not None else target_time
    if not isinstance(target, (int, float)) or not target > 0:
        raise ValueError(f"the budget must be a positive number, got {target!r}")
    shape = profile.shape
    layers, num_candidates, heads = profile.recall.shape
    context_len = max(profile.info.get("context_lens", [0]) or [0]) or 4096
    if target_time is not None:
        model = time_model or KernelTimeModel()
        group = shape.num_heads // shape.num_kv_heads
        cost = torch.stack([model.cost(cand, profile.density[:, c], group, profile.q_block_size, context_len)
                            for c, cand in enumerate(profile.candidates)], dim=1)
    else:
        cost = profile.density
    allowed = torch.tensor([patterns is None or cand.pattern in patterns or cand.pattern == "Dense"
                            for cand in profile.candidates])
    units = lambda t: t.permute(0, 2, 1).reshape(layers * heads, num_candidates)  # noqa: E731
    value = profile.recall if objective == "recall" else -profile.error
    pick = choose(units(value), units(cost), float(target),
                  allowed[None].expand(layers * heads, -1)).view(layers, heads)

    def measured(t: torch.Tensor | None, i: int, c: int, h: int) -> float | None:
        return None if t is None else round(float(t[i, c, h]), 5)

    settings = []
    for i in range(layers):
        row = []
        for h in range(heads):
            c = int(pick[i, h])
            cand = profile.candidates[c]
            params = dict(cand.params)
            floor = params.get("min_budget", HeadProxy.min_budget)  # HeadProxy's default where the candidate sets none
            if cand.pattern == "HeadProxy" and isinstance(floor, int):
                params["min_budget"] = max(floor, min_keys)
            row.append(HeadSetting(cand.pattern, params, measured(profile.density, i, c, h),
                                   measured(profile.recall, i, c, h), measured(profile.error, i, c, h)))
        settings.append(row)
    chosen_cost = cost.gather(1, pick[:, None, :]).mean()
    budget = {"target_density": target_density} if target_density is not None else {
        "target_time": target_time, "time_model": {"sparse_factor": (time_model or KernelTimeModel()).sparse_factor}}
    budget.update(achieved=round(float(chosen_cost), 5), objective=objective, min_keys=min_keys)
    decode = _decode_choices(profile, decode_budget, kv_budget, budget)
    return Plan(profile.model_id, shape, settings, profile.q_block_size, profile.kv_block_size, budget,
                dict(profile.info, candidates=[cand.label for cand in profile.candidates]), decode=decode)


def _decode_choices(profile: Profile, decode_budget: float | None, kv_budget: float | None,
                    budget: dict) -> list[dict] | None:
    """Per layer: the Double Sparsity setting and KV pruning sparsity with the least mean output error over heads
    under their budgets; the "keep everything" option (error 0, cost 1) is always among the choices."""
    measured = profile.decode
    if measured is None or (decode_budget is None and kv_budget is None):
        return None
    layers = profile.shape.num_layers
    decode: list[dict] = [{} for _ in range(layers)]
    if decode_budget is not None and measured["double_sparsity"]:
        error = torch.cat([torch.zeros(layers, 1), measured["ds_error"].mean(-1)], 1)
        cost = torch.cat([torch.ones(layers, 1), measured["ds_read"]], 1)
        # Short calibration prompts read their whole context at any fraction: then the cheapest choice stands.
        pick = choose(-error, cost, max(decode_budget, float(cost.min(1).values.mean())))
        for i, c in enumerate(pick.tolist()):
            if c > 0:
                r, fraction = measured["double_sparsity"][c - 1]
                decode[i]["double_sparsity"] = {
                    "r": int(r), "budget_fraction": float(fraction),
                    "channels": measured["channels"][i, :, : int(r)].tolist(),
                    "recall": round(float(measured["ds_recall"][i, c - 1].mean()), 5),
                    "error": round(float(measured["ds_error"][i, c - 1].mean()), 5)}
        budget["decode_budget"] = decode_budget
    if kv_budget is not None and measured["kv_pruning"]:
        sparsity = torch.tensor([0.0] + [float(x) for x in measured["kv_pruning"]])
        error = torch.cat([torch.zeros(layers, 1), measured["prune_error"].mean(-1)], 1)
        pick = choose(-error, (1 - sparsity).expand(layers, -1).contiguous(), kv_budget)
        for i, c in enumerate(pick.tolist()):
            if c > 0:
                decode[i]["kv_pruning"] = {"sparsity": float(sparsity[c]),
                                           "error": round(float(error[i, c]), 5)}
        budget["kv_budget"] = kv_budget
    return [d or None for d in decode]
