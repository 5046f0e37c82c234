"""The data regimes of `instructune study`: which rows train and which are held out.

The papers this study tests found that scoring the instruction helps under particular conditions:
long instructions with short answers, or few examples (Shi et al., 2024), and that a small
instruction weight wins on short completions (Huerta-Enochian & Ko, 2024). A regime picks such rows
out of any data set by its own lengths (characters of the system and user messages against those of
the final response), so the same conditions can be built from the user's data or the packaged sets:

- `as_is`: the rows in their order, shuffled by the study's data seed;
- `long_instruction`: the rows with the highest instruction/response length ratio;
- `long_response`: the rows with the lowest ratio.

`--rows N` keeps N training rows (the few-examples condition). The chosen rows are written, as read,
to `OUTPUT_DIR/data/train.jsonl` and `heldout.jsonl`, so every arm reads the same files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from instructune.errors import UserError

REGIMES = {
    "as_is": "the rows as they are (shuffled)",
    "long_instruction": "long instructions, short answers (highest instruction/response length ratio)",
    "long_response": "short instructions, long answers (lowest instruction/response length ratio)",
}
"""Regime name -> what it keeps."""

DATA_SEED = 1234
"""Shuffles the rows before a regime picks them: fixed, so every seed of the study uses the same rows."""


@dataclass
class RowLengths:
    """One usable row of the source: where it is and how long its parts are (characters)."""

    index: int
    instruction: int
    response: int

    @property
    def ratio(self) -> float:
        """Instruction length over response length (a response is never empty)."""
        return self.instruction / max(self.response, 1)


@dataclass
class RegimeData:
    """The rows a regime chose, written to files the arms train and evaluate on."""

    regime: str
    source: str
    heldout_source: str
    train_file: Path
    heldout_file: Path
    train: list[RowLengths]
    heldout: list[RowLengths]

    def describe(self) -> dict:
        """Counts and median lengths, for the report."""
        def medians(rows: list[RowLengths]) -> dict:
            ordered = sorted(rows, key=lambda r: r.ratio)
            return {"rows": len(rows),
                    "median_instruction_chars": sorted(r.instruction for r in rows)[len(rows) // 2],
                    "median_response_chars": sorted(r.response for r in rows)[len(rows) // 2],
                    "median_ratio": ordered[len(rows) // 2].ratio}
        return {"regime": self.regime, "description": REGIMES[self.regime], "source": self.source,
                "heldout_source": self.heldout_source, "train": medians(self.train),
                "heldout": medians(self.heldout)}


def row_lengths(source: str, data_format: str | None = None, on_bad_row: str = "error") -> list[RowLengths]:
    """Every row of `source` that ends with an assistant turn, with its instruction and response lengths."""
    from instructune.data.readers import read_conversations

    rows = []
    for index, conv in read_conversations(source, data_format=data_format, on_bad_row=on_bad_row).conversations:
        if conv.is_text or not conv.messages or conv.messages[-1].role != "assistant":
            continue
        instruction = sum(len(m.content or "") for m in conv.messages[:-1] if m.role in ("system", "user"))
        rows.append(RowLengths(index, instruction, len(conv.messages[-1].content or "")))
    if not rows:
        raise UserError(f"{source}: no row ends with an assistant turn; the study needs responses to score")
    return rows


def ranked(rows: list[RowLengths], regime: str) -> list[RowLengths]:
    """The rows in the order the regime takes them: shuffled by `DATA_SEED`, then sorted by ratio."""
    if regime not in REGIMES:
        raise UserError(f"--regime must be one of {', '.join(REGIMES)}, got {regime!r}")
    shuffled = list(rows)
    random.Random(DATA_SEED).shuffle(shuffled)
    if regime == "long_instruction":
        shuffled.sort(key=lambda r: -r.ratio)  # stable: ties keep the shuffled order
    elif regime == "long_response":
        shuffled.sort(key=lambda r: r.ratio)
    return shuffled


def build_regime(regime: str, source: str, output: Path, *, heldout_source: str | None = None,
                 rows: int | None = None, heldout_rows: int = 32, data_format: str | None = None,
                 on_bad_row: str = "error") -> RegimeData:
    """Choose the regime's training and held-out rows and write them to `output/train.jsonl`, `heldout.jsonl`.

    With one source, evenly spaced rows of the regime's ranking are held out (`_split`), so both sets
    span the same range of ratios; with `heldout_source` the held-out rows are the first of that
    source's own ranking. Rows are written in ranking order.
    """
    for name, value, least in (("--rows", rows, 1), ("--heldout-rows", heldout_rows, 1)):
        if value is not None and value < least:
            raise UserError(f"{name} must be at least {least}, got {value}")
    order = ranked(row_lengths(source, data_format, on_bad_row), regime)
    if heldout_source is None:
        train, heldout = _split(order, rows, heldout_rows, source)
    else:
        train = order[:rows] if rows else order
        heldout = ranked(row_lengths(heldout_source, data_format, on_bad_row), regime)[:heldout_rows]
    output.mkdir(parents=True, exist_ok=True)
    train_file, heldout_file = output / "train.jsonl", output / "heldout.jsonl"
    _write_rows(source, [r.index for r in train], train_file)
    _write_rows(heldout_source or source, [r.index for r in heldout], heldout_file)
    return RegimeData(regime, source, heldout_source or source, train_file, heldout_file, train, heldout)


def _split(order: list[RowLengths], rows: int | None, heldout_rows: int,
           source: str) -> tuple[list[RowLengths], list[RowLengths]]:
    """Deal the ranked rows into train and held-out sets that cover the same part of the ranking.

    The regime uses the first `rows + heldout_rows` rows of the ranking; every k-th of them is held
    out (k = total / heldout_rows), so the held-out rows are as extreme as the training rows.
    """
    wanted = (rows or len(order) - heldout_rows) + heldout_rows
    if len(order) < heldout_rows + 1 or (rows and len(order) < wanted):
        raise UserError(f"{source}: {len(order)} usable rows, but the study asks for {rows or 'at least 1'} "
                        f"training and {heldout_rows} held-out rows; lower --rows or --heldout-rows")
    chosen = order[:wanted]
    step = len(chosen) / heldout_rows
    held_positions = {int(i * step + step / 2) for i in range(heldout_rows)}
    heldout = [r for i, r in enumerate(chosen) if i in held_positions]
    train = [r for i, r in enumerate(chosen) if i not in held_positions]
    return train, heldout


def _write_rows(source: str, indices: list[int], path: Path) -> None:
    """Copy the rows at `indices` of `source`, as read, into a JSONL file (in `indices` order)."""
    from instructune.data.sources import iter_rows

    wanted = {index: position for position, index in enumerate(indices)}
    records: list = [None] * len(indices)
    for index, raw in enumerate(iter_rows(source)):
        if index in wanted:
            records[wanted[index]] = raw.record
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
