"""Passkey retrieval on a real model, dense vs sparse prefill and sparse decode: ``python -m sparse_attn.demo``.

Loads SmolLM2-135M-Instruct on the CPU (the first run de-quantizes the GGUF weights into a cache, about a minute),
hides a 5-digit key in about ``--tokens`` tokens of filler at relative ``--depth`` and asks for it, greedily, with:

- dense attention (transformers' SDPA), the baseline;
- sparse prefill: the default for models without a plan (head-proxy with ProxyAttn's published defaults and the
  prompt's last rows read in full) and vertical-slash, which choose blocks from q and k, the planner's per-head plan
  for this model at 30% density with its Double Sparsity decode (:data:`sparse_attn.planner.SMOLLM2_PLAN`, what
  ``attn_implementation="sparse"`` runs on this model without options), and A-shape
  (a sink and a local window), static and blind to the key in the middle of the prompt;
- sparse decode after a dense prefill: Double Sparsity (16 label channels per head, reads 1/8 of the context per
  step; its channels are calibrated first on a licence text, never on the prompt) and KV-cache pruning at 50%.

One table: the answer and whether it holds the key, the prefill time (and speedup vs dense), the prefill density
(fraction of the causal block area read, mean over layers), the decode method, and the KV memory the method stores
(bytes and ratio to the dense cache of the same tokens).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import time

import torch

import sparse_attn
from sparse_attn import AShape, VerticalSlash
from sparse_attn.patterns import default_pattern
from sparse_attn.decode import DoubleSparsity, DoubleSparsityConfig, KVPruning, KVPruningConfig
from sparse_attn.integrations.transformers import attention_modules
from sparse_attn.models.smollm2 import cache_dir, load_smollm2, make_passkey_prompt
from sparse_attn.planner import SMOLLM2_PLAN, Plan, load_plan

#: Everything else runs the sparse path at every length (the integration's default runs dense below 1024 keys).
SPARSE_EVERYWHERE = 0
DENSE_PREFILL = 1 << 30  # dense_below larger than any prompt: the prefill runs SDPA, only decode differs


def settings(channels: dict | None):
    """(name, prefill pattern or plan, or None for SDPA; decode method or None for dense decode; decode
    description)."""
    rows = [
        ("dense (SDPA)", None, None, "dense"),
        # Without a decode method the decode steps run the prefill pattern on their one query row.
        ("no-plan default (head-proxy)", default_pattern(), None, "head-proxy"),
        ("vertical-slash 128 v + 512 s", VerticalSlash(vertical=128, slash=512, last_q=64), None, "vertical-slash"),
        ("per-head plan, 30% density", load_plan(SMOLLM2_PLAN), None, "the plan's (Double Sparsity)"),
        ("A-shape 64 sink + 512 local", AShape(sink_tokens=64, local_tokens=512), None, "A-shape"),
    ]
    if channels is not None:
        ds = DoubleSparsity(DoubleSparsityConfig(r=16, budget_fraction=1 / 8, min_budget=128, dense_below=0), channels)
        rows.append(("dense prefill, Double Sparsity decode", None, ds, "Double Sparsity r=16, 1/8"))
    rows.append(("dense prefill, KV pruning 50%", None, KVPruning(KVPruningConfig(sparsity=0.5)), "KV pruning 50%"))
    return rows


@torch.inference_mode()
def prefill(model, ids: torch.Tensor):
    """One timed prefill forward: (first-token logits, KV cache, seconds, prefill density mean over layers)."""
    start = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - start
    modules = [m.sparse_attention for m in attention_modules(model).values() if hasattr(m, "sparse_attention")]
    uses_sparse = model.config._attn_implementation == sparse_attn.integrations.transformers.IMPLEMENTATION
    density = sum(m.last_density for m in modules) / len(modules) if uses_sparse and modules else 1.0
    return out.logits[0, -1], out.past_key_values, seconds, density


@torch.inference_mode()
def decode(model, logits: torch.Tensor, cache, max_new_tokens: int, eos: int | None) -> list[int]:
    """Greedy tokens after a prefill (``logits`` of its last position; ``cache`` grows in place)."""
    tokens, next_token = [], logits.argmax()
    for _ in range(max_new_tokens):
        tokens.append(int(next_token))
        if eos is not None and tokens[-1] == eos:
            break
        next_token = model(next_token.view(1, 1), past_key_values=cache, use_cache=True).logits[0, -1].argmax()
    return tokens


def kv_bytes(model, cache, method) -> tuple[int, int]:
    """(bytes the method stores for the tokens held, bytes of the dense cache of the same tokens). Dense:
    transformers' K/V tensors; Double Sparsity: those plus every layer's label cache (the bytes of the tokens it
    holds; its buffer grows by doubling); KV pruning: every layer's compressed cache (the integration keeps
    transformers' dense cache beside it; a serving engine stores the compressed one instead)."""
    dense = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    states = [m.sparse_attention.decode_state for m in attention_modules(model).values()
              if getattr(m, "sparse_attention", None) is not None and m.sparse_attention.decode_state is not None]
    if isinstance(method, DoubleSparsity):
        labels = sum(s.labels.nbytes * s.absorbed // (s.labels.num_pages * s.labels.page_size) for s in states)
        return dense + labels, dense
    if isinstance(method, KVPruning):
        return sum(s.cache.nbytes for s in states), sum(s.cache.dense_nbytes for s in states)
    return dense, dense


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparse_attn.demo",
                                     description="Passkey retrieval on SmolLM2-135M-Instruct, dense vs sparse.")
    parser.add_argument("--tokens", type=int, default=3000, help="prompt length in tokens (about)")
    parser.add_argument("--depth", type=float, default=0.5, help="where the key sits: 0 = start, 1 = end")
    parser.add_argument("--key", type=int, default=None, help="the 5-digit key (random by default)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="torch CPU threads (default: half the cores; measured here on 2 shared cores, 2 threads "
                             "waiting on each other ran the demo 4x slower than 1)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--calibration-tokens", type=int, default=1024,
                        help="licence-text tokens Double Sparsity's channels are ranked on (0: leave it out)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    key = args.key if args.key is not None else random.randint(10000, 99999)
    start = time.perf_counter()

    print(f"Loading SmolLM2-135M-Instruct from {cache_dir()} (the first run builds it from the GGUF file, ~1 min) ...",
          flush=True)
    model, tokenizer = load_smollm2()
    prompt = make_passkey_prompt(tokenizer, args.tokens, args.depth, key)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    print(f"Prompt: {ids.shape[1]} tokens, key {key} at depth {args.depth:.0%}; greedy, {args.max_new_tokens} new "
          "tokens.", flush=True)
    channels = None
    if args.calibration_tokens:
        t0 = time.perf_counter()
        channels = sparse_attn.calibrate_double_sparsity(model, tokenizer, r=16, tokens=args.calibration_tokens)
        print(f"Double Sparsity: heavy channels ranked on {args.calibration_tokens} licence-text tokens "
              f"({time.perf_counter() - t0:.1f} s).", flush=True)
    print()

    with torch.inference_mode():  # first-call costs (allocator, thread pool) stay out of the first timing
        model(ids[:, :64], use_cache=False)
    rows, dense = [], None
    for name, pattern, method, decode_name in settings(channels):
        print(f"  running {name} ...", end=" ", flush=True)
        if pattern is None and method is None:
            model.set_attn_implementation("sdpa")
        elif pattern is None:
            sparse_attn.configure(model, decode=method, dense_below=DENSE_PREFILL)
        elif isinstance(pattern, Plan):
            sparse_attn.configure(model, plan=pattern, dense_below=SPARSE_EVERYWHERE)
        else:
            sparse_attn.configure(model, pattern, dense_below=SPARSE_EVERYWHERE)
        if method is None:
            logits, cache, prefill_s, density = prefill(model, ids)
        else:
            # The prefill is dense (SDPA through dense_below): continue from a copy of the dense row's. The decode
            # method's state absorbs the whole context at the first decode step.
            logits, cache, prefill_s, density = dense[0], copy.deepcopy(dense[1]), dense[2], 1.0
        dense = dense or (logits, copy.deepcopy(cache), prefill_s)
        tokens = decode(model, logits, cache, args.max_new_tokens, tokenizer.eos_token_id)
        answer = tokenizer.decode(tokens, skip_special_tokens=True).strip().replace("\n", " ")
        stored, dense_bytes = kv_bytes(model, cache, method)
        found = str(key) in answer
        print(f"{'retrieved' if found else 'missed'} (prefill {prefill_s:.1f} s)", flush=True)
        timing = f"{prefill_s:.2f} s ({dense[2] / prefill_s:.2f}x)" if method is None else "same as dense"
        rows.append((name, answer, "yes" if found else "NO", timing, f"{density:.0%}", decode_name,
                     f"{_size(stored)} ({stored / dense_bytes:.2f}x)"))
        sparse_attn.reset_decode_state(model)
        del cache

    header = ("method", "answer", "correct?", "prefill (vs dense)", "prefill density", "decode", "KV memory (vs dense)")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print("\n" + line(header) + "\n" + line("-" * w for w in widths))
    for row in rows:
        print(line(row))
    print("\nprefill density: fraction of the causal block area the prefill read (mean over layers; SDPA reads all)."
          "\nKV memory: what the method stores for the prompt and answer (Double Sparsity: K/V plus label cache; "
          "KV pruning: the compressed cache)."
          f"\nTotal {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
