"""End to end in transformers with the embedded real model (SmolLM2-135M-Instruct, real weights): prefill time of one
forward and time per generated token, ``attn_implementation="sparse"`` configurations against ``"sdpa"``, each with
the time spent inside attention and whether the passkey answer is kept.

    python -m bench.e2e_hf_smollm2 --out DIR [--contexts 6144,8192] [--decode-context 6000] [--decode-tokens 32]
                                   [--configs sdpa,dense,plan,default,no_plan] [--decode-configs sdpa,dense,ds,kvp50,plan]
                                   [--reps 3] [--table NAME] [--quick]

writes ``DIR/e2e_hf_smollm2.json`` and ``.md``. Every configuration runs on the same model object and the same prompts
(passkey prompts, the key at half depth), interleaved repetition by repetition so that drift of a shared machine
falls on all of them alike; times are medians over the repetitions, ratios the medians over the repetitions of
SDPA's time / the row's in the same repetition.

Configurations (``sparse_attn.configure`` on the loaded model):
``sdpa`` transformers' own attention (the baseline); ``dense`` the ``Dense()`` pattern through the sparse path; ``plan``
the shipped SmolLM2 plan (per-head prefill patterns, its decode entries); ``default`` no option (the shipped plan,
chosen automatically because it matches the model); ``no_plan`` ``auto_plan=False`` (the content-aware default a
model without a shipped plan gets); when named, ``dense_skip`` and ``plan_skip``: ``dense`` and ``plan`` with softmax
thresholding in the kernel (``skip_mass`` :data:`SKIP_MASS`); for decode also ``ds`` (dense prefill, Double Sparsity decode with r = 16 channels calibrated on the
machine's licence texts and 1/8 of the context), ``ds_r32i8`` (the same with r = 32 channels stored as int8 labels:
the label bytes of r = 16 in fp16) and ``kvp50`` (dense prefill, KV pruning at 50%).

KV caches: each decode row runs on the cache ``model.generate`` makes for it: transformers' ``DynamicCache`` for
``sdpa`` (a ``torch.cat`` of every layer's whole cache per token), :class:`sparse_attn.InPlaceCache` once
``sparse_attn.configure`` ran (appends in place). ``sdpa_in_place`` is SDPA on the in-place cache: the share of a
sparse row's decode speedup that is the cache's, not its attention's.

Per prefill row: forward time (``use_cache=False``, ``logits_to_keep=1``), the time inside the attention function
summed over the 30 layers, and within it the mask building (estimation and selection; the rest is the kernel), and
the mean prefill density. Per decode row: the median time of one decode step (one token through the model with its
cache) after the prompt, and the fraction of the context the sparse steps read.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import common

NAME = "e2e_hf_smollm2"
PREFILL_CONFIGS = ("sdpa", "dense", "plan", "default", "no_plan")
#: Prefill configurations run only when named: ``dense`` and ``plan`` with softmax thresholding in the kernel.
SKIP_CONFIGS = ("dense_skip", "plan_skip")
#: ``skip_mass`` of the ``*_skip`` rows: key tiles whose scores all lie ln(2 kv_len) below their rows' running maxima
#: are skipped (at most half a row's mass in the worst case, in practice far less; 8k tokens: 9.7 nats).
SKIP_MASS = 0.5
DECODE_CONFIGS = ("sdpa", "sdpa_in_place", "dense", "ds", "ds_r32i8", "kvp50", "plan")
KEY = 52817


@dataclass
class Settings:
    contexts: list[int] = field(default_factory=lambda: [6144, 8192])
    decode_context: int = 6000
    decode_tokens: int = 32
    configs: list[str] = field(default_factory=lambda: list(PREFILL_CONFIGS))
    decode_configs: list[str] = field(default_factory=lambda: list(DECODE_CONFIGS))
    reps: int = 3
    threads: int | None = None
    table: str | None = None  # the README table this result fills (default: the benchmark's name)

    def __post_init__(self):
        for name, chosen, known in (("configs", self.configs, PREFILL_CONFIGS + SKIP_CONFIGS),
                                    ("decode_configs", self.decode_configs, DECODE_CONFIGS)):
            unknown = sorted(set(chosen) - set(known))
            if unknown:
                raise ValueError(f"{name}: unknown {unknown}; known: {list(known)}")
            if chosen and "sdpa" not in chosen:
                raise ValueError(f"{name} must include sdpa (the baseline of every ratio)")


class AttentionClock:
    """Seconds spent inside the attention functions transformers calls (``sdpa`` and ``sparse``) and inside the
    sparse module's mask building, summed over layers."""

    def __init__(self):
        self.attention = 0.0
        self.masks = 0.0

    def reset(self) -> None:
        self.attention = self.masks = 0.0

    @contextmanager
    def installed(self):
        from transformers import AttentionInterface

        from sparse_attn.integrations import transformers as integration
        from sparse_attn.modules import SparseAttention

        mapping = AttentionInterface._global_mapping
        saved = {name: mapping.get(name) for name in ("sdpa", "sparse")}
        saved_mask = SparseAttention._mask

        def timed(fn, slot):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    setattr(self, slot, getattr(self, slot) + time.perf_counter() - start)
            return wrapper

        integration.register()
        for name in saved:
            mapping[name] = timed(mapping[name], "attention")
        SparseAttention._mask = timed(saved_mask, "masks")
        try:
            yield self
        finally:
            for name, fn in saved.items():
                mapping[name] = fn
            SparseAttention._mask = saved_mask


def configure(model, name: str, channels) -> None:
    """Switch the model to configuration ``name`` (see the module docstring)."""
    import sparse_attn
    from sparse_attn.decode import DoubleSparsity, DoubleSparsityConfig, KVPruning, KVPruningConfig
    from sparse_attn.planner import SMOLLM2_PLAN

    if name in ("sdpa", "sdpa_in_place"):
        model.set_attn_implementation("sdpa")
    elif name == "dense":
        sparse_attn.configure(model, sparse_attn.Dense())
    elif name == "plan":
        sparse_attn.configure(model, plan=SMOLLM2_PLAN)
    elif name == "default":
        sparse_attn.configure(model)
    elif name == "no_plan":
        sparse_attn.configure(model, auto_plan=False)
    elif name == "dense_skip":
        sparse_attn.configure(model, sparse_attn.Dense(), skip_mass=SKIP_MASS)
    elif name == "plan_skip":
        sparse_attn.configure(model, plan=SMOLLM2_PLAN, skip_mass=SKIP_MASS)
    elif name == "ds":
        config = DoubleSparsityConfig(r=16, budget_fraction=1 / 8, min_budget=256, dense_below=0)
        sparse_attn.configure(model, sparse_attn.Dense(), decode=DoubleSparsity(config, channels[16]))
    elif name == "ds_r32i8":
        config = DoubleSparsityConfig(r=32, label_bits=8, budget_fraction=1 / 8, min_budget=256, dense_below=0)
        sparse_attn.configure(model, sparse_attn.Dense(), decode=DoubleSparsity(config, channels[32]))
    elif name == "kvp50":
        sparse_attn.configure(model, sparse_attn.Dense(), decode=KVPruning(KVPruningConfig(sparsity=0.5)))
    else:
        raise ValueError(f"unknown configuration {name!r}")


def mean_density(model) -> float | None:
    from sparse_attn.integrations.transformers import attention_modules

    values = [m.sparse_attention.last_density for m in attention_modules(model).values()
              if getattr(m, "sparse_attention", None) is not None]
    return sum(values) / len(values) if values else None


def reset_state(model) -> None:
    from sparse_attn.integrations.transformers import reset_decode_state

    reset_decode_state(model)


def new_cache(model, name: str):
    """The KV cache ``model.generate`` makes for configuration ``name``: transformers' ``DynamicCache`` for SDPA,
    :class:`sparse_attn.InPlaceCache` once ``sparse_attn.configure`` ran (and for ``sdpa_in_place``, SDPA over the same
    cache, which shows how much of a decode speedup is the cache's)."""
    import sparse_attn
    from transformers import DynamicCache

    return DynamicCache() if name == "sdpa" else sparse_attn.InPlaceCache(model.config)


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, steps: int, cache):
    """Prefill ``ids`` into ``cache``, then ``steps`` greedy decode steps: (new token ids, per-step seconds, the
    density the last step read)."""
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens, seconds = [int(token)], []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        seconds.append(time.perf_counter() - start)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    return tokens, seconds, mean_density(model)


def run(settings: Settings, out_dir: Path | str | None = None, command: str | None = None) -> dict:
    from sparse_attn.integrations.transformers import calibrate_double_sparsity
    from sparse_attn.models.smollm2 import load_smollm2, make_passkey_prompt
    from sparse_attn.ops.extension import estimate_products

    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = torch.device("cpu")
    payload = {"benchmark": NAME, **common.environment(device, command), "settings": asdict(settings), "status": "ok"}
    if settings.table:
        payload["table"] = settings.table
    model, tokenizer = load_smollm2("sdpa")
    payload["estimate_products"] = estimate_products(model.config.head_dim)
    channels = {r: calibrate_double_sparsity(model, tokenizer, r=r) for r, name in ((16, "ds"), (32, "ds_r32i8"))
                if name in settings.decode_configs}  # heavy channels per label width
    clock = AttentionClock()

    prompts = {}
    for n in sorted(set(settings.contexts) | ({settings.decode_context} if settings.decode_configs else set())):
        ids = tokenizer(make_passkey_prompt(tokenizer, n, 0.5, KEY), return_tensors="pt")["input_ids"]
        prompts[n] = ids

    def answer(tokens) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)

    prefill: dict[tuple[int, str], dict] = {}
    decode: dict[str, dict] = {}
    with clock.installed():
        # Answers first (untimed): what each configuration says after each prompt, and a warm-up of every path.
        for n in settings.contexts:
            for name in settings.configs:
                configure(model, name, channels)
                reset_state(model)
                tokens, _, _ = greedy(model, prompts[n], 8, new_cache(model, name))
                prefill[(n, name)] = dict(context=n, tokens=int(prompts[n].shape[1]), config=name, answer=answer(tokens),
                                          found=str(KEY) in answer(tokens), samples=[])
        for _ in common.progress(range(settings.reps), desc="e2e-hf-smollm2 prefill", unit="rep"):
            for n in settings.contexts:
                for name in settings.configs:
                    configure(model, name, channels)
                    clock.reset()
                    start = time.perf_counter()
                    with torch.inference_mode():
                        model(prompts[n], use_cache=False, logits_to_keep=1)
                    total = time.perf_counter() - start
                    prefill[(n, name)]["samples"].append(dict(total=total, attention=clock.attention,
                                                              masks=clock.masks))
                    prefill[(n, name)]["density"] = mean_density(model) if name != "sdpa" else 1.0
        if settings.decode_configs:
            ids = prompts[settings.decode_context]
            for _ in common.progress(range(max(1, settings.reps - 1)), desc="e2e-hf-smollm2 decode", unit="rep"):
                for name in settings.decode_configs:
                    configure(model, name, channels)
                    reset_state(model)
                    tokens, seconds, density = greedy(model, ids, settings.decode_tokens, new_cache(model, name))
                    row = decode.setdefault(name, dict(config=name, context=int(ids.shape[1]), answer=answer(tokens[:8]),
                                                       found=str(KEY) in answer(tokens[:8]), step_ms=[]))
                    row["step_ms"].extend(s * 1e3 for s in seconds)
                    row["decode_density"] = density if not name.startswith("sdpa") else 1.0
    reset_state(model)

    rows = []
    for (n, name), row in prefill.items():
        med = {k: statistics.median(s[k] for s in row["samples"]) * 1e3 for k in ("total", "attention", "masks")}
        rows.append({**{k: v for k, v in row.items() if k != "samples"}, "forward_ms": med["total"],
                     "attention_ms": med["attention"], "masks_ms": med["masks"],
                     "kernel_ms": med["attention"] - med["masks"], "rest_ms": med["total"] - med["attention"],
                     "samples": row["samples"]})
    prefill_ratios(rows)
    payload["paired_ratios"] = True  # prefill ratios per repetition (results before it: ratios of the medians)
    decode_rows = []
    for name, row in decode.items():
        decode_rows.append({**{k: v for k, v in row.items() if k != "step_ms"},
                            "ms_per_token": statistics.median(row["step_ms"]), "steps": len(row["step_ms"])})
    base_tok = next((r["ms_per_token"] for r in decode_rows if r["config"] == "sdpa"), None)
    for r in decode_rows:
        r["speedup_vs_sdpa"] = base_tok / r["ms_per_token"] if base_tok else None
    payload["prefill"], payload["decode"] = rows, decode_rows
    payload["torch_threads"] = torch.get_num_threads()
    if out_dir is not None:
        common.write_outputs(out_dir, NAME, payload, markdown(payload))
    return payload


def prefill_ratios(rows: list[dict]) -> None:
    """Per prefill row: SDPA's time / the row's, forward and attention, the median over the repetitions of the two
    times of the same repetition (the configurations of a repetition run one after another, so the load of a
    shared machine at that moment falls on both), and whether it keeps SDPA's answer."""
    base = {r["context"]: r for r in rows if r["config"] == "sdpa"}

    def ratio(r: dict, key: str) -> float | None:
        b = base.get(r["context"])
        return statistics.median(x[key] / y[key] for x, y in zip(b["samples"], r["samples"])) if b else None

    for r in rows:
        r["speedup_vs_sdpa"] = ratio(r, "total")
        r["attention_speedup_vs_sdpa"] = ratio(r, "attention")
        b = base.get(r["context"])
        r["keeps_dense_answer"] = r["found"] or not (b and b["found"])


def markdown(payload: dict) -> str:
    title = "### End to end in transformers on SmolLM2-135M (real weights): prefill and decode, sparse vs SDPA"
    if payload.get("status") == "skipped":
        return common.skipped_markdown(title, payload)
    s = payload["settings"]
    lines = [title, "", common.environment_line(payload), "",
             f"fp32, batch 1, {payload.get('torch_threads')} threads; passkey prompts (key at half depth); medians of "
             f"{s['reps']} interleaved repetitions; ratios = SDPA's time / this time"
             + (" in the same repetition, median over the repetitions" if payload.get("paired_ratios")
                else ", same run")
             + ". Attention = time "
             "inside the attention function over the 30 layers; masks = estimation and selection within it"
             + (f" (head-proxy scores from {payload['estimate_products']} products)"
                if payload.get("estimate_products") else "") + ".", ""]
    table = []
    for r in payload["prefill"]:
        density = "" if r["config"] == "sdpa" else common.pct(r.get("density"), 0)
        table.append([common.fmt(r["tokens"], 5), r["config"], f"{common.fmt(r['forward_ms'] / 1e3)} s",
                      f"{r['speedup_vs_sdpa']:.2f}x" if r.get("speedup_vs_sdpa") else "",
                      f"{common.fmt(r['attention_ms'] / 1e3)} s", f"{common.fmt(r['masks_ms'] / 1e3)} s",
                      f"{common.fmt(r['kernel_ms'] / 1e3)} s", f"{common.fmt(r['rest_ms'] / 1e3)} s", density,
                      "yes" if r["found"] else f"no (`{r['answer'][:24]}`)"])
    lines.append(common.markdown_table(["prompt tokens", "config", "forward", "vs sdpa", "attention", "masks",
                                        "kernels", "rest of the model", "prefill density", "key found"], table))
    if payload.get("decode"):
        lines += ["", f"Decode: time per generated token after a {payload['decode'][0]['context']}-token prompt "
                      f"(median over {s['decode_tokens']} steps per repetition). KV cache: transformers' DynamicCache "
                      "for sdpa (its default); sparse_attn.InPlaceCache, which `generate` uses once "
                      "`sparse_attn.configure` ran, for the others; sdpa_in_place is SDPA on that cache.", ""]
        table = [[r["config"], f"{common.fmt(r['ms_per_token'])} ms",
                  f"{r['speedup_vs_sdpa']:.2f}x" if r.get("speedup_vs_sdpa") else "",
                  common.pct(r.get("decode_density"), 1), "yes" if r["found"] else f"no (`{r['answer'][:24]}`)"]
                 for r in payload["decode"]]
        lines.append(common.markdown_table(["config", "time per token", "vs sdpa", "context read per step",
                                            "key found"], table))
    return "\n".join(lines)


def settings_from_args(argv: list[str] | None = None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e_hf_smollm2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--contexts", default="6144,8192")
    parser.add_argument("--decode-context", type=int, default=6000)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--configs", default=",".join(PREFILL_CONFIGS))
    parser.add_argument("--decode-configs", default=",".join(DECODE_CONFIGS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--table", help="name of the README table the result fills (results of another machine)")
    parser.add_argument("--quick", action="store_true", help="1.5k/1k tokens, 4 decode steps, one repetition")
    args = parser.parse_args(argv)
    if args.quick:
        args.contexts, args.decode_context, args.decode_tokens, args.reps = "1536", 1024, 4, 1
    settings = Settings(contexts=common.parse_list(args.contexts), decode_context=args.decode_context,
                        decode_tokens=args.decode_tokens, configs=[c for c in args.configs.split(",") if c],
                        decode_configs=[c for c in args.decode_configs.split(",") if c], reps=args.reps,
                        threads=args.threads, table=args.table)
    return settings, args.out


def main(argv: list[str] | None = None) -> int:
    return common.benchmark_main(__import__(__name__, fromlist=["NAME"]), argv)


if __name__ == "__main__":
    raise SystemExit(main())
