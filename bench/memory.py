"""KV-cache memory per token and per context: dense, Double Sparsity (dense cache plus its label cache) and the
compressed cache of KV pruning, read from the real data structures.

    python -m bench.memory --out DIR [--models smollm2,llama-8b] [--contexts 4096,32768]
                           [--r 16] [--label-bits 16,8,4] [--sparsities 0.5,0.7]

writes ``DIR/memory.json`` and ``DIR/memory.md``. For each model shape and context, one layer's caches are built
and filled with that many tokens, and their bytes are read from the objects:

- **dense**: the paged K and V caches ``[pages, page_size, Hkv, D]`` (``page_size`` 16, vLLM's default), written
  with every token: ``k_cache.nbytes + v_cache.nbytes``;
- **Double Sparsity**: the dense cache plus a :class:`~sparse_attn.decode.LabelCache` over the same pages with every
  key written (``LabelCache.nbytes``) at each label width; the label bytes per token are checked against
  ``LabelCache.bytes_per_token`` (what KV-memory planning uses before allocating);
- **KV pruning**: a :class:`~sparse_attn.decode.CompressedKVCache` holding the context (``CompressedKVCache.nbytes``:
  bitmaps, packed values, the dense recent window and the offsets; ``allocated_nbytes`` adds unused capacity).

Layers of a model are alike, so the model's bytes are one layer's times the layer count. K/V values are Gaussian:
the stored bytes do not depend on them (every token keeps a fixed number of entries).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sparse_attn.decode import DoubleSparsityConfig, KVPruningConfig, LabelCache, write_tokens

from . import common, prefill

NAME = "memory"

#: Attention shapes: SmolLM2-135M (the embedded model, fp32 as it runs here) and Llama-3-8B (bf16 serving).
MODELS = {
    "smollm2": dict(label="SmolLM2-135M", layers=30, kv_heads=3, head_dim=64, dtype="fp32"),
    "llama-8b": dict(label="Llama-3-8B", layers=32, kv_heads=8, head_dim=128, dtype="bf16"),
}
PAGE_SIZE = 16


def default_contexts() -> tuple[int, ...]:
    """Bytes grow linearly past the recent window; a GPU machine (more cores and memory) also fills 128k caches."""
    return (4096, 32768, 131072) if torch.cuda.is_available() else (4096, 32768)


@dataclass
class Settings:
    models: list[str] = field(default_factory=lambda: list(MODELS))
    contexts: list[int] = field(default_factory=lambda: list(default_contexts()))
    r: int = 16
    label_bits: list[int] = field(default_factory=lambda: [16, 8, 4])
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.7])
    page_size: int = PAGE_SIZE
    seed: int = 0

    def __post_init__(self):
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown or not self.models:
            raise ValueError(f"models: unknown {unknown or 'empty list'}; known: {sorted(MODELS)}")
        if any(c < 1 for c in self.contexts) or not self.contexts:
            raise ValueError(f"contexts must be positive token counts, got {self.contexts}")
        for bits in self.label_bits:
            DoubleSparsityConfig(r=self.r, label_bits=bits)  # its own checks name the bad value
        for sparsity in self.sparsities:
            KVPruningConfig(sparsity=sparsity)


def layer_bytes(shape: dict, context: int, s: Settings, generator: torch.Generator) -> list[dict]:
    """One layer's caches filled with ``context`` tokens: a row per method with the bytes read from the objects."""
    kv_heads, head_dim, dtype = shape["kv_heads"], shape["head_dim"], common.parse_dtype(shape["dtype"])
    pages = -(-context // s.page_size)
    k = torch.randn(context, kv_heads, head_dim, generator=generator).to(dtype)
    v = torch.randn(context, kv_heads, head_dim, generator=generator).to(dtype)
    slots = torch.arange(context)
    k_cache = torch.zeros(pages, s.page_size, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    write_tokens(k_cache, slots, k)
    write_tokens(v_cache, slots, v)
    dense = k_cache.nbytes + v_cache.nbytes
    rows = [dict(method="dense", setting=f"paged K/V, page {s.page_size}", layer_bytes=dense, allocated_layer_bytes=dense)]

    channels = torch.stack([torch.randperm(head_dim, generator=generator)[: s.r] for _ in range(kv_heads)])
    for bits in s.label_bits:
        config = DoubleSparsityConfig(r=s.r, label_bits=bits)
        labels = LabelCache.from_config(config, channels, pages, s.page_size, dtype=dtype)
        labels.write(k, slots)
        planned = LabelCache.bytes_per_token(kv_heads, s.r, bits, dtype) * pages * s.page_size
        rows.append(dict(method="double_sparsity", setting=f"r={s.r}, {bits}-bit labels", label_bits=bits,
                         r=s.r, layer_bytes=dense + labels.nbytes, allocated_layer_bytes=dense + labels.nbytes,
                         label_layer_bytes=labels.nbytes, label_bytes_match_planning=planned == labels.nbytes))
        del labels

    for sparsity in s.sparsities:
        config = KVPruningConfig(sparsity=sparsity)
        cache = config.make_cache(kv_heads, head_dim, dtype=dtype)
        cache.append(k.transpose(0, 1), v.transpose(0, 1))
        rows.append(dict(method="kv_pruning", setting=f"{sparsity:.0%} pruned, {config.recent_tokens} recent dense",
                         sparsity=sparsity, layer_bytes=cache.nbytes, allocated_layer_bytes=cache.allocated_nbytes,
                         compressed_tokens=cache.comp_lengths[0], recent_tokens=cache.recent_lengths[0],
                         same_tokens_dense_bytes=cache.dense_nbytes))
        del cache
    return rows


def run(settings: Settings, out_dir: Path | str | None = None, command: str | None = None) -> dict:
    payload = {"benchmark": NAME, **common.environment(torch.device("cpu"), command), "settings": asdict(settings),
               "models": {name: MODELS[name] for name in settings.models}}
    generator = torch.Generator().manual_seed(settings.seed)
    results = []
    jobs = [(m, c) for m in settings.models for c in settings.contexts]
    for model, context in common.progress(jobs, desc="memory", unit="cache"):
        shape = MODELS[model]
        rows = layer_bytes(shape, context, settings, generator)
        dense = rows[0]["layer_bytes"]
        for row in rows:
            row.update(model=model, context=context, layers=shape["layers"], bytes=row["layer_bytes"] * shape["layers"],
                       allocated_bytes=row["allocated_layer_bytes"] * shape["layers"],
                       bytes_per_token=row["layer_bytes"] * shape["layers"] / context,
                       ratio_to_dense=row["layer_bytes"] / dense)
            results.append(row)
    payload["results"] = results
    if out_dir is not None:
        common.write_outputs(out_dir, NAME, payload, markdown(payload))
    return payload


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def markdown(payload: dict) -> str:
    lines = ["### KV-cache memory: dense, Double Sparsity labels, pruned (compressed) cache", "",
             common.environment_line(payload), "",
             "Bytes read from the filled cache objects (one layer built, times the layer count). Double Sparsity "
             "stores its label cache beside the full K/V; KV pruning stores the compressed cache instead of it.", ""]
    for model, shape in payload["models"].items():
        rows = [r for r in payload["results"] if r["model"] == model]
        contexts = sorted({r["context"] for r in rows})
        settings = list(dict.fromkeys((r["method"], r["setting"]) for r in rows))
        table = []
        for method, setting in settings:
            cells = {r["context"]: r for r in rows if (r["method"], r["setting"]) == (method, setting)}
            largest = cells[contexts[-1]]
            table.append([method, setting, _bytes(largest["bytes_per_token"])]
                         + [f"{_bytes(cells[c]['bytes'])} ({cells[c]['ratio_to_dense']:.2f}x)" for c in contexts])
        lines += [f"**{shape['label']}** ({shape['layers']} layers, {shape['kv_heads']} KV heads, head_dim "
                  f"{shape['head_dim']}, {shape['dtype']}):", "",
                  common.markdown_table(["method", "setting", f"bytes / token (at {prefill._tokens(contexts[-1])})"]
                                        + [f"{prefill._tokens(c)} tokens (vs dense)" for c in contexts], table), ""]
    return "\n".join(lines).rstrip()


def settings_from_args(argv: list[str] | None = None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--contexts", help="comma-separated token counts (default 4096,32768; 131072 too on a GPU "
                        "machine)")
    parser.add_argument("--r", type=int, default=16, help="Double Sparsity label channels")
    parser.add_argument("--label-bits", default="16,8,4")
    parser.add_argument("--sparsities", default="0.5,0.7")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    contexts = common.parse_list(args.contexts) if args.contexts else list(default_contexts())
    settings = Settings(models=[m for m in args.models.split(",") if m], contexts=contexts,
                        r=args.r, label_bits=common.parse_list(args.label_bits),
                        sparsities=common.parse_list(args.sparsities, float), seed=args.seed)
    return settings, args.out


def main(argv: list[str] | None = None) -> int:
    return common.benchmark_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
