"""Accuracy of a per-head plan on SmolLM2-135M (CPU): passkey retrieval and perplexity, dense vs the plan, with the
prefill density the plan actually ran at.

    python -m bench.accuracy_plan --plan plan.json [--lengths 4096,6144] [--depths 0.25,0.5,0.75]
                                  [--ppl-len 4096] [--ppl-text FILE ...] [--out DIR]

Without ``--plan`` it calibrates one first (as ``sparse-attn-plan calibrate --model smollm2``) with
``--target-density`` and ``--block-size`` on ``--calib-prompts`` prompts of ``--calib-len`` tokens, and saves it as
``DIR/plan.json``. The perplexity texts are held out from calibration: they are the ``--ppl-text`` files (default:
the GPL-3, LGPL-2.1 and MPL-1.1 texts where the system has them, else the last default text), and calibration reads
the default licence texts from their start (:func:`sparse_attn.planner.calibrate.calibration_prompts`) leaving out
every text that shares a passage with one of them (several installed licence files embed the GPL-3). Writes
``DIR/accuracy_plan.json`` and ``DIR/accuracy_plan.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

import sparse_attn
from bench.accuracy_decode import passkey_key, token_window
from bench.common import command_line, environment, environment_line, write_json
from sparse_attn.integrations.transformers import attention_modules
from sparse_attn.models import load_smollm2, make_passkey_prompt, passkey_retrieved
from sparse_attn.planner import default_pattern, load_plan
from sparse_attn.planner.calibrate import calibrate, calibration_prompts, default_calibration_texts, default_candidates
from sparse_attn.planner.decode import DecodeCandidates
from sparse_attn.planner.solver import make_plan

NAME = "accuracy_plan"
#: Held-out perplexity texts, where the system has them.
PPL_TEXTS = tuple(Path("/usr/share/common-licenses") / name for name in ("GPL-3", "LGPL-2.1", "MPL-1.1"))


def _words(text: str) -> str:
    return " ".join(text.split())


def held_out(texts: list[str], test_text: str, passage: int = 200, step: int = 1000) -> list[str]:
    """``texts`` without those sharing a ``passage``-character stretch (whitespace-normalised, sampled every
    ``step`` characters of the test text) with ``test_text``: calibration never reads the text it is judged on."""
    test = _words(test_text)
    probes = [test[i:i + passage] for i in range(0, max(1, len(test) - passage), step)]
    return [t for t in texts if not any(p in _words(t) for p in probes)]


def perplexity_texts(args) -> dict[str, str]:
    """Name -> text of every perplexity text: ``--ppl-text`` files, else :data:`PPL_TEXTS`, else the last default
    calibration text."""
    paths = [Path(p) for p in args.ppl_text] if args.ppl_text else [p for p in PPL_TEXTS if p.is_file()]
    if paths:
        return {p.name: p.read_text() for p in paths}
    return {"last default text": default_calibration_texts()[-1]}


def prefill_density(model) -> float:
    """Mean density over the layers' last sparse runs (dense runs count 1.0)."""
    values = [m.sparse_attention.last_density for m in attention_modules(model).values()]
    return sum(values) / len(values)


def generate_with_prefill_density(model, run):
    """``(run(), mean prefill density)``: the density of each layer's multi-row (prefill) call during ``run``."""
    densities, hooks = {}, []
    for i, module in attention_modules(model).items():
        def record(attention, args, output, i=i):
            if args[0].shape[2] > 1:
                densities[i] = attention.last_density
        hooks.append(module.sparse_attention.register_forward_hook(record))
    try:
        result = run()
    finally:
        for hook in hooks:
            hook.remove()
    return result, sum(densities.values()) / max(1, len(densities))


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor) -> float:
    return math.exp(float(model(ids[None], labels=ids[None], use_cache=False).loss))


def evaluate(model, tokenizer, args, ppl_ids: dict[str, torch.Tensor], tag: str) -> dict:
    """Perplexity of every ``ppl_ids`` window and the passkey grid, with the prefill density each ran at."""
    result = {"passkey": [], "perplexity": {}}
    for name, ids in ppl_ids.items():
        start = time.perf_counter()
        entry = {"perplexity": perplexity(model, ids), "density": prefill_density(model) if tag != "dense" else 1.0}
        result["perplexity"][name] = entry
        print(f"[{tag}] perplexity of {name} {entry['perplexity']:.4f} at {args.ppl_len} tokens "
              f"(density {entry['density']:.3f}, {time.perf_counter() - start:.0f} s)", flush=True)
    for n in args.lengths:
        for depth in args.depths:
            key = passkey_key(n, depth)
            prompt = make_passkey_prompt(tokenizer, n, depth, key)
            start = time.perf_counter()
            if tag == "dense":
                ok, density = passkey_retrieved(model, tokenizer, prompt, key), 1.0
            else:
                ok, density = generate_with_prefill_density(
                    model, lambda: passkey_retrieved(model, tokenizer, prompt, key))
                sparse_attn.reset_decode_state(model)  # the next prompt starts a new cache
            result["passkey"].append({"tokens": n, "depth": depth, "retrieved": ok, "prefill_density": density})
            print(f"[{tag}] passkey {n} tokens depth {depth}: {'ok' if ok else 'MISSED'} "
                  f"(prefill density {density:.3f}, {time.perf_counter() - start:.0f} s)", flush=True)
    return result


def calibrated_plan(model, tokenizer, args, test_texts: list[str], out: Path):
    """Calibrate on the default texts minus the held-out ``test_texts``; save the plan (and the profile)."""
    texts = default_calibration_texts()
    for test_text in test_texts:
        texts = held_out(texts, test_text)
    prompts = calibration_prompts(tokenizer, texts, args.calib_len, args.calib_prompts)
    profile = calibrate(model, prompts, default_candidates(), model_id="SmolLM2-135M-Instruct",
                        q_block_size=args.block_size, kv_block_size=args.block_size, query_rows=args.query_rows,
                        decode=DecodeCandidates() if args.decode_budget else None)
    profile.info["texts"] = [t.strip().splitlines()[0][:80] for t in texts[: args.calib_prompts]]
    profile.save(out / "profile.pt")
    plan = make_plan(profile, target_density=args.target_density, decode_budget=args.decode_budget or None)
    plan.save(out / "plan.json")
    return plan, str(out / "plan.json")


def decode_summary(plan) -> str:
    """The plan's decode methods in words, e.g. "Double Sparsity r=16 reading 1/4 of the context on 22 layers, ..."."""
    counts: dict[str, int] = {}
    for layer in range(plan.shape.num_layers):
        entry = (plan.decode[layer] if plan.decode else None) or {}
        if "double_sparsity" in entry:
            ds = entry["double_sparsity"]
            name = f"Double Sparsity r={ds['r']} reading {ds['budget_fraction']:g} of the context"
        elif "kv_pruning" in entry:
            name = f"KV pruning {entry['kv_pruning']['sparsity']:g}"
        else:
            name = "dense"
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name} on {n} layer{'s' * (n != 1)}" for name, n in counts.items())


def _budget_text(budget: dict) -> str:
    kind = "target density" if "target_density" in budget else "target time"
    target = budget.get("target_density", budget.get("target_time"))
    return f"{kind} {target} (achieved {budget.get('achieved')}, objective {budget.get('objective')})"


def markdown(report: dict) -> str:
    """A short human-readable account of one run (also what ``python -m bench report`` renders)."""
    plan = report["plan"]
    blocks = f", blocks {plan['blocks']['q']}x{plan['blocks']['kv']}" if "blocks" in plan else ""
    lines = ["### Per-head plan accuracy on SmolLM2-135M-Instruct", "", environment_line(report), "",
             f"Command: `{report['command']}`", "",
             f"Plan: `{plan['file']}`{blocks}, {_budget_text(plan['budget'])}, planned mean density "
             f"{plan['density']:.3f}, heads per pattern: {', '.join(f'{n} {c}' for n, c in plan['patterns'].items())}."]
    if plan.get("decode"):
        lines += ["", f"Decode (passkeys): {plan['decode']}."]
    texts = (plan.get("calibration") or {}).get("texts")
    if texts:
        lengths = "/".join(map(str, plan["calibration"]["context_lens"]))
        lines += ["", f"Calibrated on {len(texts)} prompts of {lengths} tokens from: "
                  + "; ".join(f"\"{t.strip()}\"" for t in texts) + "."]
    lines.append("")
    run, dense, default = report["plan_run"], report.get("dense"), report.get("default_run")
    if run["perplexity"]:
        head = "| text | dense | plan | rise | plan prefill density |"
        if default:
            head += " no-plan default | rise | default prefill density |"
        lines += [f"Perplexity over {report['settings']['ppl_len']} tokens of each held-out text:", "", head,
                  "|" + "---|" * (head.count("|") - 1)]
        for name, entry in run["perplexity"].items():
            base = dense["perplexity"][name]["perplexity"] if dense else None
            row = f"| {name} | {f'{base:.4f}' if base else '-'} | {_ppl_cells(entry)} |"
            if default:
                row += f" {_ppl_cells(default['perplexity'][name])} |"
            lines.append(row)
    if run["passkey"]:
        head = "| tokens | depth | dense | plan | plan prefill density |" + (
            " no-plan default | default prefill density |" if default else "")
        lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
        dense_rows = dense["passkey"] if dense else [None] * len(run["passkey"])
        default_rows = default["passkey"] if default else [None] * len(run["passkey"])
        mark = lambda ok: "ok" if ok else "missed"  # noqa: E731
        for p, d, o in zip(run["passkey"], dense_rows, default_rows):
            row = (f"| {p['tokens']} | {p['depth']} | {mark(d['retrieved']) if d else '-'} | "
                   f"{mark(p['retrieved'])} | {p['prefill_density']:.3f} |")
            if o:
                row += f" {mark(o['retrieved'])} | {o['prefill_density']:.3f} |"
            lines.append(row)
        for label, r in (("plan", run), ("no-plan default", default)):
            if r and "passkey_kept" in r:
                lines += ["", f"Every dense passkey success kept by the {label}: {r['passkey_kept']}."]
    return "\n".join(lines) + "\n"


def _ppl_cells(entry: dict) -> str:
    rise = f"{100 * entry['rise']:+.2f}%" if "rise" in entry else "-"
    return f"{entry['perplexity']:.4f} | {rise} | {entry['density']:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", help="plan file (default: calibrate one and save it as DIR/plan.json)")
    parser.add_argument("--target-density", type=float, default=0.3)
    parser.add_argument("--decode-budget", type=float, default=0.25,
                        help="Double Sparsity decode of the calibrated plan: mean fraction of the context read per "
                             "step over the layers (default 1/4; 0: dense decode)")
    parser.add_argument("--calib-prompts", type=int, default=4, help="calibration prompts (default 4)")
    parser.add_argument("--calib-len", type=int, default=4096, help="calibration prompt length (default 4096)")
    parser.add_argument("--block-size", type=int, default=32, help="query and KV block size of the plan (default 32)")
    parser.add_argument("--query-rows", type=int, default=1024, help="query rows profiled per layer and prompt")
    parser.add_argument("--lengths", default="4096,6144")
    parser.add_argument("--depths", default="0.25,0.5,0.75")
    parser.add_argument("--ppl-len", type=int, default=4096, help="perplexity tokens (0: no perplexity)")
    parser.add_argument("--ppl-text", action="append", help="held-out perplexity text file (repeatable)")
    parser.add_argument("--out", default="bench/results/accuracy_plan")
    parser.add_argument("--skip-dense", action="store_true", help="only the plan (dense numbers from an earlier run)")
    parser.add_argument("--no-plan-default", action="store_true",
                        help="also run the no-plan default (sparse_attn.planner.default_pattern() on every head)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.depths = [float(x) for x in args.depths.split(",") if x]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_smollm2()
    ppl_texts = perplexity_texts(args)
    ppl_ids = {name: token_window(tokenizer, text, args.ppl_len) for name, text in ppl_texts.items() if args.ppl_len}
    if args.plan:
        plan, plan_file = load_plan(args.plan, model), args.plan
    else:
        plan, plan_file = calibrated_plan(model, tokenizer, args, list(ppl_texts.values()), out)
    report = {"benchmark": NAME, **environment(torch.device("cpu"), command_line("bench.accuracy_plan", argv)),
              "settings": {"lengths": args.lengths, "depths": args.depths, "ppl_len": args.ppl_len,
                           "ppl_texts": list(ppl_texts)},
              "plan": {"file": plan_file, "blocks": {"q": plan.q_block_size, "kv": plan.kv_block_size},
                       "budget": plan.budget, "density": plan.mean("density"),
                       "recall": plan.mean("recall"), "error": plan.mean("error"), "patterns": plan.pattern_counts(),
                       "calibration": plan.calibration, "decode": decode_summary(plan)}}
    if not args.skip_dense:
        report["dense"] = evaluate(model, tokenizer, args, ppl_ids, "dense")
    sparse_attn.configure(model, plan=plan)  # its prefill patterns, block sizes and decode methods
    report["plan_run"] = evaluate(model, tokenizer, args, ppl_ids, "plan")
    if args.no_plan_default:
        sparse_attn.configure(model, default_pattern())
        report["default_run"] = evaluate(model, tokenizer, args, ppl_ids, "default")
    for run_name in ("plan_run", "default_run"):
        if "dense" in report and run_name in report:
            dense, run = report["dense"], report[run_name]
            for name, entry in run["perplexity"].items():
                entry["rise"] = entry["perplexity"] / dense["perplexity"][name]["perplexity"] - 1
            run["passkey_kept"] = all(p["retrieved"] for p, d in zip(run["passkey"], dense["passkey"]) if d["retrieved"])
            rises = [e["rise"] for e in run["perplexity"].values()]
            run["max_perplexity_rise"] = max(rises) if rises else None
            rise = f"{100 * max(rises):.2f}% at most" if rises else "not measured"
            print(f"{run_name}: perplexity rise {rise}, passkey kept every dense success: {run['passkey_kept']}")
    write_json(out / "accuracy_plan.json", report)
    (out / f"{NAME}.md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
