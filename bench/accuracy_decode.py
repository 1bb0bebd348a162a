"""Accuracy of sparse decode on SmolLM2-135M (real weights, CPU): passkey retrieval and perplexity, dense vs Double
Sparsity (r=16 of 64 channels, budget = context / 8) and KV-cache pruning (50%, 70%).

    python -m bench.accuracy_decode [--lengths 2048,4096,7168] [--depths 0.5,0.25] [--ppl-len 2048]
                                    [--ppl-decode 256] [--out DIR]

Every method prefills densely and differs only in the one-query decode steps (``sparse_attn.configure(model,
decode=...)``), so the numbers isolate decode. Double Sparsity's heavy channels are calibrated on the start of the
first default calibration text (``calibrate_double_sparsity``), never on the passkey prompts or the perplexity text.

Perplexity of a decode method needs teacher-forced decoding, one token per forward, which is costly on a CPU: the
text (``--ppl-text``, default the GPL-3 licence where the system has it, else the last default text) is cut to
``--ppl-len`` tokens, the first ``ppl_len - ppl_decode`` are prefilled, and the perplexity is over the last
``--ppl-decode`` tokens, each predicted by a decode step over everything before it. Dense runs the same loop.
Writes ``DIR/accuracy_decode.json`` and ``DIR/accuracy_decode.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

import sparse_attn
from bench.common import command_line, environment, markdown_table, write_json
from sparse_attn.decode import DoubleSparsity, DoubleSparsityConfig, KVPruning, KVPruningConfig
from sparse_attn.integrations.transformers import attention_modules
from sparse_attn.models import load_smollm2, make_passkey_prompt, passkey_retrieved
from sparse_attn.planner.calibrate import default_calibration_texts

GPL3 = Path("/usr/share/common-licenses/GPL-3")
PREFILL_DENSE = 1 << 30  # SparseAttention.dense_below: prefill runs dense SDPA, only decode differs


def methods(channels, channels32=None) -> dict:
    """name -> decode method (None: dense), for passkey ("passkey") and perplexity ("ppl") runs. ``channels``: r = 16
    heavy channels; ``channels32`` (optional): r = 32, for ``ds_r32i8_1/8``, whose int8 labels take the bytes of
    r = 16 fp16 labels (34 per token and KV head against 32)."""
    ds = DoubleSparsity(DoubleSparsityConfig(r=16, budget_fraction=1 / 8, min_budget=128, dense_below=0), channels)
    out = {"dense": None, "ds_r16_1/8": ds, "prune_50": KVPruning(KVPruningConfig(sparsity=0.5)),
           "prune_70": KVPruning(KVPruningConfig(sparsity=0.7))}
    if channels32 is not None:
        out["ds_r32i8_1/8"] = DoubleSparsity(DoubleSparsityConfig(r=32, label_bits=8, budget_fraction=1 / 8,
                                                                  min_budget=128, dense_below=0), channels32)
    return out


def use(model, method) -> None:
    sparse_attn.configure(model, decode=method, dense_below=PREFILL_DENSE)


def decode_read(model) -> float:
    """Mean fraction of the context the layers' last decode step read."""
    values = [m.sparse_attention.last_density for m in attention_modules(model).values()]
    return sum(values) / len(values)


@torch.inference_mode()
def decode_perplexity(model, ids: torch.Tensor, decode_tokens: int) -> float:
    """Perplexity of the last ``decode_tokens`` of ``ids``: prefill the rest, then one teacher-forced step per token."""
    prefill = ids.numel() - decode_tokens
    ids = ids.to(next(model.parameters()).device)
    out = model(ids[None, :prefill], use_cache=True)
    cache, logits = out.past_key_values, [out.logits[0, -1]]
    for t in range(prefill, ids.numel() - 1):
        out = model(ids[None, t:t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[0, -1])
    nll = torch.nn.functional.cross_entropy(torch.stack(logits).float(), ids[prefill:])
    return math.exp(float(nll))


def token_window(tokenizer, text: str, length: int) -> torch.Tensor:
    """The first ``length`` token ids of ``text`` (repeated when shorter)."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    return ids.repeat(-(-length // ids.numel()))[:length]


def perplexity_ids(tokenizer, path: str | None, length: int) -> torch.Tensor:
    """``length`` tokens of the perplexity text (repeated when shorter): ``path``, else GPL-3, else the last
    default calibration text (calibration reads the first one)."""
    text = Path(path).read_text() if path else (GPL3.read_text() if GPL3.is_file() else default_calibration_texts()[-1])
    return token_window(tokenizer, text, length)


def passkey_key(n: int, depth: float) -> int:
    return 10000 + (n * 7919 + round(depth * 100) * 104729) % 90000  # a fixed 5-digit key per case


METHOD_NAMES = ("dense", "ds_r16_1/8", "ds_r32i8_1/8", "prune_50", "prune_70")
NAME = "accuracy_decode"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="2048,4096,7168")
    parser.add_argument("--depths", default="0.5,0.25")
    parser.add_argument("--ppl-len", type=int, default=2048)
    parser.add_argument("--ppl-decode", type=int, default=256)
    parser.add_argument("--ppl-text")
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--passkey-methods", default="dense,ds_r16_1/8,prune_50")
    parser.add_argument("--ppl-methods", default="dense,ds_r16_1/8,prune_50,prune_70")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    try:
        report = run(lengths=[int(x) for x in args.lengths.split(",") if x],
                     depths=[float(x) for x in args.depths.split(",") if x], ppl_len=args.ppl_len,
                     ppl_decode=args.ppl_decode, ppl_text=args.ppl_text, calib_tokens=args.calib_tokens,
                     passkey_methods=[m for m in args.passkey_methods.split(",") if m],
                     ppl_methods=[m for m in args.ppl_methods.split(",") if m], out=args.out,
                     command=command_line("bench.accuracy_decode", sys.argv[1:] if argv is None else argv))
    except ValueError as error:
        parser.error(str(error))
    print(render(report))
    return 0


def run(*, lengths: list[int], depths: list[float], ppl_len: int, ppl_decode: int, ppl_text: str | None = None,
        calib_tokens: int = 2048, passkey_methods=("dense", "ds_r16_1/8", "prune_50"),
        ppl_methods=("dense", "ds_r16_1/8", "prune_50", "prune_70"), out=None, command: str | None = None,
        model=None, tokenizer=None, device: torch.device | None = None) -> dict:
    """The passkey grid and decode perplexity of the decode methods; writes ``out/accuracy_decode.json`` and
    ``.md`` when ``out`` is given. ``model``/``tokenizer``: an already loaded SmolLM2 (loaded when None)."""
    passkey_methods, ppl_methods = list(passkey_methods), list(ppl_methods)
    unknown = sorted(set(passkey_methods + ppl_methods) - set(METHOD_NAMES))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(METHOD_NAMES)}")
    if ppl_methods and not 0 < ppl_decode < ppl_len:
        raise ValueError("--ppl-decode must lie in (0, --ppl-len)")
    if model is None:
        model, tokenizer = load_smollm2()
    device = next(model.parameters()).device if device is None else device
    start = time.perf_counter()
    channels = sparse_attn.calibrate_double_sparsity(model, tokenizer, r=16, tokens=calib_tokens)
    channels32 = None
    if "ds_r32i8_1/8" in passkey_methods + ppl_methods:
        channels32 = sparse_attn.calibrate_double_sparsity(model, tokenizer, r=32, tokens=calib_tokens)
    print(f"calibrated heavy channels on {calib_tokens} tokens ({time.perf_counter() - start:.0f} s)", flush=True)
    runs = methods(channels, channels32)
    report = {"benchmark": NAME, "environment": environment(device, command),
              "settings": {name: repr(m) if m is not None else "dense" for name, m in runs.items()},
              "calibration": {"text": "default_calibration_texts()[0] (start)", "tokens": calib_tokens},
              "passkey": [], "perplexity": {}}

    for n in lengths:
        for depth in depths:
            key = passkey_key(n, depth)
            prompt = make_passkey_prompt(tokenizer, n, depth, key)
            tokens = len(tokenizer(prompt)["input_ids"])
            for name in passkey_methods:
                use(model, runs[name])
                t0 = time.perf_counter()
                ok = passkey_retrieved(model, tokenizer, prompt, key)
                read = decode_read(model)
                report["passkey"].append({"method": name, "target_tokens": n, "tokens": tokens, "depth": depth,
                                          "retrieved": ok, "decode_read": read})
                print(f"[{name}] passkey {tokens} tokens depth {depth}: {'ok' if ok else 'MISSED'} "
                      f"(decode read {read:.3f} of the context, {time.perf_counter() - t0:.0f} s)", flush=True)
                sparse_attn.reset_decode_state(model)

    if ppl_methods:
        ids = perplexity_ids(tokenizer, ppl_text, ppl_len)
        report["perplexity_setup"] = {"text": ppl_text or (str(GPL3) if GPL3.is_file() else "last default text"),
                                      "tokens": ppl_len, "decoded": ppl_decode}
    for name in ppl_methods:
        use(model, runs[name])
        t0 = time.perf_counter()
        ppl = decode_perplexity(model, ids, ppl_decode)
        report["perplexity"][name] = {"perplexity": ppl, "decode_read": decode_read(model)}
        print(f"[{name}] perplexity {ppl:.4f} over the last {ppl_decode} of {ppl_len} tokens "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        sparse_attn.reset_decode_state(model)

    dense = report["perplexity"].get("dense", {}).get("perplexity")
    for entry in report["perplexity"].values():
        entry["change"] = entry["perplexity"] / dense - 1 if dense else None
    dense_ok = {(p["target_tokens"], p["depth"]) for p in report["passkey"] if p["method"] == "dense" and p["retrieved"]}
    report["passkey_kept"] = {name: all(p["retrieved"] for p in report["passkey"]
                                        if p["method"] == name and (p["target_tokens"], p["depth"]) in dense_ok)
                              for name in passkey_methods}
    if out is not None:
        out = Path(out)
        write_json(out / "accuracy_decode.json", report)
        (out / "accuracy_decode.md").write_text(render(report) + "\n")
    return report


def render(report: dict) -> str:
    cases = sorted({(p["target_tokens"], p["tokens"], p["depth"]) for p in report["passkey"]})
    names = list(dict.fromkeys(p["method"] for p in report["passkey"]))
    found = {(p["method"], p["target_tokens"], p["depth"]): p for p in report["passkey"]}

    def cell(name, n, depth):
        p = found.get((name, n, depth))
        if p is None:
            return "–"
        return ("ok" if p["retrieved"] else "MISSED") + (f" (read {p['decode_read']:.3f})" if name != "dense" else "")

    env = report["environment"]
    lines = [f"### Sparse decode accuracy on SmolLM2-135M-Instruct ({env.get('device', {}).get('type', 'cpu').upper()})",
             "", f"`{env.get('command', '')}`", "",
             "Prefill is dense for every method; only the one-query decode steps differ. "
             "`read` = fraction of the context the last decode step read (mean over layers).", "",
             "Passkey retrieval (greedy, 8 new tokens):", ""]
    lines.append(markdown_table(["tokens", "depth", *names],
                                [[tokens, depth, *(cell(m, n, depth) for m in names)] for n, tokens, depth in cases]))
    lines += ["", "Keeps every dense success: " + ", ".join(f"{k}: {v}" for k, v in report["passkey_kept"].items()), ""]
    if not report["perplexity"]:
        return "\n".join(lines)
    setup = report.get("perplexity_setup", {})
    lines += [f"Perplexity (last {setup.get('decoded')} of {setup.get('tokens')} tokens of {setup.get('text')}, "
              "teacher-forced token-by-token decode after a dense prefill of the rest):", ""]
    lines.append(markdown_table(["method", "perplexity", "change vs dense", "decode read"],
                                [[name, f"{e['perplexity']:.4f}",
                                  "–" if e["change"] is None else f"{100 * e['change']:+.2f}%", f"{e['decode_read']:.3f}"]
                                 for name, e in report["perplexity"].items()]))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
