"""Offline profiling: how much of each head's attention every candidate pattern keeps, and at what density.

A transformers model runs its ordinary forward on calibration prompts with an attention function of our own
(``attn_implementation="sparse_calibrate"``) that hands every layer's post-RoPE q, k and v to the profiler and
returns SDPA's result, so the model computes exactly what it always does. Per layer the profiler computes, for
sampled query rows, the exact attention probabilities and outputs split by KV block, then for every candidate

    recall[h]  = attention mass inside the blocks the pattern keeps for the row,
    error[h]   = ||o_kept - o|| / ||o||, the relative error of the row's attention output when only the kept
                 blocks are read (softmax renormalised over them, as the sparse kernel computes it),
    density[h] = kept blocks / causally visible blocks,

averaged over rows. Rows are sampled evenly over the sequence (``query_rows``, perplexity weighs every position
alike) and, separately, all rows of the last query block (the rows that produce the next token); recall and error
are the mean of the two averages so both count. Mass recall says how much attention a pattern drops; the output
error also says whether it mattered (dropping part of a near-uniform average over similar values changes little),
which is what the solver optimises.

Why the plain output error and not the loss: on SmolLM2, the loss change a layer causes when it alone runs sparse
adds up over layers (the sum came within 1-12% of the whole plan's), and first/second-order Taylor terms of the
next-token loss (from the loss gradient at each attention output) predict it better than the output error on the
text they are measured on; but it varies from text to text (per-layer loss changes of one plan on two licence
texts correlated 0.06), and plans that weighted errors by such sensitivities, per head or per layer, ran 0.5-3
points of perplexity worse on held-out text than plans from the unweighted error at the same density. The output
error is stable across texts, so plans built on it transfer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from ..patterns import HeadProxy, Pattern, SeqContext
from .decode import DecodeCandidates, heavy_channel_ranking, profile_decode
from .plan import ModelShape, build_pattern

__all__ = ["CALIBRATE_IMPLEMENTATION", "Candidate", "Profile", "default_candidates", "profile_layer", "calibrate",
           "candidate_keeps", "BUDGET_FRACTIONS", "WINDOW_FRACTIONS",
           "recording_qk", "calibration_prompts", "default_calibration_texts"]

CALIBRATE_IMPLEMENTATION = "sparse_calibrate"


@dataclass(frozen=True)
class Candidate:
    """A pattern setting to profile: a :data:`sparse_attn.planner.plan.PATTERNS` name and its parameters."""

    pattern: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, pattern: str, **params) -> "Candidate":
        return cls(pattern, tuple(sorted(params.items())))

    def build(self) -> Pattern:
        return build_pattern(self.pattern, dict(self.params), f"candidate {self.label}")

    @property
    def label(self) -> str:
        return f"{self.pattern}({', '.join(f'{k}={v}' for k, v in self.params)})"


#: Context fractions the default candidates' budgets and windows take (1/32 .. 1/2).
BUDGET_FRACTIONS = (1 / 32, 3 / 64, 1 / 16, 3 / 32, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2)
WINDOW_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


#: How the fixed-budget HeadProxy candidates estimate and select, whatever their budget: gamma 1 with a fraction of
#: the context as the maximum is a fixed budget; a floor of 256 tokens keeps a head from shrinking to a few blocks at
#: short contexts (it binds below 256 / fraction tokens only); 1 query row of 4 scored (on SmolLM2 1 of 8 halves the
#: estimation time and adds about 1% perplexity at 4k); the prompt's last 128 rows (its question) read in full.
PROXY_RUNTIME = dict(gamma=1.0, min_budget=256, q_stride=4, dense_tail=128)


def default_candidates(adaptive: bool = False) -> list[Candidate]:
    """Dense, sinks + windows growing with the context, and HeadProxy with fixed budgets (a fraction of the
    context), scored per query head (the most accurate) or per KV group (a third of the estimation work).

    Every such candidate's density depends on the context length only, never on the text, so the density a plan
    is solved for is the density it runs at, on any input, and fractions keep it at other lengths. ``adaptive``
    adds content-adaptive and fixed-token candidates: sinks + fixed windows (AShape), VerticalSlash and HeadProxy
    with gamma budgets. They let heads spend more where a text needs it, at the price of a run-time density that
    follows the text (on SmolLM2 the same gamma or VerticalSlash setting read 20-50% more blocks on some licence
    texts than on others) and, for fixed windows, the length."""
    out = [Candidate.of("Dense")]
    out += [Candidate.of("ElasticSpan", alpha=64, beta=f, sink_tokens=64) for f in WINDOW_FRACTIONS]
    out += [Candidate.of("HeadProxy", **PROXY_RUNTIME, max_budget=f, head_scores=True, pooling="mean")
            for f in BUDGET_FRACTIONS]
    out += [Candidate.of("HeadProxy", **PROXY_RUNTIME, max_budget=f) for f in BUDGET_FRACTIONS]
    if adaptive:
        out += [Candidate.of("AShape", sink_tokens=64, local_tokens=w) for w in (256, 512, 1024)]
        out += [Candidate.of("VerticalSlash", vertical=v, slash=s, last_q=64)
                for v, s in ((64, 256), (128, 512), (256, 1024))]
        out += [Candidate.of("HeadProxy", gamma=g, min_budget=b, head_scores=True, pooling="mean")
                for g in (0.8, 0.9, 0.95, 0.98) for b in (256, 512)]
    return out


@dataclass
class Profile:
    """What calibration measured: ``recall``, ``density`` and ``error`` (relative output error, None when
    values were not recorded) are ``[layers, candidates, heads]`` means over prompts."""

    model_id: str
    shape: ModelShape
    candidates: list[Candidate]
    recall: torch.Tensor
    density: torch.Tensor
    q_block_size: int = 64
    kv_block_size: int = 64
    info: dict = field(default_factory=dict)  # context lengths, prompts, rows, seconds
    error: torch.Tensor | None = None
    #: Decode measurements (None when not profiled): ``double_sparsity`` [(r, budget_fraction)] and ``kv_pruning``
    #: [sparsity] candidates; ``ds_recall``/``ds_error`` ``[layers, S, Hq]``, ``ds_read`` ``[layers, S]``,
    #: ``prune_error`` ``[layers, P, Hq]``; ``channels`` ``[layers, Hkv, D]`` heavy-channel ranking.
    decode: dict | None = None

    def save(self, path) -> None:
        """Keep the measurements, to plan again under other budgets without calibrating again."""
        torch.save({"model_id": self.model_id, "shape": asdict(self.shape),
                    "candidates": [(c.pattern, list(c.params)) for c in self.candidates],
                    "recall": self.recall, "density": self.density, "q_block_size": self.q_block_size,
                    "kv_block_size": self.kv_block_size, "info": self.info, "error": self.error,
                    "decode": self.decode}, path)

    @classmethod
    def load(cls, path) -> "Profile":
        try:
            data = torch.load(path, weights_only=True)
            candidates = [Candidate(name, tuple((k, v) for k, v in params)) for name, params in data["candidates"]]
            return cls(data["model_id"], ModelShape(**data["shape"]), candidates, data["recall"], data["density"],
                       data["q_block_size"], data["kv_block_size"], data["info"], data.get("error"),
                       data.get("decode"))
        except (OSError, RuntimeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: not a calibration profile ({error})") from None


# ---------------------------------------------------------------------------------------------------- profiling
def _sampled_rows(seq_len: int, q_block_size: int, query_rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows spread evenly before the last query block, and all rows of the last query block."""
    last_start = (seq_len - 1) // q_block_size * q_block_size
    spread = torch.linspace(0, max(last_start - 1, 0), max(1, query_rows), device=device).round().long().unique()
    spread = spread[spread < last_start]
    return spread, torch.arange(last_start, seq_len, device=device)


def _row_block_stats(q, k, v, rows, kv_block_size, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact causal attention of query rows ``rows`` split by KV block: mass ``[H, R, nk]`` (probabilities summed
    per block) and partial outputs ``[H, R, nk, D]`` (``sum_n P[r, n] v[n]`` per block), in fp32."""
    seq_len, num_heads, head_dim = q.shape
    nk = -(-seq_len // kv_block_size)
    pad = nk * kv_block_size - seq_len
    group = torch.arange(num_heads, device=q.device) // (num_heads // k.shape[1])
    keys = k.float().transpose(0, 1)[group]  # [H, L, D]
    values = torch.nn.functional.pad(v.float().transpose(0, 1)[group], (0, 0, 0, pad)).unflatten(1, (nk, kv_block_size))
    scores = torch.einsum("hrd,hnd->hrn", q[rows].float().transpose(0, 1), keys) * scale
    scores.masked_fill_(torch.arange(seq_len, device=q.device) > rows[:, None], float("-inf"))
    probs = torch.nn.functional.pad(torch.softmax(scores, -1), (0, pad)).unflatten(-1, (nk, kv_block_size))
    return probs.sum(-1), torch.einsum("hrjn,hjnd->hrjd", probs, values)


def candidate_keeps(q: torch.Tensor, k: torch.Tensor, candidates: Sequence[Candidate], *, scale: float | None = None,
                    q_block_size: int = 64, kv_block_size: int = 64, tails: bool = True) -> torch.Tensor:
    """The blocks each candidate keeps on one causal sequence (q ``[L, Hq, D]``, k ``[L, Hkv, D]``), clipped to
    the causally visible ones: bool ``[candidates, Hq, num_q_blocks, num_kv_blocks]``. ``tails=False``: HeadProxy
    candidates' own selection on the query blocks their dense tail reads in full (see :func:`profile_layer`)."""
    seq_len, num_heads, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else scale
    seq = SeqContext(seq_len, seq_len, num_heads, q_block_size, kv_block_size, True, q.device, q, k, scale)
    visible = seq.causal_keep()
    keeps = []
    proxy_estimates: dict = {}  # HeadProxy settings that differ only in their budget rule share one estimate
    for candidate in candidates:
        pattern = candidate.build()
        if isinstance(pattern, HeadProxy):
            key = pattern.estimate_key
            if key not in proxy_estimates:
                proxy_estimates[key] = pattern.estimate(seq, with_mass=True)
            proxy = pattern if tails else dataclasses.replace(pattern, dense_tail=0)
            keep = proxy.select(seq, *proxy_estimates[key])[0]
        else:
            keep = pattern.keep_blocks(seq)
        keeps.append((keep & visible).expand(num_heads, -1, -1))
    return torch.stack(keeps)


@torch.no_grad()
def profile_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    candidates: Sequence[Candidate],
    v: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    q_block_size: int = 64,
    kv_block_size: int = 64,
    query_rows: int = 1024,
) -> dict[str, torch.Tensor]:
    """``{"recall", "density", "error"}``, each ``[candidates, heads]``, of every candidate on one causal sequence.

    q ``[L, Hq, D]``, k and v ``[L, Hkv, D]`` are one layer's post-RoPE queries, keys and values; without v
    the output error is not measured (no "error" entry).
    """
    seq_len, num_heads, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else scale
    # HeadProxy candidates are measured without their dense tail. The tail makes every candidate exact on the last
    # query block, half of the objective, and those rows are where a head that retrieves from far back shows it: with
    # the tail in the measurement, SmolLM2 plans lost that signal and ran with about twice the next-token KL
    # divergence from dense attention on retrieval prompts. Nor does the density count the tail's rows (a fixed 128,
    # the question's): charged to the budget they made sink + window spans look cheaper, and a plan solved that way
    # gave 104 of 270 heads to them and ran with six times the divergence. So a plan reads a little more than the
    # density it was solved for (the shipped SmolLM2 plan: 30% solved, 33-34% read at 6-8k tokens).
    keeps = candidate_keeps(q, k, candidates, scale=scale, q_block_size=q_block_size, kv_block_size=kv_block_size,
                            tails=False)
    spread, last = _sampled_rows(seq_len, q_block_size, query_rows, q.device)
    rows = torch.cat([spread, last])
    recall, error = (torch.empty(len(candidates), num_heads, len(rows), device=q.device) for _ in range(2))
    nk = keeps.shape[-1]
    chunk = max(1, (1 << 24) // (num_heads * nk * max(head_dim, kv_block_size)))  # [H, rows, nk, D] within 64 MiB
    for start in range(0, len(rows), chunk):
        r = rows[start:start + chunk]
        part = slice(start, start + len(r))
        mass, block_out = _row_block_stats(q, k, k if v is None else v, r, kv_block_size, scale)
        full_out = block_out.sum(2)  # [H, R, D]: the exact attention output of each row
        row_keep = keeps[:, :, r // q_block_size].float().permute(1, 2, 0, 3)  # [H, R, C, nk]
        kept = (row_keep @ mass[..., None])[..., 0]  # [H, R, C]
        # Reading only the kept blocks renormalises the softmax over them: o_kept = sum_kept P v / sum_kept P. All
        # candidates at once: one batched product per (head, row).
        kept_out = (row_keep @ block_out) / kept.clamp(min=1e-30)[..., None]  # [H, R, C, D]
        recall[:, :, part] = kept.permute(2, 0, 1)
        error[:, :, part] = ((kept_out - full_out[:, :, None]).norm(dim=-1)
                             / full_out.norm(dim=-1).clamp(min=1e-30)[..., None]).permute(2, 0, 1)

    def row_mean(per_row: torch.Tensor) -> torch.Tensor:  # [C, H, R] -> [C, H], the two row groups weighted alike
        parts = [per_row[..., : len(spread)].mean(-1)] if len(spread) else []
        return torch.stack(parts + [per_row[..., len(spread):].mean(-1)]).mean(0).cpu()

    area = SeqContext(seq_len, seq_len, num_heads, q_block_size, kv_block_size, True, q.device).causal_keep().sum()
    result = {"recall": row_mean(recall), "density": (keeps.sum((2, 3)) / area).cpu()}
    if v is not None:
        result["error"] = row_mean(error)
    return result


# ---------------------------------------------------------------------------------------------------- recording
_layer_callback: Callable | None = None


def _recording_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: report (layer, q, k, v, scale) to the running recorder, return SDPA's result."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _layer_callback is not None:
        _layer_callback(module.layer_idx, query, key, value, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@contextlib.contextmanager
def recording_qk(model, on_layer: Callable[..., None]):
    """Within the block, every attention layer of ``model`` calls ``on_layer(layer_idx, q [B, Hq, S, D],
    k [B, Hkv, S, D], v [B, Hkv, S, D], scale)`` with its post-RoPE q and k, then computes SDPA as usual."""
    global _layer_callback
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CALIBRATE_IMPLEMENTATION, _recording_attention)
    AttentionMaskInterface.register(CALIBRATE_IMPLEMENTATION, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CALIBRATE_IMPLEMENTATION)
    if model.config._attn_implementation != CALIBRATE_IMPLEMENTATION:
        raise ValueError(f"model: {type(model).__name__} does not accept a custom attention function "
                         "(it must use transformers' AttentionInterface)")
    _layer_callback = on_layer
    try:
        yield
    finally:
        _layer_callback = None
        model.set_attn_implementation(previous)


def _model_id(model) -> str:
    name = getattr(model.config, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    return Path(name).name if name else type(model).__name__


@torch.no_grad()
def calibrate(
    model,
    prompts: Iterable[torch.Tensor],
    candidates: Sequence[Candidate] | None = None,
    *,
    model_id: str | None = None,
    q_block_size: int = 64,
    kv_block_size: int = 64,
    query_rows: int = 1024,
    decode: DecodeCandidates | None = DecodeCandidates(),
    progress: bool = True,
) -> Profile:
    """Profile every (layer, head) of ``model`` on ``prompts`` (1-D token id tensors, one sequence each).

    The prefill candidates default to :func:`default_candidates` (without the adaptive ones). ``query_rows``
    rows spread over each prompt (and its last query block) are measured per layer. ``decode`` also profiles
    Double Sparsity and KV pruning settings (:mod:`sparse_attn.planner.decode`; None: skip), with heavy channels
    ranked on the first prompt, so later prompts measure them out of sample.
    """
    prompts = [p.reshape(-1) for p in prompts]
    if not prompts or any(p.numel() == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token id tensors")
    shape = ModelShape.from_model(model)
    candidates = list(candidates) if candidates is not None else default_candidates()
    sums: dict[str, torch.Tensor] = {}
    seen = torch.zeros(shape.num_layers)
    channels: dict[int, torch.Tensor] = {}
    decode_sums: dict[str, torch.Tensor] = {}
    bar = _progress(total=shape.num_layers * len(prompts), enabled=progress, desc="calibrating", unit="layer")

    def on_layer(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> None:
        q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # [L, H, D]
        measured = profile_layer(q, k, candidates, v, scale=scale, q_block_size=q_block_size,
                                 kv_block_size=kv_block_size, query_rows=query_rows)
        for name, value in measured.items():
            sums.setdefault(name, torch.zeros(shape.num_layers, *value.shape))[layer] += value
        if decode is not None:
            if layer not in channels:
                channels[layer] = heavy_channel_ranking(q, k).cpu()
            # Decode-like queries: every other row of the last query block, each over its whole prefix.
            rows = torch.arange((q.shape[0] - 1) // q_block_size * q_block_size, q.shape[0], 2, device=q.device)
            for name, value in profile_decode(q, k, v, rows, channels[layer], decode,
                                              scale if scale is not None else q.shape[-1] ** -0.5).items():
                decode_sums.setdefault(name, torch.zeros(shape.num_layers, *value.shape))[layer] += value
        seen[layer] += 1
        bar.update(1)

    start = time.perf_counter()
    device = next(model.parameters()).device
    with recording_qk(model, on_layer):
        for ids in prompts:
            model(ids[None].to(device), use_cache=False)
    bar.close()
    if bool((seen == 0).any()):
        raise ValueError(f"model: layers {torch.nonzero(seen == 0).flatten().tolist()} never reported q/k; "
                         "is every attention layer dispatched through AttentionInterface?")
    mean = {name: total / seen[:, None, None] for name, total in sums.items()}
    decode_profile = None
    if decode is not None:
        decode_profile = {name: total / seen.view(-1, *[1] * (total.dim() - 1)) for name, total in decode_sums.items()}
        decode_profile.update(channels=torch.stack([channels[i] for i in range(shape.num_layers)]),
                              double_sparsity=[list(c) for c in decode.double_sparsity],
                              kv_pruning=list(decode.kv_pruning))
    return Profile(
        model_id or _model_id(model), shape, candidates, mean["recall"], mean["density"], q_block_size, kv_block_size,
        info={"context_lens": sorted({p.numel() for p in prompts}), "prompts": len(prompts),
              "query_rows": query_rows, "seconds": round(time.perf_counter() - start, 1)},
        error=mean.get("error"), decode=decode_profile,
    )


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, **kwargs):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, **kwargs)
        except ImportError:
            pass
    return _NoBar()


# ---------------------------------------------------------------------------------------------------- prompts
def default_calibration_texts() -> list[str]:
    """Long English texts found on any machine with the package: the licence texts of the installed Python
    distributions (and the system's common licences where present), longest first."""
    import importlib.metadata

    texts = {}
    common = Path("/usr/share/common-licenses")
    if common.is_dir():
        for path in sorted(common.iterdir()):
            if path.is_file() and not path.is_symlink():
                texts[path.read_text(errors="ignore")] = None
    for dist in importlib.metadata.distributions():
        for file in dist.files or []:
            if Path(str(file)).name.upper().startswith(("LICENSE", "COPYING")):
                try:
                    texts[Path(dist.locate_file(file)).read_text(errors="ignore")] = None
                except OSError:
                    continue
    return sorted((t for t in texts if len(t) > 2000), key=len, reverse=True)


def calibration_prompts(tokenizer, texts: Sequence[str], context_len: int, num_prompts: int) -> list[torch.Tensor]:
    """``num_prompts`` token sequences of ``context_len`` tokens: prompt i starts at the start of text
    ``i % len(texts)`` and runs on into the following texts (cycling) when that one is shorter."""
    if context_len < 1 or num_prompts < 1:
        raise ValueError(f"context_len and num_prompts must be >= 1, got {context_len}, {num_prompts}")
    pieces = [tokenizer(t + "\n\n", return_tensors="pt")["input_ids"][0] for t in texts]
    if not pieces or sum(p.numel() for p in pieces) == 0:
        raise ValueError("texts: no calibration text (empty after tokenizing)")
    prompts = []
    for i in range(num_prompts):
        order = pieces[i % len(pieces):] + pieces[: i % len(pieces)]
        ids = torch.cat(order)
        prompts.append(ids.repeat(-(-context_len // ids.numel()))[:context_len].clone())
    return prompts
