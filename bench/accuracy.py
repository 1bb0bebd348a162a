"""Accuracy of the prefill methods on SmolLM2-135M (real weights), with the density each one ran at: passkey grid,
perplexity on long text and attention-mass recall; the decode methods through :mod:`bench.accuracy_decode`.

    python -m bench.accuracy --out DIR [--methods dense,head_proxy,vertical_slash,a_shape]
                             [--lengths 2048,4096] [--depths 0.5] [--ppl-len 4096] [--recall-len 4096]
                             [--decode-lengths 2048] [--decode-depths 0.5] [--decode-ppl-len 1024]
                             [--decode-ppl-decode 64] [--no-decode] [--device cpu|cuda]

writes ``DIR/accuracy.json``/``.md`` and (unless ``--no-decode``) ``DIR/accuracy_decode.json``/``.md``.

- **attention-mass recall**: one forward over ``--recall-len`` tokens of a licence text records every layer's
  post-RoPE q/k/v (:func:`sparse_attn.planner.calibrate.recording_qk`); for each method the calibration profiler
  (:func:`~sparse_attn.planner.calibrate.profile_layer`) builds the mask the method builds on those q/k and measures,
  on sampled query rows and the whole last query block, the fraction of each head's exact softmax mass inside the
  kept blocks (recall), the relative error of the attention output when only they are read, and the density
  (kept / causally visible blocks). Means over heads and layers, and the worst (layer, head).
- **passkey**: greedy retrieval of a 5-digit key hidden at each depth of prompts of each length
  (:func:`sparse_attn.models.make_passkey_prompt`), with the mean prefill density the method ran at;
- **perplexity**: one forward over ``--ppl-len`` tokens of the GPL-3 text (held out from calibration), each method
  in its prefill, with the density it ran at.

``dense`` is transformers' SDPA; the sparse methods run through ``attn_implementation="sparse"`` with
``dense_below=0`` (every length runs the pattern).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import sparse_attn
from sparse_attn.models import load_smollm2, make_passkey_prompt
from sparse_attn.models.smollm2 import passkey_answer
from sparse_attn.planner.calibrate import calibration_prompts, default_calibration_texts, profile_layer, recording_qk

from . import accuracy_decode, accuracy_plan, common, methods

NAME = "accuracy"

GPU_DEFAULTS = dict(lengths=[2048, 4096, 7168], depths=[0.25, 0.5, 0.75], ppl_len=4096, recall_len=4096,
                    decode_lengths=[2048, 4096, 7168], decode_depths=[0.25, 0.5], decode_ppl_len=2048,
                    decode_ppl_decode=256)
CPU_DEFAULTS = dict(lengths=[2048, 4096], depths=[0.5], ppl_len=4096, recall_len=4096, decode_lengths=[2048],
                    decode_depths=[0.5], decode_ppl_len=1024, decode_ppl_decode=64)


@dataclass
class Settings:
    lengths: list[int]
    depths: list[float]
    ppl_len: int
    recall_len: int
    decode_lengths: list[int]
    decode_depths: list[float]
    decode_ppl_len: int
    decode_ppl_decode: int
    device: str = "cpu"
    methods: list[str] = field(default_factory=lambda: list(methods.DEFAULT_METHODS))
    decode: bool = True
    query_rows: int = 256
    block: int = 64
    ppl_text: str | None = None

    def __post_init__(self):
        if "dense" not in self.methods:
            raise ValueError("methods must include dense (the baseline of every comparison)")
        methods.resolve(self.methods)
        if any(not 0 <= d <= 1 for d in self.depths + self.decode_depths):
            raise ValueError(f"depths must lie in [0, 1], got {self.depths} / {self.decode_depths}")
        for name in ("ppl_len", "recall_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 skips that part), got {getattr(self, name)}")


def use(model, name: str, candidate, block: int) -> None:
    if name == "dense":
        model.set_attn_implementation("sdpa")
    else:
        sparse_attn.configure(model, candidate.build(), q_block_size=block, kv_block_size=block, dense_below=0)


@torch.no_grad()
def recall(model, tokenizer, s: Settings, candidates: dict) -> dict:
    """Per method: recall / output error / density means over (layer, head), the worst head, and per-layer means."""
    ids = calibration_prompts(tokenizer, default_calibration_texts()[:1], s.recall_len, 1)[0]
    names = list(candidates)
    per_layer: dict[int, dict] = {}

    def on_layer(layer, q, k, v, scale):
        q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # [L, H, D]
        per_layer[layer] = profile_layer(q, k, [candidates[n] for n in names], v, scale=scale, q_block_size=s.block,
                                         kv_block_size=s.block, query_rows=s.query_rows)

    start = time.perf_counter()
    with recording_qk(model, on_layer):
        model(ids[None].to(next(model.parameters()).device), use_cache=False)
    layers = sorted(per_layer)
    stacked = {key: torch.stack([per_layer[i][key] for i in layers]) for key in ("recall", "error", "density")}
    out = {"tokens": int(ids.numel()), "text": "default_calibration_texts()[0]", "layers": len(layers),
           "seconds": time.perf_counter() - start, "methods": {}}
    for c, name in enumerate(names):
        rec, err, dens = (stacked[key][:, c] for key in ("recall", "error", "density"))  # [layers, heads]
        worst = int(rec.argmin())
        out["methods"][name] = dict(
            recall_mean=float(rec.mean()), recall_min=float(rec.min()),
            recall_min_at={"layer": layers[worst // rec.shape[1]], "head": worst % rec.shape[1]},
            output_error_mean=float(err.mean()), density_mean=float(dens.mean()),
            recall_per_layer=[round(float(x), 5) for x in rec.mean(1)],
            density_per_layer=[round(float(x), 5) for x in dens.mean(1)])
    return out


def passkey(model, tokenizer, s: Settings, candidates: dict) -> list[dict]:
    rows = []
    cases = [(n, d) for n in s.lengths for d in s.depths]
    for (n, depth), name in common.progress([(c, m) for c in cases for m in candidates], desc="passkey", unit="run"):
        key = accuracy_decode.passkey_key(n, depth)
        prompt = make_passkey_prompt(tokenizer, n, depth, key)
        use(model, name, candidates[name], s.block)
        start = time.perf_counter()
        if name == "dense":
            answer, density = passkey_answer(model, tokenizer, prompt), 1.0
        else:
            answer, density = accuracy_plan.generate_with_prefill_density(
                model, lambda: passkey_answer(model, tokenizer, prompt))
        rows.append(dict(method=name, target_tokens=n, tokens=len(tokenizer(prompt)["input_ids"]), depth=depth, key=key,
                         answer=answer.strip(), retrieved=str(key) in answer, prefill_density=density,
                         seconds=time.perf_counter() - start))
    return rows


def perplexities(model, tokenizer, s: Settings, candidates: dict) -> dict:
    ids = accuracy_decode.perplexity_ids(tokenizer, s.ppl_text, s.ppl_len).to(next(model.parameters()).device)
    out = {}
    for name in common.progress(list(candidates), desc="perplexity", unit="method"):
        use(model, name, candidates[name], s.block)
        start = time.perf_counter()
        ppl = accuracy_plan.perplexity(model, ids)
        out[name] = dict(perplexity=ppl, density=1.0 if name == "dense" else accuracy_plan.prefill_density(model),
                         seconds=time.perf_counter() - start)
    dense = out["dense"]["perplexity"]
    for entry in out.values():
        entry["change"] = entry["perplexity"] / dense - 1
    return out


def summarize(payload: dict) -> dict:
    """Per method, accuracy beside density: passkey success rate and whether every dense success is kept, the
    perplexity change, the recall, and their densities."""
    out = {}
    dense_ok = {(p["target_tokens"], p["depth"]) for p in payload["passkey"] if p["method"] == "dense" and p["retrieved"]}
    for name in payload["settings"]["methods"]:
        runs = [p for p in payload["passkey"] if p["method"] == name]
        ppl = payload["perplexity"].get(name, {})
        rec = payload["recall"]["methods"].get(name, {}) if payload.get("recall") else {}
        out[name] = dict(
            passkey_success=sum(p["retrieved"] for p in runs) / len(runs) if runs else None,
            passkey_kept_dense=all(p["retrieved"] for p in runs if (p["target_tokens"], p["depth"]) in dense_ok)
            if runs else None,
            passkey_density=sum(p["prefill_density"] for p in runs) / len(runs) if runs else None,
            perplexity_change=ppl.get("change"), perplexity_density=ppl.get("density"),
            recall=rec.get("recall_mean"), recall_density=rec.get("density_mean"),
        )
    return out


def run(settings: Settings, out_dir: Path | str | None = None, command: str | None = None, model=None,
        tokenizer=None) -> dict:
    device = torch.device(settings.device)
    if model is None:
        model, tokenizer = load_smollm2()
    model.to(device)
    candidates = methods.resolve(settings.methods)
    payload = {"benchmark": NAME, **common.environment(device, command), "settings": asdict(settings),
               "model": "SmolLM2-135M-Instruct"}
    payload["settings"]["patterns"] = {n: ("sdpa" if n == "dense" else c.label) for n, c in candidates.items()}
    payload["recall"] = recall(model, tokenizer, settings, candidates) if settings.recall_len else None
    payload["passkey"] = passkey(model, tokenizer, settings, candidates)
    payload["perplexity"] = perplexities(model, tokenizer, settings, candidates) if settings.ppl_len else {}
    payload["summary"] = summarize(payload)
    if out_dir is not None:
        common.write_outputs(out_dir, NAME, payload, markdown(payload))
    if settings.decode:
        accuracy_decode.run(lengths=settings.decode_lengths, depths=settings.decode_depths,
                            ppl_len=settings.decode_ppl_len, ppl_decode=settings.decode_ppl_decode,
                            ppl_text=settings.ppl_text, calib_tokens=min(2048, settings.decode_ppl_len * 2),
                            out=out_dir, command=command, model=model, tokenizer=tokenizer)
    return payload


def markdown(payload: dict) -> str:
    s = payload["settings"]
    lines = ["### Prefill accuracy on SmolLM2-135M-Instruct: dense and sparse methods side by side", "",
             common.environment_line(payload), "",
             "Density = fraction of the causal block area a method's masks kept (mean over layers and heads); dense "
             "is transformers' SDPA. Recall = fraction of each head's exact softmax attention mass inside the kept "
             "blocks (real q/k of every layer); output error = relative error of the attention output reading only "
             "those blocks.", ""]
    summary = payload["summary"]
    rec = payload.get("recall") or {"methods": {}}
    table = []
    for name, e in summary.items():
        r = rec["methods"].get(name, {})
        table.append([name, f"`{s['patterns'][name]}`",
                      "–" if e["passkey_success"] is None else f"{e['passkey_success']:.0%}"
                      + ("" if e["passkey_kept_dense"] else " (loses a dense success)"),
                      common.pct(e["passkey_density"]),
                      "–" if e["perplexity_change"] is None else f"{100 * e['perplexity_change']:+.2f}%",
                      common.pct(e["perplexity_density"]), common.pct(r.get("recall_mean")),
                      common.pct(r.get("recall_min")), common.pct(r.get("output_error_mean")),
                      common.pct(r.get("density_mean"))])
    lines.append(common.markdown_table(
        ["method", "setting", "passkey found", "passkey density", "perplexity vs dense", "ppl density",
         "recall (mean)", "recall (worst head)", "output error", "recall density"], table))
    if payload["passkey"]:
        cases = sorted({(p["target_tokens"], p["tokens"], p["depth"]) for p in payload["passkey"]})
        found = {(p["method"], p["target_tokens"], p["depth"]): p for p in payload["passkey"]}
        names = list(summary)
        rows = []
        for n, tokens, depth in cases:
            cells = []
            for name in names:
                p = found.get((name, n, depth))
                cells.append("–" if p is None else ("found" if p["retrieved"] else f"missed (`{p['answer'][:24]}`)")
                             + ("" if name == "dense" else f", density {common.pct(p['prefill_density'], 0)}"))
            rows.append([tokens, f"{depth:.0%}"] + cells)
        lines += ["", "Passkey grid (greedy, 8 new tokens):", "",
                  common.markdown_table(["tokens", "depth"] + names, rows)]
    if payload["perplexity"]:
        dense = payload["perplexity"]["dense"]["perplexity"]
        lines += ["", f"Perplexity over {s['ppl_len']} tokens of {s['ppl_text'] or 'the GPL-3 text'}: dense "
                      f"{dense:.4f}."]
    if payload.get("recall"):
        lines += [f"Recall measured on {payload['recall']['tokens']} tokens of {payload['recall']['text']}, "
                  f"{payload['recall']['layers']} layers, {s['query_rows']} sampled rows and the last query block."]
    return "\n".join(lines)


def settings_from_args(argv: list[str] | None = None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--methods", default=",".join(methods.DEFAULT_METHODS))
    for name in ("lengths", "depths", "decode-lengths", "decode-depths"):
        parser.add_argument(f"--{name}", help="comma-separated (default: by device)")
    for name in ("ppl-len", "recall-len", "decode-ppl-len", "decode-ppl-decode"):
        parser.add_argument(f"--{name}", type=int, help="tokens (default: by device; 0 skips the part)")
    parser.add_argument("--ppl-text", help="perplexity text file (default: GPL-3 where the system has it)")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode methods (bench.accuracy_decode)")
    args = parser.parse_args(argv)
    device = args.device or common.default_device().type
    defaults = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    settings = Settings(**common.options_or_defaults(args, defaults), device=device,
                        methods=[m for m in args.methods.split(",") if m],
                        decode=not args.no_decode, ppl_text=args.ppl_text)
    return settings, args.out


def main(argv: list[str] | None = None) -> int:
    return common.benchmark_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
