"""The plots of `instructune study`: loss curves per arm, gap against weight, answers, compute.

Every plot reads `summary.json`'s numbers (the arms' metrics files), never the runs directly. A line
is the mean over seeds; the shaded band spans the seeds' lowest and highest values.
"""

from __future__ import annotations

import statistics
from pathlib import Path

PLOTS = ("loss_curves.png", "gap_vs_weight.png", "generation.png", "compute.png")


def _colors(weights: list[float]) -> dict[float, str]:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return {w: cmap(0.85 * i / max(len(weights) - 1, 1)) for i, w in enumerate(weights)}


def series(summary: dict, weight: float, key: str, *, generation: bool = False) -> tuple[list, list, list, list]:
    """(epochs from 0, mean, low, high) over seeds of `key` for one weight; epoch 0 is the base model."""
    seeds = summary["settings"]["seeds"]
    arms = [a for a in summary["arms"] if a["weight"] == weight and a["seed"] in seeds]
    start = summary["before"]["generation"][key] if generation else summary["before"][key]
    per_seed = [[start, *[(e["generation"][key] if generation else e[key]) for e in a["epochs"]]] for a in arms]
    columns = list(zip(*per_seed, strict=True))
    return (list(range(len(columns))), [statistics.fmean(c) for c in columns], [min(c) for c in columns],
            [max(c) for c in columns])


def draw_all(summary: dict, output: Path) -> list[Path]:
    """Write the four PNGs into `output`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = summary["settings"]["weights"]
    colors = _colors(weights)
    seeds = len(summary["settings"]["seeds"])
    band = f"mean of {seeds} seeds, band: min-max" if seeds > 1 else "one seed"

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), dpi=100)
    for ax, (held, train, title) in zip(axes, (("response_loss", "train_response_loss", "(a) Response loss"),
                                               ("instruction_loss", "train_instruction_loss",
                                                "(b) Instruction loss")), strict=True):
        for w in weights:
            for key, style, label in ((held, "-", "held-out"), (train, "--", "training")):
                x, mean, low, high = series(summary, w, key)
                ax.plot(x, mean, style, marker="o" if style == "-" else None, color=colors[w],
                        label=f"w={w:g} {label}")
                if seeds > 1:
                    ax.fill_between(x, low, high, color=colors[w], alpha=0.15)
        ax.set(xlabel="epoch (0 = base model)", ylabel="nats per token", title=f"{title}; {band}")
        ax.set_xticks(range(summary["settings"]["epochs"] + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    _save(fig, output / "loss_curves.png", plt)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), dpi=100)
    for ax, key, title in ((axes[0], "gap", "(c) Generalisation gap: held-out minus training response loss"),
                           (axes[1], "instruction_gap", "(d) Held-out minus training instruction loss")):
        means = []
        for w in weights:
            values = [a["epochs"][-1][key] for a in summary["arms"] if a["weight"] == w]
            ax.scatter([w] * len(values), values, color=colors[w], s=25, zorder=3)
            means.append(statistics.fmean(values))
        ax.plot(weights, means, color="black", linewidth=1, label="mean over seeds" if seeds > 1 else "one seed")
        ax.axhline(summary["before"][key], color="gray", linestyle=":", label="base model")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(-0.002, 1.5)
        ax.set_xticks(weights, [f"{w:g}" for w in weights])
        ax.set(xlabel="instruction weight (last epoch)", ylabel="nats per token", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, output / "gap_vs_weight.png", plt)

    metrics = [("contains", "contains the answer"), ("rouge_l", "ROUGE-L F1")]
    metrics = [m for m in metrics if summary["before"]["generation"][m[0]] is not None]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.5), dpi=100, squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics, strict=True):
        for w in weights:
            x, mean, low, high = series(summary, w, key, generation=True)
            ax.plot(x, mean, marker="o", color=colors[w], label=f"w={w:g}")
            if seeds > 1:
                ax.fill_between(x, low, high, color=colors[w], alpha=0.15)
        ax.set(xlabel="epoch (0 = base model)", ylabel=label, ylim=(0, 1.05),
               title=f"(e) {summary['settings']['questions']} held-out questions: {label}")
        ax.set_xticks(range(summary["settings"]["epochs"] + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, output / "generation.png", plt)

    _plot_compute(summary, weights, colors, output / "compute.png", plt)
    return [output / name for name in PLOTS]


def _plot_compute(summary: dict, weights: list[float], colors: dict, path: Path, plt) -> None:
    """(f) tokens read and scored per step, and seconds per step, per weight; (g) the side-by-side timing."""
    paired = summary.get("paired_timing")
    fig, axes = plt.subplots(1, 3 if paired else 2, figsize=(15 if paired else 10, 4.2), dpi=100)
    xs = range(len(weights))
    read = [statistics.fmean(a["compute"]["tokens_per_step"] for a in summary["arms"] if a["weight"] == w)
            for w in weights]
    scored = [statistics.fmean(a["compute"]["head_tokens_per_step"] for a in summary["arms"] if a["weight"] == w)
              for w in weights]
    axes[0].bar(xs, read, 0.6, color="lightgray", label="tokens read")
    bars = axes[0].bar(xs, scored, 0.6, color=[colors[w] for w in weights], label="positions through the LM head")
    axes[0].bar_label(bars, fmt="%.0f", fontsize=8)
    axes[0].set_xticks(list(xs), [f"w={w:g}" for w in weights])
    axes[0].set(ylabel="tokens per step", title="(f) Tokens per step")
    axes[0].legend(fontsize=8)
    for w in weights:
        values = [a["compute"]["median_step_s"] for a in summary["arms"] if a["weight"] == w]
        axes[1].scatter([f"w={w:g}"] * len(values), values, color=colors[w], s=30)
    axes[1].set(ylabel="seconds (median step, as logged)", title="Time per step, each arm on its own")
    axes[1].grid(alpha=0.3, axis="y")
    if paired:
        pairs = range(1, len(paired["masked_s"]) + 1)
        axes[2].plot(pairs, paired["masked_s"], marker="o", color=colors[weights[0]], label="responses scored")
        axes[2].plot(pairs, paired["unmasked_s"], marker="o", color=colors[weights[-1]],
                     label="responses + instructions scored")
        axes[2].set(xlabel="timed step", ylabel="seconds (forward + backward)",
                    title=f"(g) Same batches side by side: ratio {paired['median_ratio']:.2f}")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=8)
    _save(fig, path, plt)


def _save(fig, path: Path, plt) -> None:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
