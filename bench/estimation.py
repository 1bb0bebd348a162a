"""Estimation overhead: the time content-aware patterns spend choosing blocks, against dense attention at the same
size, measured side by side in one run.

    python -m bench.estimation --out DIR [--contexts 16384,65536,131072] [--estimators head_proxy,vertical_slash]
                               [--heads 32 --kv-heads 8 --head-dim 128 --dtype bf16 --block 128] [--quick]
                               [--time-budget SECONDS] [--device cuda|cpu]

writes ``DIR/estimation.json`` and ``DIR/estimation.md``. Per context, on the same q/k/v:

- **dense attention**: every SDPA backend that runs (causal, GQA), the fastest is the baseline;
- per estimator (the harness's methods, :mod:`bench.methods`): ``Pattern.build_mask`` timed whole (scores,
  selection and the block-list compression the kernel reads), ``overhead`` = estimation time / fastest dense
  time, the median over ``--rounds`` rounds of the two timed back to back; HeadProxy's scoring step
  (:meth:`HeadProxy.estimate`) is also timed alone; then the block-sparse kernel on the mask it built, and
  ``speedup_vs_dense`` = dense / (estimation + kernel), the prefill time a layer sees.

The METHODS.md bar (head-proxy estimation <= 5% of dense attention at 64k) is checked on a GPU run in its
configuration (bf16, 32/8 heads, head_dim 128); on a CPU, the per-head estimator of the shipped plans is checked
against 10% at 8k in SmolLM2's shape (fp32, 9/3 heads, head_dim 64, 32-token blocks). Inputs are Gaussian, so
attention is flat: content-aware budgets keep most blocks and the kernel time is near dense; the estimation time,
the quantity measured here, does not depend on the values. Real densities come from the accuracy benchmark (SmolLM2).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sparse_attn import HeadProxy, block_sparse_attention
from sparse_attn.ops import resolve_backend
from sparse_attn.ops.extension import estimate_products, extension_available
from sparse_attn.patterns import SeqContext

from . import common, methods, prefill

NAME = "estimation"

GPU_DEFAULTS = dict(contexts=[16384, 65536, 131072], heads=32, kv_heads=8, head_dim=128, dtype="bf16", block=128)
CPU_DEFAULTS = dict(contexts=[1024, 2048], heads=4, kv_heads=2, head_dim=64, dtype="fp32", block=64)
ESTIMATORS = ("head_proxy", "head_proxy_per_head", "vertical_slash")

TARGET_CONFIG = dict(dtype="bf16", heads=32, kv_heads=8, head_dim=128)
TARGET_CONTEXT = 65536
TARGET = ("head-proxy estimation / dense attention at 64k", "head_proxy", 0.05)
# On a CPU: the shipped plans' estimator (every head its own proxy) at 8k on SmolLM2's shape.
CPU_TARGET_CONFIG = dict(dtype="fp32", heads=9, kv_heads=3, head_dim=64, block=32)
CPU_TARGET_CONTEXT = 8192
CPU_TARGET = ("per-head head-proxy estimation / dense attention at 8k (CPU)", "head_proxy_per_head", 0.10)
INPUTS_NOTE = ("Gaussian q/k/v: attention is flat, so content-aware budgets keep most blocks and the kernel time is "
               "near dense; the estimation time does not depend on the values.")


@dataclass
class Settings:
    contexts: list[int]
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    block: int
    device: str
    estimators: list[str] = field(default_factory=lambda: list(ESTIMATORS))
    backend: str | None = None
    quick: bool = False
    seed: int = 0
    time_budget_s: float | None = None
    timing: dict = field(default_factory=dict)
    table: str | None = None  # the README table the result fills (default: "estimation")
    rounds: int = 0  # rounds of dense and estimation timed back to back for the overhead (0: by device)

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        methods.resolve(self.estimators)
        common.parse_dtype(self.dtype)
        if not self.rounds:
            self.rounds = 2 if self.quick else 7
        if not self.timing:
            if self.quick:
                self.timing = dict(warmup=1, min_iters=2, max_iters=3, target_s=0.05)
            elif self.device == "cpu":
                self.timing = dict(warmup=1, min_iters=3, max_iters=10, target_s=0.2)
            else:
                self.timing = dict(warmup=2, min_iters=3, max_iters=20, target_s=0.5)


class EstimationRun:
    def __init__(self, settings: Settings):
        self.s = settings
        self.device = torch.device(settings.device)
        self.dtype = common.parse_dtype(settings.dtype)
        self.scale = settings.head_dim ** -0.5
        self.deadline = None if settings.time_budget_s is None else time.monotonic() + settings.time_budget_s
        self.results: list[dict] = []
        self.impl = None

    def _reason(self, need_bytes: int = 0) -> str | None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            return "time budget exhausted"
        return common.memory_shortfall(self.device, need_bytes) if need_bytes else None

    def _time(self, fn, need_bytes: int = 0) -> tuple[dict | None, str | None]:
        reason = self._reason(need_bytes)
        if reason is not None:
            return None, reason
        try:
            return common.time_fn(fn, self.device, **self.s.timing).as_dict(), None
        except Exception as exc:  # a backend that cannot run here is a result, not a crash
            common.release_memory(self.device)
            return None, common.error_reason(exc)

    def context(self, context: int) -> None:
        s = self.s
        g = torch.Generator(device=self.device).manual_seed(s.seed + context)
        # [S, H, D] token-major storage (what patterns read); SDPA and the kernel take [1, H, S, D] views of it.
        q_t, k_t, v_t = (torch.randn(context, h, s.head_dim, generator=g, device=self.device, dtype=self.dtype)
                         for h in (s.heads, s.kv_heads, s.kv_heads))
        q, k, v = (t.transpose(0, 1)[None] for t in (q_t, k_t, v_t))
        elem = q.element_size()
        dense_rows = []
        for backend in prefill.SDPA_BACKENDS:
            row = dict(context=context, method="sdpa", impl=backend)
            reason = self._reason(prefill.sdpa_extra_bytes(backend, s.heads, s.kv_heads, context, s.head_dim, elem))
            fn = None
            if reason is None:
                try:
                    fn, row["gqa"] = prefill.sdpa_function(backend, q, k, v, self.scale)
                except RuntimeError as exc:
                    reason = str(exc)[:600]
            timing, reason = (self._time(fn) if reason is None else (None, reason))
            row.update(status="ok", **timing) if timing else row.update(status="skipped", reason=reason, ms=None)
            self.results.append(row)
            dense_rows.append(row)
            fn = None
            common.release_memory(self.device)
        timed = [r for r in dense_rows if r["ms"] is not None]
        best = min(timed, key=lambda r: r["ms"]) if timed else None
        dense_ms = best["ms"] if best else None

        builds: dict[str, tuple[dict, object]] = {}
        for name, candidate in methods.resolve(s.estimators).items():
            pattern = candidate.build()
            row = dict(context=context, method=name, impl=self.impl, pattern=candidate.label,
                       dense_impl=best["impl"] if best else None, dense_ms=dense_ms)
            build = functools.partial(pattern.build_mask, q_lens=context, kv_lens=context, num_heads=s.heads,
                                      q_block_size=s.block, kv_block_size=s.block, q=q_t, k=k_t, scale=self.scale)
            timing, reason = self._time(build)
            if timing is None:
                row.update(status="skipped", reason=reason, ms=None)
                self.results.append(row)
                continue
            row.update(status="ok", estimate_ms=timing["ms"], estimate_ms_min=timing["ms_min"], iters=timing["iters"],
                       ms=timing["ms"])
            if isinstance(pattern, HeadProxy):
                seq = SeqContext(context, context, s.heads, s.block, s.block, True, self.device, q_t, k_t, self.scale)
                scoring, _ = self._time(lambda: pattern.estimate(seq))
                row["scoring_ms"] = scoring["ms"] if scoring else None
            mask = build()
            row["density"] = mask.density()
            kernel, reason = self._time(lambda: block_sparse_attention(q, k, v, mask, causal=True, scale=self.scale,
                                                                       backend=s.backend))
            row["kernel_ms"] = kernel["ms"] if kernel else None
            if kernel is None:
                row["kernel_reason"] = reason
            row["overhead"] = row["estimate_ms"] / dense_ms if dense_ms else None
            builds[name] = (row, build)
            total = row["estimate_ms"] + row["kernel_ms"] if row["kernel_ms"] is not None else None
            row["total_ms"] = total
            row["speedup_vs_dense"] = dense_ms / total if dense_ms and total else None
            self.results.append(row)
            del mask
            common.release_memory(self.device)
        if best is not None and builds and self._reason() is None:
            self._paired_overhead(best["impl"], q, k, v, builds)

    def _paired_overhead(self, impl: str, q, k, v, builds: dict) -> None:
        """``overhead`` as the median over rounds of estimation / dense attention timed back to back (the fastest
        SDPA backend, then each estimator): on a shared machine, medians taken minutes apart can see other loads."""
        dense, _ = prefill.sdpa_function(impl, q, k, v, self.scale)
        ratios: dict[str, list[float]] = {name: [] for name in builds}
        for _ in range(self.s.rounds):
            dense_ms = common.timed_calls(dense, self.device, 1)[0]
            for name, (_, build) in builds.items():
                ratios[name].append(common.timed_calls(build, self.device, 1)[0] / dense_ms)
        for name, (row, _) in builds.items():
            row.update(overhead=statistics.median(ratios[name]), overhead_rounds=self.s.rounds)

    def run(self) -> list[dict]:
        try:
            self.impl = resolve_backend(self.s.backend, self.device)
        except ValueError as exc:
            self.impl = f"unavailable ({exc})"
        for context in common.progress(self.s.contexts, desc="estimation", unit="context"):
            self.context(context)
            common.release_memory(self.device)
        return self.results


def target_checks(settings: dict, device_type: str, results: list[dict]) -> list[dict]:
    config, context, (name, method, bar) = ((TARGET_CONFIG, TARGET_CONTEXT, TARGET) if device_type == "cuda" else
                                            (CPU_TARGET_CONFIG, CPU_TARGET_CONTEXT, CPU_TARGET))
    if any(settings.get(k) != v for k, v in config.items()):
        return []
    row = next((r for r in results if r["method"] == method and r["context"] == context), None)
    if row is None:
        return []
    value = row.get("overhead")
    return [dict(name=name, context=context, metric="overhead", value=value, op="<=", bar=bar,
                 met=value is not None and value <= bar)]


def run(settings: Settings, out_dir: Path | str | None = None, command: str | None = None) -> dict:
    device = torch.device(settings.device)
    payload = {"benchmark": NAME, **common.environment(device, command), "settings": asdict(settings),
               "inputs_note": INPUTS_NOTE}
    payload["settings"]["patterns"] = {n: c.label for n, c in methods.resolve(settings.estimators).items()}
    payload["results"] = EstimationRun(settings).run()
    payload["targets"] = target_checks(payload["settings"], device.type, payload["results"])
    if device.type == "cpu" and extension_available("pooled_block_scores"):
        payload["estimate_products"] = estimate_products(settings.head_dim)
    if settings.table:
        payload["table"] = settings.table
    if out_dir is not None:
        common.write_outputs(out_dir, NAME, payload, markdown(payload))
    return payload


def markdown(payload: dict) -> str:
    s, results = payload["settings"], payload["results"]
    notes: list[str] = []
    lines = ["### Estimation overhead: choosing blocks vs dense attention", "", common.environment_line(payload), "",
             f"Batch 1, {s['heads']} query / {s['kv_heads']} KV heads, head_dim {s['head_dim']}, {s['dtype']}, causal, "
             f"block {s['block']}. Estimation = `build_mask` (scores, selection, block lists); overhead = estimation / "
             "fastest dense SDPA"
             + (f", the median over {s['rounds']} rounds of the two timed back to back" if s.get("rounds") else "")
             + "; speedup = dense / (estimation + block-sparse kernel). " + payload["inputs_note"]
             + (f" Head-proxy scores from {payload['estimate_products']} products." if payload.get("estimate_products")
                else ""), ""]
    rows = []
    for r in results:
        if r["method"] == "sdpa":
            continue
        rows.append([prefill._tokens(r["context"]), r["method"], f"`{r.get('pattern', '')}`",
                     prefill._ms({"ms": r.get("estimate_ms"), "reason": r.get("reason")}, notes),
                     f"{common.fmt(r['scoring_ms'])} ms" if r.get("scoring_ms") is not None else "–",
                     f"{common.fmt(r['dense_ms'])} ms ({r['dense_impl']})" if r.get("dense_ms") else "–",
                     common.pct(r.get("overhead")),
                     f"{common.fmt(r['kernel_ms'])} ms" if r.get("kernel_ms") is not None else "–",
                     common.pct(r.get("density")), prefill._ratio(r.get("speedup_vs_dense"))])
    lines.append(common.markdown_table(
        ["context", "estimator", "setting", "estimation", "scoring alone", "dense (fastest)", "overhead",
         "kernel on its mask", "density", "speedup (est. + kernel)"], rows))
    if payload.get("targets"):
        lines += ["", "Target (METHODS.md):", "", common.markdown_table(
            ["target", "measured", "bar", "met"],
            [[t["name"], common.pct(t["value"]), f"≤ {t['bar']:.0%}", "yes" if t["met"] else "**no**"]
             for t in payload["targets"]])]
    if notes:
        lines += [""] + [f"[{i + 1}] {note}" for i, note in enumerate(notes)]
    return "\n".join(lines)


def settings_from_args(argv: list[str] | None = None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(prog="python -m bench.estimation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--contexts", help="comma-separated context lengths (default: by device)")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS),
                        help=f"comma-separated methods of bench.methods (default {','.join(ESTIMATORS)})")
    common.add_shape_arguments(parser)
    parser.add_argument("--block", type=int, choices=(16, 32, 64, 128))
    parser.add_argument("--backend", help="sparse-attn backend of the kernel (default: auto)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, help="seconds; work after it is recorded as skipped")
    parser.add_argument("--table", help="name of the README table the result fills (results of another machine)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="rounds of dense and estimation timed back to back for the overhead (default 7)")
    args = parser.parse_args(argv)
    device = args.device or common.default_device().type
    defaults = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    settings = Settings(
        **common.options_or_defaults(args, defaults), device=device,
        estimators=[e for e in args.estimators.split(",") if e],
        backend=args.backend, quick=args.quick, seed=args.seed, time_budget_s=args.time_budget,
        table=args.table, rounds=args.rounds,
    )
    return settings, args.out


def main(argv: list[str] | None = None) -> int:
    return common.benchmark_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
