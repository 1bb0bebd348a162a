"""End-to-end prefill (time to first token) in Hugging Face transformers: ``attn_implementation="sparse"`` with
sparse patterns against ``"sdpa"``, on a randomly initialised model with Llama-3-8B's attention shape.

    python -m bench.e2e_hf --out DIR [--contexts 8192,32768,65536,131072] [--layers 4]
                           [--methods dense,dense_kernel,head_proxy,vertical_slash,a_shape] [--device cuda|cpu]
                           [--quick] [--time-budget SECONDS]

writes ``DIR/e2e_hf.json`` and ``DIR/e2e_hf.md``. GPU only by default: without a GPU the result file records the
skip and its reason; ``--device cpu`` runs a tiny model (2 layers, hidden 64) at 256/512 tokens that only shows the
harness works.

The model is ``LlamaForCausalLM`` with 8B's attention and MLP shape (hidden 4096, 32 query / 8 KV heads, head_dim 128,
MLP 14336, vocabulary 128256), bf16, random weights, and fewer layers (``--layers``, default 4) so a 128k prefill
fits the suite's minutes: the layers are identical, so the ratio of per-layer times (what the speedup is) does not
depend on their number, and ``logits_to_keep=1`` keeps the output head out of the way. TTFT = one prefill forward
(with its KV cache) producing the first token's logits, timed with CUDA events. Per method the row records the mean
prefill density over the layers, the largest difference of the first token's logits from SDPA's, and, for
head-proxy, the estimation time of one forward (summed over layers).

Random weights give near-uniform attention: content-aware budgets (head-proxy's cumulative mass) then keep most
blocks, so their densities here are an upper bound of what trained models get (the accuracy benchmark measures real
SmolLM2 densities); static patterns (A-shape) and fixed budgets (vertical-slash) keep the same blocks as on a real model.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import sparse_attn
from sparse_attn import HeadProxy
from sparse_attn.integrations.transformers import attention_modules
from sparse_attn.planner.calibrate import Candidate

from . import common, methods, prefill

NAME = "e2e_hf"

LLAMA_8B = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256)
GPU_DEFAULTS = dict(contexts=[8192, 32768, 65536, 131072], layers=4, dtype="bf16", block=128, **LLAMA_8B)
CPU_DEFAULTS = dict(contexts=[256, 512], layers=2, dtype="fp32", block=32, hidden=64, heads=4, kv_heads=2, head_dim=16,
                    intermediate=128, vocab=256)
DEFAULT_METHODS = ("dense", "dense_kernel", "head_proxy", "vertical_slash", "a_shape")
#: The harness's methods scaled to the tiny CPU model (the real budgets would keep every block of 512 tokens).
TINY_METHODS = {
    "head_proxy": Candidate.of("HeadProxy", gamma=0.95, q_stride=4, min_budget=64),
    "vertical_slash": Candidate.of("VerticalSlash", vertical=32, slash=64, last_q=16),
    "a_shape": Candidate.of("AShape", sink_tokens=32, local_tokens=64),
}
GPU_ONLY = ("GPU only: an 8B-shaped model's prefill at 8k-128k is a GPU measurement; "
            "`--device cpu` runs a tiny model to check the harness")


@dataclass
class Settings:
    contexts: list[int]
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype: str
    block: int
    device: str
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    tiny: bool = False
    quick: bool = False
    seed: int = 0
    time_budget_s: float | None = None
    timing: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if "dense" not in self.methods:
            raise ValueError("methods must include dense (the baseline of every ratio)")
        methods.resolve(self.methods)
        common.parse_dtype(self.dtype)
        if not self.timing:  # no warmup calls: each cell's untimed first call (density, next token) is one
            if self.quick:
                self.timing = dict(warmup=0, min_iters=2, max_iters=2, target_s=0.05)
            elif self.device == "cpu":
                self.timing = dict(warmup=0, min_iters=2, max_iters=5, target_s=0.3)
            else:
                self.timing = dict(warmup=0, min_iters=2, max_iters=5, target_s=1.0)

    def candidates(self) -> dict[str, Candidate]:
        chosen = methods.resolve(self.methods)
        return {n: TINY_METHODS.get(n, c) if self.tiny else c for n, c in chosen.items()}


def build_model(s: Settings):
    """``LlamaForCausalLM`` with random weights in ``s.dtype`` on ``s.device`` (initialised there, in that dtype)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                         num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
                         vocab_size=s.vocab, max_position_embeddings=max(s.contexts), rope_theta=500000.0,
                         tie_word_embeddings=False)
    torch.manual_seed(s.seed)
    with torch.device(s.device):
        model = AutoModelForCausalLM.from_config(config, dtype=common.parse_dtype(s.dtype),
                                                 attn_implementation="sdpa")
    return model.eval()


def use_method(model, name: str, candidate: Candidate, block: int) -> object | None:
    """Switch the model to a method; returns the pattern (None for transformers' SDPA)."""
    if name == "dense":
        model.set_attn_implementation("sdpa")
        return None
    pattern = candidate.build()
    # dense_below=0: every context runs the pattern (the integration's default runs dense below 1024 keys).
    sparse_attn.configure(model, pattern, q_block_size=block, kv_block_size=block, dense_below=0)
    return pattern


def mean_density(model) -> float:
    values = [m.sparse_attention.last_density for m in attention_modules(model).values()]
    return sum(values) / len(values)


class E2EHFRun:
    def __init__(self, settings: Settings):
        self.s = settings
        self.device = torch.device(settings.device)
        self.deadline = None if settings.time_budget_s is None else time.monotonic() + settings.time_budget_s
        self.results: list[dict] = []

    @torch.inference_mode()
    def warmup(self, model, candidates: dict[str, Candidate]) -> None:
        """One untimed forward per method at the shortest context: first-call costs (kernel compilation, lazy
        initialisation) stay out of the first cell."""
        ids = torch.zeros(1, min(self.s.contexts), dtype=torch.long, device=self.device)
        for name, candidate in candidates.items():
            use_method(model, name, candidate, self.s.block)
            try:
                model(ids, use_cache=True, logits_to_keep=1)
            except Exception:  # the timed cell records the error
                pass
        common.synchronize(self.device)

    def run(self) -> list[dict]:
        s = self.s
        model = build_model(s)
        candidates = s.candidates()
        generator = torch.Generator(device=self.device).manual_seed(s.seed)
        jobs = [(c, m) for c in s.contexts for m in candidates]
        dense_logits: dict[int, torch.Tensor] = {}
        prompts: dict[int, torch.Tensor] = {}
        self.warmup(model, candidates)
        for context, name in common.progress(jobs, desc="e2e-hf", unit="cell"):
            if context not in prompts:  # every method of a context reads the same prompt
                prompts.clear()
                prompts[context] = torch.randint(0, s.vocab, (1, context), generator=generator, device=self.device)
            ids = prompts[context]
            row = dict(context=context, method=name, pattern=candidates[name].label if name != "dense" else "sdpa")
            if self.deadline is not None and time.monotonic() > self.deadline:
                row.update(status="skipped", reason="time budget exhausted", ms=None)
                self.results.append(row)
                continue
            pattern = use_method(model, name, candidates[name], s.block)

            @torch.inference_mode()
            def prefill_call():
                return model(ids, use_cache=True, logits_to_keep=1).logits[0, -1]  # the first token's logits

            try:
                before = pattern.stats.get("total_seconds", 0.0) if isinstance(pattern, HeadProxy) else None
                logits = prefill_call().float()
                if before is not None:
                    row["estimation_ms"] = (pattern.stats["total_seconds"] - before) * 1e3
                row["density"] = 1.0 if pattern is None else mean_density(model)
                if name == "dense":
                    dense_logits[context] = logits
                elif context in dense_logits:
                    row["logits_max_abs_diff_vs_dense"] = float((logits - dense_logits[context]).abs().max())
                row.update(status="ok", **common.time_fn(prefill_call, self.device, **s.timing).as_dict())
            except Exception as exc:  # out of memory at the longest contexts is a result, not a crash
                row.update(status="skipped", reason=common.error_reason(exc), ms=None)
            common.release_memory(self.device)
            self.results.append(row)
        dense_ms = {r["context"]: r["ms"] for r in self.results if r["method"] == "dense" and r["ms"] is not None}
        for row in self.results:
            base = dense_ms.get(row["context"])
            row["dense_ms"] = base
            row["ttft_speedup_vs_dense"] = base / row["ms"] if base and row["ms"] else None
        del model
        common.release_memory(self.device)
        return self.results


def run(settings: Settings, out_dir: Path | str | None = None, command: str | None = None) -> dict:
    device = torch.device(settings.device)
    payload = {"benchmark": NAME, **common.environment(device, command), "settings": asdict(settings),
               "status": "ok"}
    payload["settings"]["patterns"] = {n: c.label for n, c in settings.candidates().items()}
    payload["results"] = E2EHFRun(settings).run()
    if out_dir is not None:
        common.write_outputs(out_dir, NAME, payload, markdown(payload))
    return payload


def skipped(reason: str, out_dir: Path | str | None = None, command: str | None = None) -> dict:
    payload = common.skipped_payload(NAME, torch.device("cpu"), reason, command)
    if out_dir is not None:
        common.write_outputs(out_dir, NAME, payload, markdown(payload))
    return payload


def markdown(payload: dict) -> str:
    title = "### End-to-end prefill (TTFT) in transformers: sparse patterns vs SDPA"
    if payload.get("status") == "skipped":
        return common.skipped_markdown(title, payload)
    s = payload["settings"]
    notes: list[str] = []
    lines = [title, "", common.environment_line(payload), "",
             f"Random-weight Llama, {s['layers']} layers, hidden {s['hidden']}, {s['heads']} query / {s['kv_heads']} "
             f"KV heads, head_dim {s['head_dim']}, MLP {s['intermediate']}, {s['dtype']}, batch 1, block {s['block']}. "
             "TTFT = one prefill forward with its KV cache (median); speedup = SDPA time / this time, same run. "
             "Random weights make attention flat: content-aware densities are upper bounds.", ""]
    contexts = sorted({r["context"] for r in payload["results"]})
    names = list(dict.fromkeys(r["method"] for r in payload["results"]))
    by = {(r["context"], r["method"]): r for r in payload["results"]}
    table = []
    for name in names:
        cells = []
        for c in contexts:
            r = by.get((c, name))
            if r is None or r.get("ms") is None:
                cells.append(prefill._ms(r, notes))
                continue
            extra = "" if name == "dense" else f", {prefill._ratio(r.get('ttft_speedup_vs_dense'))}, " \
                                               f"density {common.pct(r.get('density'), 0)}"
            cells.append(f"{common.fmt(r['ms'])} ms{extra}")
        table.append([name, f"`{s['patterns'].get(name, 'sdpa')}`" if name != "dense" else "SDPA"] + cells)
    lines.append(common.markdown_table(["method", "setting"] + [prefill._tokens(c) for c in contexts], table))
    if notes:
        lines += [""] + [f"[{i + 1}] {note}" for i, note in enumerate(notes)]
    return "\n".join(lines)


def settings_from_args(argv: list[str] | None = None) -> tuple[Settings | None, Path, str | None]:
    """``(settings, out, None)``, or ``(None, out, reason)`` when the benchmark cannot run here."""
    parser = argparse.ArgumentParser(prog="python -m bench.e2e_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else skipped")
    parser.add_argument("--contexts", help="comma-separated prompt lengths (default: by device)")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--dtype", choices=sorted(common.DTYPES))
    parser.add_argument("--block", type=int, choices=(16, 32, 64, 128))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, help="seconds; cells after it are recorded as skipped")
    args = parser.parse_args(argv)
    if args.device is None and not torch.cuda.is_available():
        return None, args.out, GPU_ONLY
    device = args.device or "cuda"
    defaults = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    settings = Settings(
        **common.options_or_defaults(args, defaults), device=device, methods=[m for m in args.methods.split(",") if m],
        tiny=device == "cpu", quick=args.quick, seed=args.seed, time_budget_s=args.time_budget,
    )
    return settings, args.out, None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings, out, reason = settings_from_args(argv)
    command = common.command_line("bench.e2e_hf", argv)
    payload = skipped(reason, out, command) if settings is None else run(settings, out, command)
    print(markdown(payload))
    print(f"\nwrote {out / (NAME + '.json')} and {out / (NAME + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
