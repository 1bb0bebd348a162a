"""A plan as a picture: per (layer, head) the chosen pattern (colour) and its expected density (number), beside
a density heat map. Needs matplotlib (the ``bench`` extra)."""

from __future__ import annotations

import os

from .plan import PATTERNS, Plan

__all__ = ["render_plan"]

# One fixed colour per pattern family, so pictures of different plans compare at a glance.
_COLOURS = {"Dense": "#4d4d4d", "AShape": "#1f77b4", "ElasticSpan": "#17becf", "Strided": "#bcbd22",
            "VerticalSlash": "#ff7f0e", "TopKBlocks": "#9467bd", "HeadProxy": "#2ca02c"}


def render_plan(plan: Plan, path: str | os.PathLike, title: str | None = None, dpi: int = 120) -> None:
    """Write a PNG of ``plan`` to ``path``: layers are rows, query heads columns."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    names = [n for n in PATTERNS if n in plan.pattern_counts()]
    code = {n: i for i, n in enumerate(names)}
    layers, heads = plan.shape.num_layers, plan.shape.num_heads
    kinds = [[code[s.pattern] for s in row] for row in plan.heads]
    density = [[s.density if s.density is not None else float("nan") for s in row] for row in plan.heads]

    height = max(3.0, 0.22 * layers + 1.5)
    fig, (ax_kind, ax_density) = plt.subplots(1, 2, figsize=(2 * max(3.0, 0.45 * heads) + 3, height),
                                              gridspec_kw={"width_ratios": [1, 1]}, constrained_layout=True)
    ax_kind.imshow(kinds, cmap=ListedColormap([_COLOURS.get(n, "#7f7f7f") for n in names]), aspect="auto",
                   vmin=-0.5, vmax=len(names) - 0.5, interpolation="nearest")
    for i, row in enumerate(density):
        for h, d in enumerate(row):
            if d == d:  # not NaN
                ax_kind.text(h, i, f"{d:.2f}"[1:] if d < 1 else "1", ha="center", va="center", fontsize=6, color="white")
    ax_kind.set_title("pattern per head (number: density)")
    fig.legend(handles=[Patch(color=_COLOURS.get(n, "#7f7f7f"), label=f"{n} ({plan.pattern_counts()[n]} heads)")
                        for n in names], loc="outside lower center", ncol=min(len(names), 4), fontsize=8, frameon=False)
    image = ax_density.imshow(density, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax_density, label="expected density")
    ax_density.set_title("density per head")
    for ax in (ax_kind, ax_density):
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(heads))
        ax.set_yticks(range(0, layers, max(1, layers // 16)))
    mean_density, mean_recall = plan.mean("density"), plan.mean("recall")
    summary = [plan.model_id]
    if mean_density is not None:
        summary.append(f"mean density {mean_density:.3f}")
    if mean_recall is not None:
        summary.append(f"mean recall {mean_recall:.3f}")
    fig.suptitle(title or " | ".join(summary))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
