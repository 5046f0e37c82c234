"""`instructune eval`: how well a model (base, checkpoint or adapter) answers a dataset.

Two passes over the same rows:

1. **Loss**: every row is encoded as training encodes it, and the response tokens are scored:
   the response-only loss (token-level mean over all rows), its perplexity `exp(loss)`, and the token
   accuracy (how often the model's most likely next token is the reference token).
2. **Generation** (the rows that end with an assistant turn): the conversation
   without that turn, plus the generation prompt, is answered greedily in batches and compared with
   the turn it left out: exact match, contains-the-answer (the row's `answer` key when it has one)
   and ROUGE-L (see `instructune.use.text_metrics`).

`--limit N` evaluates the first N rows of the dataset only, in both passes. Per-row results go to `rows.jsonl` and the totals to `totals.json` under `--output`; the totals are
also printed as a table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from instructune.data.conversation import Conversation
from instructune.data.options import DEFAULT_ENCODING, EncodingOptions
from instructune.errors import UserError

DEFAULT_EVAL_DATA = "default_qa/heldout.jsonl"
"""Inside the package's resources: the held-out questions of the built-in data set."""


@dataclass
class RowResult:
    """What eval found for one row of the dataset."""

    row: int
    """The row's index in the source (0-based, counting every row read)."""
    prompt: str = ""
    """The last instruction (user turn) of the row, for reading the results."""
    loss: float | None = None
    """Mean -ln p over the row's response tokens; None when the row was dropped."""
    tokens: int = 0
    """Response tokens scored."""
    correct: int = 0
    """Of those, how many were the model's most likely token."""
    dropped: str | None = None
    """Why the row could not be encoded (it is then left out of the loss), if it could not."""
    reference: str | None = None
    prediction: str | None = None
    """The generated answer; None when the row was not generated for."""
    answer: str | None = None
    """The row's short answer key, when it has one."""
    exact_match: bool | None = None
    contains: bool | None = None
    rouge_l: float | None = None


@dataclass
class EvalTotals:
    """The dataset's totals: loss over every scored token, generation metrics over generated rows."""

    rows: int = 0
    rows_scored: int = 0
    rows_dropped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    loss: float | None = None
    """Token-level mean of -ln p over every response token of every scored row."""
    perplexity: float | None = None
    token_accuracy: float | None = None
    generated: int = 0
    exact_match: float | None = None
    contains: float | None = None
    rouge_l: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The totals as a plain dict."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# Reading

def default_eval_data() -> str:
    """The path of the built-in held-out set."""
    from importlib import resources

    return str(resources.files("instructune") / "resources" / DEFAULT_EVAL_DATA)


def answer_keys(source: str, limit: int | None = None) -> dict[int, str]:
    """The `answer` key of every row that has one, by row index (the same index `read_conversations` gives);
    only the first `limit` rows when it is given."""
    from instructune.data.sources import iter_rows

    keys = {}
    for index, raw in enumerate(iter_rows(source)):
        if limit is not None and index >= limit:
            break
        record = raw.record
        if isinstance(record, dict) and isinstance(record.get("answer"), str) and record["answer"].strip():
            keys[index] = record["answer"]
    return keys


def _last_user_text(conv: Conversation) -> str:
    users = [m.content for m in conv.messages if m.role == "user"]
    return users[-1] if users else (conv.text or "")[:200]


# ---------------------------------------------------------------------------------------------------
# The two passes

def score_rows(model, encoded: list, *, pad_token_id: int, batch_size: int,
               advance: Callable[[int], None] | None = None) -> list[tuple[float, int, int]]:
    """(Σ -ln p, targets, correct) over the trained tokens of each encoded row, in batches of similar length."""
    from instructune import IGNORE_INDEX
    from instructune.use.scoring import score_batch

    results: list[tuple[float, int, int]] = [(0.0, 0, 0)] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        rows = [encoded[i].input_ids for i in chosen]
        positions = [[p for p, label in enumerate(encoded[i].labels) if p > 0 and label != IGNORE_INDEX]
                     for i in chosen]
        for i, scores in zip(chosen, score_batch(model, rows, positions, pad_token_id=pad_token_id)):
            results[i] = (-math.fsum(scores.log_probs), len(scores.log_probs), sum(scores.correct))
        if advance is not None:
            advance(len(chosen))
    return results


def generate_answers(loaded, conversations: list[Conversation], *, max_new_tokens: int, batch_size: int,
                     advance: Callable[[int], None] | None = None) -> list[str]:
    """Greedy answers to each conversation without its last assistant turn, decoded and stripped."""
    from instructune.use.generation import answer_conversations

    return answer_conversations(loaded, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                on_batch=advance)


def evaluate_dataset(loaded, data: str, options: EncodingOptions = DEFAULT_ENCODING, *,
                     limit: int | None = None, max_new_tokens: int = 64, batch_size: int = 8,
                     generate: bool = True, progress=None) -> tuple[list[RowResult], EvalTotals]:
    """Score every row's response tokens and, unless `generate` is False, answer each row; only the first
    `limit` rows of `data` when it is given (both passes).

    The rows are read and encoded by `prepare_dataset`, as training prepares them, with the model's
    template (`loaded.template`, which `options.template` chose when loading), so the rows scored and
    the drops counted are training's. There is one result per row read, dropped rows with their
    reason. `progress` is an optional `rich.progress.Progress` that gets one task per pass.
    """
    from instructune.data.prepare import prepare_dataset
    from instructune.use.text_metrics import contains_answer, exact_match, rouge_available, rouge_l

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    # Serially and uncached, as eval always encoded: no worker processes forked from one that holds
    # a model, and no cache entries for sets that are scored once.
    prepared = prepare_dataset(data, loaded.tokenizer, options, template_text=loaded.template, num_proc=1,
                               cache_dir=False, limit=limit)
    report = prepared.report
    keys = answer_keys(data, limit)
    conversations = dict(prepared.conversations)
    by_row = {index: RowResult(row=index, prompt=_last_user_text(conv))
              for index, conv in conversations.items()}
    for index, reason in report.drops:
        by_row.setdefault(index, RowResult(row=index)).dropped = reason  # a bad row has no conversation
    results = [by_row[index] for index in sorted(by_row)]
    totals = EvalTotals(rows=report.rows_read, rows_dropped=dict(report.dropped))

    task = progress.add_task("scoring responses", total=len(prepared.rows)) if progress is not None else None
    advance = (lambda n: progress.advance(task, n)) if progress is not None else None
    scored = score_rows(loaded.model, prepared.rows, pad_token_id=loaded.pad_token_id, batch_size=batch_size,
                        advance=advance)
    loss_sum = 0.0
    for encoded, (row_loss, n, correct) in zip(prepared.rows, scored):
        result = by_row[encoded.row]
        result.loss, result.tokens, result.correct = row_loss / n if n else None, n, correct
        loss_sum += row_loss
        totals.tokens += n
        totals.rows_scored += 1
    correct_total = sum(r.correct for r in results)
    if totals.tokens:
        totals.loss = loss_sum / totals.tokens
        totals.perplexity = math.exp(totals.loss) if totals.loss < 700 else math.inf
        totals.token_accuracy = correct_total / totals.tokens

    if generate:
        chosen = [index for index, conv in conversations.items()
                  if not conv.is_text and conv.messages and conv.messages[-1].role == "assistant"]
        task = progress.add_task("generating", total=len(chosen)) if progress is not None else None
        advance = (lambda n: progress.advance(task, n)) if progress is not None else None
        answers = generate_answers(loaded, [conversations[index] for index in chosen],
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, advance=advance)
        with_rouge = rouge_available()
        for index, prediction in zip(chosen, answers):
            result = by_row[index]
            result.reference = conversations[index].messages[-1].content
            result.prediction = prediction
            result.answer = keys.get(result.row)
            result.exact_match = exact_match(prediction, result.reference)
            result.contains = contains_answer(prediction, result.reference, result.answer)
            result.rouge_l = rouge_l(prediction, result.reference) if with_rouge else None
        totals.generated = len(chosen)
        if chosen:
            generated = [by_row[index] for index in chosen]
            totals.exact_match = sum(r.exact_match for r in generated) / len(generated)
            totals.contains = sum(r.contains for r in generated) / len(generated)
            if with_rouge:
                totals.rouge_l = math.fsum(r.rouge_l for r in generated) / len(generated)
    return results, totals


# ---------------------------------------------------------------------------------------------------
# Showing and writing

def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def totals_table(totals: EvalTotals):
    """The totals as a rich table of metric/value rows."""
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    dropped = sum(totals.rows_dropped.values())
    detail = ", ".join(f"{n} {reason}" for reason, n in sorted(totals.rows_dropped.items()))
    table.add_row("rows", f"{totals.rows:,}")
    table.add_row("rows scored", f"{totals.rows_scored:,}" + (f" ({dropped} dropped: {detail})" if dropped else ""))
    table.add_row("response tokens", f"{totals.tokens:,}")
    table.add_row("response loss", _fmt(totals.loss))
    table.add_row("perplexity", _fmt(totals.perplexity, 3))
    table.add_row("token accuracy", _fmt(totals.token_accuracy))
    if totals.generated:
        table.add_row("rows generated", f"{totals.generated:,}")
        table.add_row("exact match", _fmt(totals.exact_match))
        table.add_row("contains the answer", _fmt(totals.contains))
        table.add_row("ROUGE-L (F1)", _fmt(totals.rouge_l))
    return table


def write_results(output: str | Path, results: list[RowResult], totals: EvalTotals, meta: dict[str, Any]) -> None:
    """Write `rows.jsonl` (one object per row) and `totals.json` (the totals and `meta`) into `output`."""
    from instructune.show.jsonl import atomic_writer

    folder = Path(output)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {folder}: {error.strerror or error}") from None
    with atomic_writer(folder / "rows.jsonl") as file:
        for result in results:
            file.write(json.dumps(asdict(result), ensure_ascii=False) + "\n")
    with atomic_writer(folder / "totals.json") as file:
        json.dump({**meta, **totals.to_json()}, file, ensure_ascii=False, indent=2)
        file.write("\n")
