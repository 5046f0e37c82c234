"""The report of `instructune study`: summary.json, the plots, report.md and a self-contained report.html.

Every table cell is formatted from `summary.json` (which holds the arms' metrics files' numbers), so
the page, the plots and the JSON cannot disagree. The HTML page is the Markdown rendered by a small
converter for the few constructs the report uses, with the plots embedded.
"""

from __future__ import annotations

import base64
import html
import json
import re
import statistics
from pathlib import Path
from typing import Any

from instructune.study.study_plots import PLOTS, draw_all
from instructune.study.verdict import mean_final_by_weight, verdicts


def write_study_report(summary: dict[str, Any], output: str | Path) -> list[Path]:
    """Add the verdicts to `summary`, then write summary.json, the plots, report.md and report.html."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    # The numbers first, so that a failure below still leaves them (the report can be redrawn from them).
    (output / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    summary["verdicts"] = [v.to_dict() for v in verdicts(summary)]
    (output / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    plots = draw_all(summary, output)
    markdown = render_markdown(summary)
    (output / "report.md").write_text(markdown, encoding="utf-8")
    (output / "report.html").write_text(markdown_to_html(markdown, output), encoding="utf-8")
    return [output / "report.html", output / "report.md", output / "summary.json", *plots]


def _n(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def _cell(text: Any, width: int = 80) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def _spread(values: list[float], digits: int = 3) -> str:
    """`0.512` for one seed, `0.512 (0.508-0.517)` for several."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"


def render_markdown(summary: dict[str, Any]) -> str:
    """The whole report.md text."""
    s, regime, ev, before = summary["settings"], summary["regime"], summary["eval"], summary["before"]
    weights, seeds = s["weights"], s["seeds"]
    per_epoch = summary["arms"][0]["steps_per_epoch"]
    lines = [
        "# When does instruction masking help?",
        "",
        f"{len(weights)} instruction weights ({', '.join(f'{w:g}' for w in weights)}) × {s['epochs']} epochs × "
        f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}) of `{s['model']}`, every arm from the same initial "
        f"weights on the same {ev['train_rows']} training rows (the order set by its seed). Weight 0 is masked "
        "training (responses only), weight 1 scores the instruction tokens as much as the responses.",
        "",
        "## Verdict",
        "",
        "| claim | measured | per seed (per timed pair) | verdict | what the papers found |",
        "|---|---|---|---|---|",
    ]
    for v in summary["verdicts"]:
        timed = v["key"] == "compute"
        noise = "one seed: no noise estimate" if v["seeds"] == 1 and not timed else \
            f"spread {v['spread'][0]:+.3f}..{v['spread'][1]:+.3f}"
        threshold = "median pair over 0.03" if timed else f"threshold {v['threshold']:.3f}"
        values = ", ".join(f"{d:+.3f}" for d in v["differences"])
        lines.append(f"| {v['claim']} | {_cell(v['metric'], 200)}: mean {v['mean']:+.3f} ({threshold}); "
                     f"{_cell(v['detail'], 300)} | {'per pair' if timed else 'per seed'}: {values} ({noise}) | "
                     f"**{v['verdict']}** | {_cell(v['papers'], 400)} |")
    lines += [
        "",
        "A positive difference points the way the claim predicts. *supported* / *not supported*: every seed "
        "agrees and the mean exceeds the threshold (1% of the masked arm's loss; for time, the median pair "
        "saves over 3% and three quarters of the pairs agree); otherwise *no difference*.",
        "",
        "## Data regime",
        "",
        f"**{regime['regime']}**: {regime['description']}; rows from `{Path(regime['source']).name}`"
        + (f", held-out rows from `{Path(regime['heldout_source']).name}`"
           if regime["heldout_source"] != regime["source"] else "") + ".",
        "",
        "| set | rows | median instruction chars | median response chars | median ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("train", "heldout"):
        d = regime[name]
        lines.append(f"| {name} | {d['rows']} | {d['median_instruction_chars']} | {d['median_response_chars']} | "
                     f"{d['median_ratio']:.2f} |")
    lines += [
        "",
        f"Scored after every epoch ({per_epoch} steps): the {ev['rows']} held-out rows ({ev['response_tokens']:,} "
        f"response, {ev['instruction_tokens']:,} instruction tokens) and {ev['train_sample_rows']} training rows "
        f"({ev['train_sample_response_tokens']:,} response, {ev['train_sample_instruction_tokens']:,} instruction "
        f"tokens); {s['questions']} held-out questions answered greedily (at most {s['max_new_tokens']} tokens). "
        f"Batch size {s['batch_size']} × grad_accum {s['grad_accum']}, lr {s['lr']:g} ({s['schedule']}, "
        f"{s['warmup_steps']} warmup steps), max_length {s['max_length']}. Total time "
        f"{summary['elapsed_s'] / 60:.1f} min.",
        "",
        "## Results at the last epoch",
        "",
        "Mean over seeds (lowest..highest in brackets).",
        "",
        "| weight | held-out response loss | training response loss | gap | held-out instruction loss | "
        "training instruction loss | contains the answer | ROUGE-L | head positions / tokens read per step | "
        "median step s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| base model | {_n(before['response_loss'])} | {_n(before['train_response_loss'])} | {_n(before['gap'])} | "
        f"{_n(before['instruction_loss'])} | {_n(before['train_instruction_loss'])} | "
        f"{_n(before['generation']['contains'], 2)} | {_n(before['generation']['rouge_l'], 2)} | | |",
    ]
    for w in weights:
        arms = [a for a in summary["arms"] if a["weight"] == w]
        last = [a["epochs"][-1] for a in arms]
        cells = [_spread([e[k] for e in last]) for k in ("response_loss", "train_response_loss", "gap",
                                                          "instruction_loss", "train_instruction_loss")]
        contains = _spread([e["generation"]["contains"] for e in last], 2)
        rouge = _spread([e["generation"]["rouge_l"] for e in last], 2) if last[0]["generation"]["rouge_l"] is not None \
            else "—"
        scored = statistics.fmean(a["compute"]["head_tokens_per_step"] for a in arms)
        read = statistics.fmean(a["compute"]["tokens_per_step"] for a in arms)
        step = _spread([a["compute"]["median_step_s"] for a in arms])
        lines.append(f"| {w:g} | {' | '.join(cells)} | {contains} | {rouge} | {scored:.0f} / {read:.0f} | {step} |")
    paired = summary.get("paired_timing")
    lines += [""]
    if paired:
        lines += [f"Side by side on the same {paired['pairs']} batches (forward + backward, alternating which goes "
                  f"first): scoring the responses only took {paired['median_ratio']:.2f}× the time of scoring "
                  f"responses and instructions (per pair: {', '.join(f'{m / u:.2f}' for m, u in zip(paired['masked_s'], paired['unmasked_s']))}).",
                  ""]
    means = mean_final_by_weight(summary, "response_loss")
    best = min(means, key=means.get)
    lines += [f"Lowest held-out response loss at the last epoch: weight {best:g} ({means[best]:.3f}; weight 0: "
              f"{means[0.0]:.3f}).", ""]
    lines += ["## Per epoch", "", "| seed | weight | epoch | held-out response | training response | gap | "
              "held-out instruction | training instruction | contains |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for a in summary["arms"]:
        for e in a["epochs"]:
            lines.append(f"| {a['seed']} | {a['weight']:g} | {e['epoch']} | {_n(e['response_loss'])} | "
                         f"{_n(e['train_response_loss'])} | {_n(e['gap'])} | {_n(e['instruction_loss'])} | "
                         f"{_n(e['train_instruction_loss'])} | {_pct(e['generation']['contains'])} |")
    lines += ["", "## Plots", ""]
    lines += [f"![{name[:-4].replace('_', ' ')}]({name})\n" for name in PLOTS]
    lines += _answers(summary)
    lines += [
        "## How it was measured",
        "",
        f"- **Same start**: every arm's initial weights hash alike ({'yes' if summary['checks']['same_initial_weights'] else 'NO'}); "
        f"the training rows' tokens ({'yes' if summary['checks']['same_rows'] else 'NO'}) and held-out rows "
        f"({'yes' if summary['checks']['same_eval_rows'] else 'NO'}) are equal for every arm, and the batches of every "
        f"step are equal within a seed ({'yes' if summary['checks']['same_order_within_seed'] else 'NO'}).",
        "- **Response loss**: token-normalised loss over the response tokens (the masked labels) of the held-out "
        "rows, and of a fixed sample of training rows; the gap is their difference.",
        f"- **Instruction loss**: the same rows labelled on their instruction tokens (the positions an instruction "
        f"weight scores), leaving out the first {ev['shared_prefix_tokens']} tokens that open every row alike "
        f"(`{ev['shared_prefix_text'][:80].replace(chr(10), '⏎').replace('`', chr(39))}`).",
        "- **Time**: each arm's median step (its input tokens over its `tokens_per_s`); arms run minutes apart, so "
        "load changes are in those; the side-by-side timing cancels them.",
        "- **Files**: `summary.json` (every number), `seed*/w*/metrics.jsonl` and `answers.jsonl` (each arm), "
        "`data/` (the regime's rows).",
        "",
    ]
    return "\n".join(lines)


def _answers(summary: dict) -> list[str]:
    """The first questions with the base model's and each weight's last-epoch answer (the first seed)."""
    shown = summary["answers"][:summary["settings"]["examples"]]
    if not shown:
        return []
    seed = summary["settings"]["seeds"][0]
    weights = summary["settings"]["weights"]
    finals = {a["weight"]: a["final_answers"] for a in summary["arms"] if a["seed"] == seed}
    lines = [f"## Answers side by side (seed {seed}, last epoch; the first {len(shown)} of "
             f"{len(summary['answers'])} questions)", "",
             "| question | expected | base model | " + " | ".join(f"w={w:g}" for w in weights) + " |",
             "|---|---|---|" + "---|" * len(weights)]
    for i, a in enumerate(shown):
        cells = [a["question"], a["answer"] or a["reference"], a["before"], *[finals[w][i] for w in weights]]
        lines.append("| " + " | ".join(_cell(c, 120) for c in cells) + " |")
    return [*lines, ""]


# ---------------------------------------------------------------------------------------------------
# HTML

def _inline_html(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    return re.sub(r"(?<![\w*])\*(\S.*?)\*(?![\w*])", r"<i>\1</i>", text)


def _row_cells(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def markdown_to_html(markdown: str, folder: Path) -> str:
    """The report's Markdown as one HTML page, its images embedded (the subset of Markdown it uses)."""
    body: list[str] = []
    lines = markdown.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline_html(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            alt, name = re.match(r"!\[(.*)\]\((.*)\)", line).groups()
            data = base64.b64encode((folder / name).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("| "):
            table = []
            while i < len(lines) and lines[i].startswith("|"):
                table.append(lines[i])
                i += 1
            head, rows = _row_cells(table[0]), [_row_cells(t) for t in table[2:]]
            body.append("<table><tr>" + "".join(f"<th>{_inline_html(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in rows)
                        + "</table>")
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline_html(lines[i][2:])}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            body.append(f"<p>{_inline_html(line)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:4px 6px;"
             "vertical-align:top}th{background:#f3f3f3}img{max-width:100%}code{background:#f5f5f5}")
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>instructune study</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
