"""Passkey retrieval on a real model, dense vs sparse: ``python -m sparse_attn.demo [--tokens 2000] [--depth 0.5]``.

Loads SmolLM2-135M-Instruct on the CPU (the first run de-quantizes the GGUF weights into a cache, about a minute),
hides a 5-digit key in about ``--tokens`` tokens of filler at relative ``--depth``, and asks for it with several
attention settings through ``attn_implementation="sparse"``. For each: whether the answer holds the key, the text
generated, the prefill density (fraction of the causal block area read, mean over layers) and the wall time.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import sparse_attn
from sparse_attn import AShape, Dense, TopKBlocks, VerticalSlash
from sparse_attn.models.smollm2 import cache_dir, load_smollm2, make_passkey_prompt, passkey_answer


def settings(n_tokens: int, kv_block_size: int = 64) -> list[tuple[str, object]]:
    """(name, pattern) pairs; None is transformers' own SDPA, the baseline."""
    kv_blocks = -(-n_tokens // kv_block_size)
    return [
        ("dense (sdpa)", None),
        ("sparse, Dense setting", Dense()),
        ("A-shape 64 sink + 256 local", AShape(sink_tokens=64, local_tokens=256)),
        ("vertical-slash 32 v + 64 s", VerticalSlash(vertical=32, slash=64)),
        # k = blocks/6 keeps about 30% of the causal block area (density ~ 2r - r^2 for r = k / blocks).
        (f"top-{max(1, kv_blocks // 6)} blocks (pooled q.k)", TopKBlocks(k=max(1, kv_blocks // 6))),
    ]


def prefill_density(model) -> list[float]:
    """Hooks recording each layer's mask density on multi-token (prefill) calls; returns the list they fill."""
    densities: list[float] = []

    def record(module, args, output):
        if args[0].shape[2] > 1:
            densities.append(module.last_density)

    for module in model.modules():
        if isinstance(module, sparse_attn.SparseAttention):
            module.register_forward_hook(record)
    return densities


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sparse_attn.demo", description="Passkey retrieval on SmolLM2-135M-Instruct, dense vs sparse."
    )
    parser.add_argument("--tokens", type=int, default=2000, help="prompt length in tokens (about)")
    parser.add_argument("--depth", type=float, default=0.5, help="where the key sits: 0 = start, 1 = end")
    parser.add_argument("--key", type=int, default=None, help="the 5-digit key (random by default)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    key = args.key if args.key is not None else random.randint(10000, 99999)

    print(f"Loading SmolLM2-135M-Instruct from {cache_dir()} (the first run builds it from the GGUF file, ~1 min) ...",
          flush=True)
    model, tokenizer = load_smollm2(attn_implementation="sparse")
    prompt = make_passkey_prompt(tokenizer, args.tokens, args.depth, key)
    n_tokens = len(tokenizer(prompt)["input_ids"])
    print(f"Prompt: {n_tokens} tokens, key {key} at depth {args.depth:.0%}; greedy, {args.max_new_tokens} new tokens.\n",
          flush=True)

    rows = []
    for name, pattern in settings(n_tokens):
        if pattern is None:
            model.set_attn_implementation("sdpa")
            densities = []
        else:
            # dense_below=0: run the sparse path even at demo lengths (the default runs dense below 1024 keys).
            sparse_attn.configure(model, pattern, dense_below=0)
            densities = prefill_density(model)
        print(f"  running {name} ...", end=" ", flush=True)
        start = time.perf_counter()
        answer = passkey_answer(model, tokenizer, prompt, args.max_new_tokens)
        seconds = time.perf_counter() - start
        density = sum(densities) / len(densities) if densities else 1.0
        found = str(key) in answer
        print(f"{'retrieved' if found else 'missed'} ({seconds:.1f} s)", flush=True)
        rows.append((name, "yes" if found else "no", answer.strip().replace("\n", " "), f"{density:.2f}", f"{seconds:.1f}"))

    header = ("method", "retrieved", "generated", "density", "time (s)")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    print("\n" + line(header) + "\n" + line("-" * w for w in widths))
    for row in rows:
        print(line(row))
    print("\ndensity: fraction of the causal block area the prefill read (mean over layers; sdpa reads all of it).")


if __name__ == "__main__":
    main()
