"""The report of `instructune compare`: `summary.json`, four PNG plots and `report.md`.

Everything here reads the summary that `compare.run_study` built from the runs' `metrics.jsonl`, so
the report, the plots and `summary.json` cannot disagree. The short reading of the results is written
from the numbers, with thresholds stated in the code rather than prose fixed in advance.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from instructune.errors import UserError

COLORS = {"before": "tab:gray", "masked": "tab:blue", "unmasked": "tab:orange"}
PLOTS = ("response_loss.png", "instruction_loss.png", "generation.png", "compute.png")
GENERATION_METRICS = (("exact_match", "exact match"), ("contains", "contains the answer"), ("rouge_l", "ROUGE-L"))


def require_matplotlib() -> None:
    """Fail before any training when the plots cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("compare draws plots with matplotlib: pip install 'instructune[plot]'") from None


def write_report(summary: dict[str, Any], output: str | Path) -> list[Path]:
    """Write summary.json, the plots and report.md into `output`; returns the files written."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    _plot_all(summary, output)
    (output / "report.md").write_text(render_markdown(summary), encoding="utf-8")
    return [output / name for name in ("report.md", "summary.json", *PLOTS)]


# ---------------------------------------------------------------------------------------------------
# Plots

def _with_start(summary: dict, name: str, key: str) -> tuple[list[int], list[float]]:
    """A run's eval curve with the base model's value at step 0 in front (both runs start there)."""
    curve = summary["runs"][name]["curve"]
    return [0, *curve["step"]], [summary["before"][key], *curve[key]]


def _plot_all(summary: dict, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    n_eval = summary["eval"]["rows"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name in ("masked", "unmasked"):
        ax.plot(*_with_start(summary, name, "response_loss"), marker="o", color=COLORS[name], label=name)
    ax.set(xlabel="optimizer step", ylabel="loss (nats per response token)",
           title=f"(a) Response-token loss on the {n_eval} eval rows")
    _finish(fig, ax, output / "response_loss.png")

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name in ("masked", "unmasked"):
        ax.plot(*_with_start(summary, name, "instruction_loss"), marker="o", color=COLORS[name],
                label=f"{name}: eval prompts")
        ax.plot(*_with_start(summary, name, "train_instruction_loss"), linestyle="--", color=COLORS[name],
                label=f"{name}: training prompts")
    ax.set(xlabel="optimizer step", ylabel="loss (nats per instruction token)",
           title="(b) Instruction-token loss: does the unmasked run memorise the prompts?")
    _finish(fig, ax, output / "instruction_loss.png")

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    metrics = [(key, label) for key, label in GENERATION_METRICS if summary["before"]["generation"][key] is not None]
    width = 0.27
    for k, name in enumerate(("before", "masked", "unmasked")):
        scores = _generation(summary, name)
        xs = [i + (k - 1) * width for i in range(len(metrics))]
        bars = ax.bar(xs, [scores[key] for key, _ in metrics], width, color=COLORS[name], label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(metrics)), [label for _, label in metrics])
    ax.set(ylim=(0, 1.1), ylabel="share of questions (ROUGE-L: mean F1)",
           title=f"(c) Greedy answers to {summary['before']['generation']['questions']} held-out questions")
    _finish(fig, ax, output / "generation.png", grid_axis="y")

    _plot_compute(summary, output / "compute.png", plt)


def _plot_compute(summary: dict, path: Path, plt) -> None:
    """(d): each run's step times, the paired timing, and the tokens read and scored per step."""
    names = ("masked", "unmasked")
    paired = summary.get("paired_timing")
    fig, axes = plt.subplots(1, 3 if paired else 2, figsize=(14 if paired else 10, 4), dpi=110,
                             gridspec_kw={"width_ratios": [3, 2, 2] if paired else [3, 2]})
    left, right = axes[0], axes[-1]
    for name in names:
        compute = summary["runs"][name]["compute"]
        left.plot(range(1, len(compute["step_s"]) + 1), compute["step_s"], color=COLORS[name], linewidth=1,
                  label=name)
        left.axhline(compute["median_step_s"], color=COLORS[name], linestyle="--", linewidth=1,
                     label=f"{name} median {compute['median_step_s']:.3g} s")
    left.set(xlabel="optimizer step", ylabel="seconds", title="(d) Time per step, as each run logged it")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    if paired:
        middle = axes[1]
        medians = [statistics.median(paired[f"{n}_s"]) for n in names]
        bars = middle.bar([0, 1], medians, 0.6, color=[COLORS[n] for n in names])
        middle.bar_label(bars, fmt="%.3g s", fontsize=8)
        middle.set_xticks([0, 1], names)
        middle.set(ylabel="seconds (median)", title=f"Same batches side by side: masked/unmasked = "
                                                    f"{paired['median_ratio']:.2f}")
        middle.grid(alpha=0.3, axis="y")
    tokens = [summary["runs"][n]["compute"]["tokens_per_step"] for n in names]
    trained = [summary["runs"][n]["compute"]["trained_tokens_per_step"] for n in names]
    read_bars = right.bar([0, 1], tokens, 0.6, color="lightgray", label="input tokens")
    right.bar_label(read_bars, fmt="%.0f", fontsize=8)
    bars = right.bar([0, 1], trained, 0.6, color=[COLORS[n] for n in names], label="trained (scored) tokens")
    right.bar_label(bars, fmt="%.0f", fontsize=8, label_type="center")
    right.set_xticks([0, 1], names)
    right.set(ylabel="tokens per step", title="Tokens per step: read vs scored")
    right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _finish(fig, ax, path: Path, grid_axis: str = "both") -> None:
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3, axis=grid_axis)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _generation(summary: dict, name: str) -> dict:
    return summary["before"]["generation"] if name == "before" else summary["runs"][name]["generation"]


# ---------------------------------------------------------------------------------------------------
# Markdown

def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _inline(text: str) -> str:
    """Template text as inline code, on one line (newlines shown as ⏎)."""
    return "`" + text.replace("\n", "⏎").replace("`", "'") + "`" if text else "none"


def _change(start: float, end: float) -> str:
    """`fell from 2.31 to 1.02 (-56%)`, or `rose ...`."""
    verb = "fell" if end < start else "rose" if end > start else "stayed"
    change = f" ({(end - start) / start:+.0%})" if start else ""
    return f"{verb} from {start:.3f} to {end:.3f}{change}" if verb != "stayed" else f"stayed at {end:.3f}"


def _paired_row(paired: dict | None) -> list[str]:
    if not paired:
        return []
    masked, unmasked = statistics.median(paired["masked_s"]), statistics.median(paired["unmasked_s"])
    return [f"| forward + backward, same batches side by side (median s) | | {masked:.3f} | {unmasked:.3f} |"]


def render_markdown(summary: dict[str, Any]) -> str:
    """The whole report.md text."""
    s, ev, before = summary["settings"], summary["eval"], summary["before"]
    masked, unmasked = summary["runs"]["masked"], summary["runs"]["unmasked"]
    steps = masked["compute"]["steps"]
    lines = [
        "# Masked vs unmasked instruction tuning",
        "",
        f"Two runs of `{s['model']}` from the same initial weights, on the same rows in the same order with the "
        f"same seed: **masked** (`train_on: assistant`, the loss scores only the responses) and **unmasked** "
        f"(`train_on: all`, the loss scores every token but the first). Both were scored on the same "
        f"{ev['rows']} eval rows every {s['eval_every'] or steps} steps, and answered the same "
        f"{before['generation']['questions']} held-out questions greedily before and after training.",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        f"| model | `{s['model']}` |",
        f"| training data | `{s['data']}` |",
        f"| eval rows | {ev['rows']} ({'`' + s['eval_data'] + '`' if s['eval_data'] else 'held out from the training data'}):"
        f" {ev['response_tokens']:,} response tokens, {ev['instruction_tokens']:,} instruction tokens |",
        f"| training prompts tracked | {ev['train_prompt_rows']} training rows, {ev['train_prompt_tokens']:,} "
        "instruction tokens |",
        f"| held-out questions | {before['generation']['questions']} from `{s['heldout']}`, greedy, at most "
        f"{s['max_new_tokens']} new tokens |",
        f"| optimizer steps | {steps} (batch size {s['batch_size']} × grad_accum {s['grad_accum']}, "
        f"max_length {s['max_length']}) |",
        f"| learning rate | {s['lr']:g}, {s['schedule']}, {s['warmup_steps']} warmup steps |",
        f"| seed | {s['seed']} |",
        f"| total time | {_duration(summary['elapsed_s'])} (both runs, evaluations and answers) |",
        "",
        "## Results",
        "",
        "| | before | masked | unmasked |",
        "|---|---:|---:|---:|",
    ]
    final_m, final_u = masked["final"], unmasked["final"]
    rows = [("response loss (eval rows)", "response_loss", _num),
            ("response token accuracy", "response_accuracy", _pct),
            ("instruction loss (eval prompts)", "instruction_loss", _num),
            ("instruction loss (training prompts)", "train_instruction_loss", _num)]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {fmt(before[key])} | {fmt(final_m[key])} | {fmt(final_u[key])} |")
    for key, label in GENERATION_METRICS:
        fmt = _num if key == "rouge_l" else _pct
        lines.append(f"| {label} | {fmt(before['generation'][key])} | {fmt(masked['generation'][key])} "
                     f"| {fmt(unmasked['generation'][key])} |")
    cm, cu = masked["compute"], unmasked["compute"]
    lines += [
        f"| seconds per step (median, as logged) | | {cm['median_step_s']:.3f} | {cu['median_step_s']:.3f} |",
        *_paired_row(summary.get("paired_timing")),
        f"| training time (sum of steps, s) | | {cm['train_s']:.1f} | {cu['train_s']:.1f} |",
        f"| input tokens per step | | {cm['tokens_per_step']:.1f} | {cu['tokens_per_step']:.1f} |",
        f"| trained tokens per step | | {cm['trained_tokens_per_step']:.1f} | {cu['trained_tokens_per_step']:.1f} |",
        "",
        "Losses are the values at the last evaluation (step " + str(masked["curve"]["step"][-1]) + "), read from "
        "each run's `metrics.jsonl`; *before* is the base model.",
        "",
        "## What the numbers say",
        "",
        *[f"- {sentence}" for sentence in reading(summary)],
        "",
        "## Plots",
        "",
        "![response loss](response_loss.png)",
        "",
        "![instruction loss](instruction_loss.png)",
        "",
        "![generation metrics](generation.png)",
        "",
        "![compute](compute.png)",
        "",
    ]
    lines += _examples(summary)
    lines += [
        "## How it was measured",
        "",
        "- **Same start**: SHA-256 of the initial weights, masked `" + masked["initial_weights_sha256"][:16]
        + "…`, unmasked `" + unmasked["initial_weights_sha256"][:16] + "…`"
        + (" (equal)" if summary["checks"]["same_initial_weights"] else " (DIFFERENT)") + "; the rows' tokens and "
        "the batches of every step hash alike" + ("" if summary["checks"]["same_rows_and_order"] else " — NOT") + ".",
        "- **Response loss**: both runs are scored on the eval rows encoded under the masked policy, so the "
        "unmasked run's number is about the responses too.",
        f"- **Instruction tokens**: every token rendered from a system, user or tool message (its role header and "
        f"end marker included), except position 0 and the {ev['shared_prefix_tokens']} tokens that open every row "
        f"alike ({_inline(ev['shared_prefix_text'])}): they are one constant (a default system prompt the template "
        "inserts, the first header), and scoring them would measure how fast it is memorised rather than the "
        "instructions. *Training prompts*: "
        f"{ev['train_prompt_rows']} training rows spread over the data set, scored the same way.",
        "- **Time per step, as logged**: each step's input tokens over its `tokens_per_s`, which times the step "
        "alone (evaluations between steps are left out); the median resists a few slow steps, not a change of load "
        "between the runs. **Side by side**: before the unmasked run trains, its model (still the initial weights) "
        "runs forward and backward on the first steps' batches with the masked and the unmasked labels in turn, "
        "alternating which goes first; the ratio is the median of the pairs' ratios.",
        "- **Generation**: exact match and contains-the-answer compare normalised text (case, spaces, trailing "
        "punctuation); contains looks for the row's `answer` key when it has one; ROUGE-L is the word-level "
        "LCS F1.",
        "- **Files**: `summary.json` (every number), `masked/` and `unmasked/` (each run's `metrics.jsonl`, "
        "`config.yaml` and final checkpoint; the optimizer state is removed to save disk, so the checkpoints "
        "load for inference but cannot be resumed).",
        "",
    ]
    return "\n".join(lines)


def reading(summary: dict[str, Any]) -> list[str]:
    """A few sentences that read the results, each built from the numbers it states."""
    before, masked, unmasked = summary["before"], summary["runs"]["masked"], summary["runs"]["unmasked"]
    fm, fu = masked["final"], unmasked["final"]
    sentences = []
    gap = fu["response_loss"] - fm["response_loss"]
    relative = abs(gap) / min(fm["response_loss"], fu["response_loss"])
    if relative < 0.02:
        outcome = (f"the two end within {abs(gap):.3f} nats per token of each other (under 2%), so by the end "
                   "training on the prompts as well neither helped nor hurt the responses")
    else:
        outcome = f"the {'masked' if gap > 0 else 'unmasked'} run ends {abs(gap):.3f} nats per token ({relative:.0%}) lower"
    outcome += _widest_gap(masked["curve"], unmasked["curve"])
    prompt_share = 1 - summary["ratios"]["trained_tokens_per_step"]
    sentences.append(
        f"**Responses.** On the eval rows the response loss {_change(before['response_loss'], fm['response_loss'])} "
        f"with masking and {_change(before['response_loss'], fu['response_loss'])} without: {outcome}. Both runs "
        f"took the same {masked['compute']['steps']} steps at the same learning rate, but about {prompt_share:.0%} "
        "of the unmasked run's scored tokens were not response tokens.")
    train_drop = (before["train_instruction_loss"] - fu["train_instruction_loss"]) / before["train_instruction_loss"]
    memorised = fu["train_instruction_loss"] < 0.9 * fu["instruction_loss"] and train_drop > 0.2
    verdict = (f"it memorised the prompts it trained on (now {fu['train_instruction_loss']:.3f} there against "
               f"{fu['instruction_loss']:.3f} on eval prompts it never saw)" if memorised else
               "it learned to predict prompts of this kind, but no better on the ones it trained on than on "
               "eval prompts" if train_drop > 0.2 else "it barely learned the prompts")
    sentences.append(
        f"**Instructions.** The unmasked run's instruction loss on training prompts "
        f"{_change(before['train_instruction_loss'], fu['train_instruction_loss'])}: {verdict}. On eval prompts "
        f"it {_change(before['instruction_loss'], fu['instruction_loss'])}. The masked run never trains on these "
        f"tokens: its instruction loss {_change(before['instruction_loss'], fm['instruction_loss'])} on eval prompts "
        f"and {_change(before['train_instruction_loss'], fm['train_instruction_loss'])} on training prompts.")
    gb, gm, gu = before["generation"], masked["generation"], unmasked["generation"]
    n = gb["questions"]
    diff = round((gm["contains"] - gu["contains"]) * n)
    call = ("masked ahead" if diff > 0 else "unmasked ahead") if abs(diff) > 2 else "too few to tell them apart"
    rouge = (f"; ROUGE-L {gb['rouge_l']:.2f} → {gm['rouge_l']:.2f} / {gu['rouge_l']:.2f}"
             if gb["rouge_l"] is not None else "")
    sentences.append(
        f"**Answers.** Contains the expected answer: {gb['contains']:.0%} before, {gm['contains']:.0%} masked, "
        f"{gu['contains']:.0%} unmasked, a difference of {abs(diff)} of {n} questions ({call}); exact match "
        f"{gb['exact_match']:.0%} → {gm['exact_match']:.0%} / {gu['exact_match']:.0%}{rouge}.")
    cm, cu, ratios = masked["compute"], unmasked["compute"], summary["ratios"]
    compute = (f"**Compute.** Both runs read {cm['tokens_per_step']:.0f} input tokens per step, but the masked run "
               f"scored {cm['trained_tokens_per_step']:.0f} of them against {cu['trained_tokens_per_step']:.0f} "
               f"({ratios['trained_tokens_per_step']:.0%}); only the scored positions go through the LM head and the "
               "loss, while the transformer body runs on every token either way.")
    paired = summary.get("paired_timing")
    if paired:
        compute += (f" Timed side by side on the same {paired['pairs']} batches (forward and backward), a masked step "
                    f"took {paired['median_ratio']:.2f}× the time of an unmasked one "
                    f"({_saving(paired['median_ratio'])}).")
    compute += (f" The runs' own median step times were {cm['median_step_s']:.3g} s and {cu['median_step_s']:.3g} s "
                f"(ratio {ratios['median_step_s']:.2f}, optimizer step included)")
    if paired and abs(ratios["median_step_s"] - paired["median_ratio"]) > 0.1:
        compute += ("; they were taken minutes apart, so a change in the machine's load between the runs is in "
                    "that ratio too, which the side-by-side timing cancels")
    sentences.append(compute + ".")
    return sentences


def _widest_gap(masked: dict, unmasked: dict) -> str:
    """`; along the way ...`: where the two response-loss curves were furthest apart, when not at the end."""
    gaps = [(u - m, step) for step, m, u in zip(masked["step"], masked["response_loss"], unmasked["response_loss"])]
    gap, step = max(gaps, key=lambda g: abs(g[0]))
    if step == masked["step"][-1] or not gap:
        return ""
    leader = "masked" if gap > 0 else "unmasked"
    return f"; along the way the {leader} run was ahead, by up to {abs(gap):.3f} at step {step}"


def _saving(ratio: float) -> str:
    return f"{1 - ratio:.0%} less" if ratio < 1 else f"{ratio - 1:.0%} more"


def _examples(summary: dict[str, Any]) -> list[str]:
    answers = summary["answers"][:summary["settings"].get("examples", 8)]
    if not answers:
        return []
    lines = [f"## Example answers (the first {len(answers)} of {len(summary['answers'])} held-out questions)", "",
             "| question | expected | before | masked | unmasked |", "|---|---|---|---|---|"]
    for a in answers:
        cells = [a["question"], a["answer"] or a["reference"], a["before"], a["masked"], a["unmasked"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return [*lines, ""]


def _cell(text: str, width: int = 90) -> str:
    """One table cell: one line, pipes escaped, long answers cut."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"
