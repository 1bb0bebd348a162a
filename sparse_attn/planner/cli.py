"""``sparse-attn-plan``: calibrate a model and write a per-head plan, plan again from a saved profile, show or
render a plan.

Examples::

    sparse-attn-plan calibrate --model smollm2 --out plan.json --target-density 0.3
    sparse-attn-plan calibrate --model ./my-hf-model --out plan.json --target-time 0.35 --profile-out prof.pt
    sparse-attn-plan solve --profile prof.pt --target-density 0.2 --out plan20.json
    sparse-attn-plan render plan.json --out plan.png
    sparse-attn-plan show plan.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main", "load_model"]


def load_model(spec: str, dtype: str = "float32", device: str = "cpu"):
    """``(model, tokenizer)`` for ``spec``: "smollm2" (the embedded GGUF model), a Hugging Face folder, or a
    ``.gguf`` file (de-quantized by transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"--dtype: unknown torch dtype {dtype!r}")
    if spec.lower() == "smollm2":
        from ..models import load_smollm2

        model, tokenizer = load_smollm2(dtype=torch_dtype)
        return model.to(device), tokenizer
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        kwargs = {"gguf_file": path.name}
        path = path.parent
    elif path.is_dir():
        kwargs = {}
    else:
        raise ValueError(f"--model: {spec!r} is neither 'smollm2', a model folder nor a .gguf file")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa", **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    return model.eval().to(device), tokenizer


def _budget(args) -> dict:
    if args.target_time is not None:
        return {"target_time": args.target_time}
    return {"target_density": args.target_density if args.target_density is not None else 0.3}


def _add_budget(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--target-density", type=float, help="mean fraction of the causal block area read (default 0.3)")
    group.add_argument("--target-time", type=float, help="mean attention time relative to dense (kernel-time model)")
    parser.add_argument("--patterns", help="comma-separated pattern names the plan may use (default: all)")
    parser.add_argument("--objective", choices=("error", "recall"),
                        help="minimise the attention output error (default) or maximise the attention-mass recall")
    parser.add_argument("--decode-budget", type=float, default=1 / 8,
                        help="Double Sparsity: mean fraction of the context read per decode step (default 1/8; 0: off)")
    parser.add_argument("--kv-budget", type=float,
                        help="KV pruning: mean fraction of K/V entries kept (default: no pruning)")
    parser.add_argument("--min-keys", type=int,
                        help="fewest keys a HeadProxy head reads per query block at run time (default 1024, "
                             "sparse_attn.planner.solver.MIN_KEYS; 0: the calibrated candidates' own floor)")


def _patterns(args) -> list[str] | None:
    return [p.strip() for p in args.patterns.split(",") if p.strip()] if args.patterns else None


def _plan_options(args) -> dict:
    floor = {} if args.min_keys is None else {"min_keys": args.min_keys}
    return dict(_budget(args), patterns=_patterns(args), objective=args.objective,
                decode_budget=args.decode_budget or None, kv_budget=args.kv_budget, **floor)


def _write_plan(plan, out: str) -> None:
    plan.save(out)
    counts = ", ".join(f"{n} {c}" for n, c in sorted(plan.pattern_counts().items()))
    print(f"wrote {out}: mean density {plan.mean('density'):.3f}, mean recall {plan.mean('recall'):.4f} ({counts})")


def _calibrate(args) -> None:
    from .calibrate import calibrate, calibration_prompts, default_calibration_texts, default_candidates
    from .solver import make_plan

    texts = [Path(t).read_text(errors="ignore") for t in args.text] if args.text else default_calibration_texts()
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    prompts = calibration_prompts(tokenizer, texts, args.context_len, args.prompts)
    profile = calibrate(model, prompts, default_candidates(args.adaptive), model_id=args.model_id or None,
                        q_block_size=args.block_size, kv_block_size=args.block_size, query_rows=args.query_rows,
                        progress=not args.no_progress)
    if args.model.lower() == "smollm2" and not args.model_id:
        profile.model_id = "SmolLM2-135M-Instruct"
    if args.profile_out:
        profile.save(args.profile_out)
        print(f"wrote {args.profile_out}", file=sys.stderr)
    _write_plan(make_plan(profile, **_plan_options(args)), args.out)


def _solve(args) -> None:
    from .calibrate import Profile
    from .solver import make_plan

    _write_plan(make_plan(Profile.load(args.profile), **_plan_options(args)), args.out)


def _render(args) -> None:
    from .plan import load_plan
    from .render import render_plan

    out = args.out or str(Path(args.plan).with_suffix(".png"))
    render_plan(load_plan(args.plan), out, title=args.title)
    print(f"wrote {out}")


def _list(args) -> None:
    from .shipped import shipped_plans

    for path, plan in shipped_plans():
        s, fp = plan.shape, plan.fingerprint or {}
        decode = sum(1 for d in plan.decode or [] if d)
        print(f"{path.name}: {plan.model_id} ({fp.get('architecture', '?')}, {s.num_layers} layers, {s.num_heads} heads, "
              f"{s.num_kv_heads} KV heads, head_dim {s.head_dim}); prefill density {plan.mean('density'):.3f}, "
              f"{decode} layers with sparse decode; config fingerprint {fp.get('config', 'none')[:16]}")
        print(f"    {path}")


def _show(args) -> None:
    from .plan import load_plan

    plan = load_plan(args.plan)
    s = plan.shape
    print(f"{plan.model_id}: {s.num_layers} layers, {s.num_heads} heads ({s.num_kv_heads} KV), head_dim {s.head_dim}; "
          f"budget {plan.budget}; mean density {plan.mean('density')}, mean recall {plan.mean('recall')}")
    for i, row in enumerate(plan.heads):
        cells = [f"{x.pattern}{dict(x.params) or ''}:{x.density:.2f}" if x.density is not None else x.pattern for x in row]
        print(f"layer {i:3d}: " + " | ".join(cells))
        decode = plan.decode[i] if plan.decode else None
        if decode:
            parts = []
            if "double_sparsity" in decode:
                ds = decode["double_sparsity"]
                parts.append(f"Double Sparsity r={ds['r']} budget={ds['budget_fraction']:.4g}")
            if "kv_pruning" in decode:
                parts.append(f"KV pruning sparsity={decode['kv_pruning']['sparsity']}")
            print("     decode: " + ", ".join(parts))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-attn-plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True)

    cal = commands.add_parser("calibrate", help="profile a model on calibration text and write a plan")
    cal.add_argument("--model", default="smollm2", help="'smollm2' (default), a Hugging Face folder or a .gguf file")
    cal.add_argument("--out", required=True, help="plan file to write (JSON)")
    _add_budget(cal)
    cal.add_argument("--context-len", type=int, default=4096, help="calibration prompt length in tokens (default 4096)")
    cal.add_argument("--prompts", type=int, default=4, help="calibration prompts, one text each where texts are "
                     "long enough (default 4)")
    cal.add_argument("--text", action="append", help="calibration text file (repeatable; default: licence texts)")
    cal.add_argument("--query-rows", type=int, default=1024,
                     help="query rows measured per layer and prompt, spread over the prompt (default 1024)")
    cal.add_argument("--block-size", type=int, default=32,
                     help="query and KV block size of the plan (default 32; 64 runs faster per block on a GPU but "
                          "selects more coarsely: 3-5x the perplexity cost at the same density on SmolLM2)")
    cal.add_argument("--adaptive", action="store_true",
                     help="also offer content-adaptive candidates (HeadProxy gamma budgets, VerticalSlash) and fixed "
                          "windows (AShape); their run-time density follows the text and the length, not the budget")
    cal.add_argument("--model-id", help="model name recorded in the plan (default: from the model)")
    cal.add_argument("--profile-out", help="also save the measurements (to re-plan with `solve`)")
    cal.add_argument("--dtype", default="float32")
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--no-progress", action="store_true", help="no progress bars")
    cal.set_defaults(run=_calibrate)

    solve = commands.add_parser("solve", help="plan again from a saved profile under another budget")
    solve.add_argument("--profile", required=True)
    solve.add_argument("--out", required=True)
    _add_budget(solve)
    solve.set_defaults(run=_solve)

    render = commands.add_parser("render", help="draw a plan as a PNG (per layer and head: pattern and density)")
    render.add_argument("plan")
    render.add_argument("--out", help="PNG file (default: the plan's name with .png)")
    render.add_argument("--title")
    render.set_defaults(run=_render)

    listing = commands.add_parser("list", help="the plans shipped with the package, used automatically for the model "
                                               "each was made for")
    listing.set_defaults(run=_list)

    show = commands.add_parser("show", help="print a plan per layer")
    show.add_argument("plan")
    show.set_defaults(run=_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"sparse-attn-plan {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
