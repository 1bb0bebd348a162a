"""PNG plots from stored benchmark results (matplotlib, Agg backend): speed vs context as ratios to dense, and
accuracy vs density. Like the markdown tables, plots are made from the JSON, never from numbers typed in.

    python -m bench.plots DIR        # DIR/<benchmark>.png for every result file with a plot

PLOTTERS maps a result file's ``benchmark`` name to the function that draws it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import common


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _context_axis(ax, contexts) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(set(contexts))
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{c // 1024}k" if c >= 1024 and c % 1024 == 0 else str(c) for c in ticks])
    ax.minorticks_off()
    ax.set_xlabel("context (tokens)")


def _ratio_panel(ax, series: dict[str, list[tuple[float, float]]], title: str, ylabel: str) -> None:
    """Lines of (context, ratio) per label, and the dense level (1x)."""
    contexts = [x for points in series.values() for x, _ in points]
    for label, points in series.items():
        points = sorted(p for p in points if p[1] is not None)
        if points:
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="dense (1x)")
    if contexts:
        _context_axis(ax, contexts)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def _figure(panels: int, title: str, payload: dict):
    plt = _pyplot()
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False)
    device = payload.get("device", {}).get("name", "")
    commit = (payload.get("commit", {}).get("sha") or "")[:10]
    fig.suptitle(f"{title}\n{device} · commit {commit or 'unknown'}", fontsize=10)
    return plt, fig, axes[0]


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_prefill(payload: dict, path: Path) -> Path | None:
    rows = [r for r in payload["results"] if r["method"] == "sparse_attn" and r.get("speedup_vs_sdpa")]
    if not rows:
        return None
    series: dict[str, list] = {}
    for r in rows:
        series.setdefault(f"density {r['density_target']:.0%}", []).append((r["context"], r["speedup_vs_sdpa"]))
    plt, fig, (ax,) = _figure(1, "Block-sparse prefill kernel: speedup vs fastest dense SDPA", payload)
    _ratio_panel(ax, series, "sparse-attn kernel", "speedup vs dense (x)")
    return _save(plt, fig, path)


def plot_decode(payload: dict, path: Path) -> Path | None:
    rows = [r for r in payload["results"] if r["method"] in ("double_sparsity", "kv_pruning", "sparse_attn_dense")
            and r.get("speedup_vs_dense")]
    if not rows:
        return None
    batches = sorted({r["batch"] for r in rows})
    plt, fig, axes = _figure(len(batches), "Decode step: speedup vs best dense decode", payload)
    for ax, batch in zip(axes, batches):
        series: dict[str, list] = {}
        for r in rows:
            if r["batch"] == batch:
                label = r["method"] + (f" {r['sparsity']:.0%}" if r["method"] == "kv_pruning" else "")
                series.setdefault(label, []).append((r["context"], r["speedup_vs_dense"]))
        _ratio_panel(ax, series, f"batch {batch}", "speedup vs dense (x)")
    return _save(plt, fig, path)


def plot_estimation(payload: dict, path: Path) -> Path | None:
    rows = [r for r in payload["results"] if r["method"] != "sdpa" and r.get("overhead") is not None]
    if not rows:
        return None
    plt, fig, axes = _figure(2, "Block estimation: cost vs dense attention", payload)
    overhead, speed = {}, {}
    for r in rows:
        overhead.setdefault(r["method"], []).append((r["context"], 100 * r["overhead"]))
        speed.setdefault(r["method"], []).append((r["context"], r.get("speedup_vs_dense")))
    ax = axes[0]
    for label, points in overhead.items():
        points.sort()
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    ax.axhline(5.0, color="red", linestyle=":", linewidth=1, label="target 5% (head-proxy, 64k, GPU)")
    _context_axis(ax, [r["context"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("estimation time / dense attention (%)")
    ax.set_title("estimation overhead", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _ratio_panel(axes[1], speed, "estimation + kernel vs dense", "speedup vs dense (x)")
    return _save(plt, fig, path)


def plot_e2e_hf(payload: dict, path: Path) -> Path | None:
    rows = [r for r in payload.get("results", []) if r["method"] != "dense" and r.get("ttft_speedup_vs_dense")]
    if not rows:
        return None
    series: dict[str, list] = {}
    for r in rows:
        series.setdefault(r["method"], []).append((r["context"], r["ttft_speedup_vs_dense"]))
    plt, fig, (ax,) = _figure(1, "transformers prefill (TTFT): speedup vs SDPA", payload)
    _ratio_panel(ax, series, f"{payload['settings']['layers']}-layer random-weight model", "TTFT speedup (x)")
    return _save(plt, fig, path)


def plot_e2e_vllm(payload: dict, path: Path) -> Path | None:
    rows = [r for r in payload.get("results", []) if r["method"] != "dense" and r.get("vs_dense")]
    if not rows:
        return None
    plt, fig, axes = _figure(3, "vLLM serving (SmolLM2-135M): ratio to vLLM's own backend", payload)
    for ax, key, title in ((axes[0], "ttft_speedup", "time to first token"), (axes[1], "tpot_speedup", "time per output token"),
                           (axes[2], "tokens_per_s_ratio", "output tokens / s")):
        series: dict[str, list] = {}
        for r in rows:
            series.setdefault(r["method"], []).append((r["context"], r["vs_dense"].get(key)))
        _ratio_panel(ax, series, title, "ratio to dense (> 1: better)")
    return _save(plt, fig, path)


def plot_accuracy(payload: dict, path: Path) -> Path | None:
    summary = payload.get("summary") or {}
    if not summary:
        return None
    plt, fig, axes = _figure(3, "SmolLM2-135M prefill accuracy vs density", payload)
    panels = ((axes[0], "recall_density", "recall", "attention-mass recall", 1.0),
              (axes[1], "passkey_density", "passkey_success", "passkey found (fraction)", 1.0),
              (axes[2], "perplexity_density", "perplexity_change", "perplexity change vs dense (%)", 100.0))
    markers = "osD^v<>P*X"
    for ax, xkey, ykey, ylabel, scale in panels:
        for i, (name, e) in enumerate(summary.items()):
            if e.get(xkey) is None or e.get(ykey) is None:
                continue
            # Methods often coincide (e.g. at 100% density): distinct markers, hollow, stay visible on top of each other.
            ax.scatter([100 * e[xkey]], [scale * e[ykey]], s=90 - 12 * i, marker=markers[i % len(markers)],
                       facecolors="none", edgecolors=f"C{i}", linewidths=1.8, label=name)
        if ykey == "passkey_success":
            ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("density (% of the causal block area kept)")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, 105)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _memory_label(row: dict) -> str:
    if row["method"] == "double_sparsity":
        return f"Double Sparsity\nr={row['r']}, {row['label_bits']}-bit"
    if row["method"] == "kv_pruning":
        return f"KV pruning\n{row['sparsity']:.0%}"
    return row["method"]


def plot_memory(payload: dict, path: Path) -> Path | None:
    rows = payload.get("results", [])
    if not rows:
        return None
    plt, fig, axes = _figure(len(payload["models"]), "KV-cache bytes per token (ratio to dense above each bar)", payload)
    for ax, (model, shape) in zip(axes, payload["models"].items()):
        largest = max(r["context"] for r in rows if r["model"] == model)
        chosen = [r for r in rows if r["model"] == model and r["context"] == largest]
        labels = [_memory_label(r) for r in chosen]
        values = [r["bytes_per_token"] / 1024 for r in chosen]
        bars = ax.bar(range(len(chosen)), values)
        for bar, r in zip(bars, chosen):
            ax.annotate(f"{r['ratio_to_dense']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(chosen)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("KiB per token (all layers)")
        ax.set_title(f"{shape['label']} at {largest} tokens", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    return _save(plt, fig, path)


PLOTTERS = {"prefill": plot_prefill, "decode": plot_decode, "estimation": plot_estimation, "e2e_hf": plot_e2e_hf,
            "e2e_vllm": plot_e2e_vllm, "accuracy": plot_accuracy, "memory": plot_memory}


def plot_file(path: Path | str) -> Path | None:
    """The PNG beside a result file (``x.json`` -> ``x.png``), or None when it has nothing to plot."""
    path = Path(path)
    payload = common.read_json(path)
    plotter = PLOTTERS.get(payload.get("benchmark"))
    if plotter is None or payload.get("status") == "skipped":
        return None
    return plotter(payload, path.with_suffix(".png"))


def plot_dir(results_dir: Path | str) -> list[Path]:
    return [p for p in (plot_file(path) for path in sorted(Path(results_dir).glob("*.json"))) if p is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", type=Path)
    args = parser.parse_args(argv)
    for path in plot_dir(args.results_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
