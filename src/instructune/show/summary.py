"""The summary of a preparation run (docs/masking.md, rule 13) as plain tables, drawn by rich or as HTML.

`summary_tables` computes every number once; `render_summary` draws them in the terminal and
`instructune.show.html` draws the very same tables, so the two never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.console import Group
from rich.table import Table
from rich.text import Text

from instructune.data.encoded import ROLE_NAMES, PreparationReport

PERCENTILES = (50, 90, 99)
HISTOGRAM_BINS = 8
HISTOGRAM_WIDTH = 30
MAX_BAD_ROW_MESSAGES = 5


@dataclass
class SummaryTable:
    """A titled table of strings: `header` names the columns (or is empty for label/value rows)."""

    title: str
    rows: list[tuple[str, ...]]
    header: tuple[str, ...] = field(default_factory=tuple)

    def numeric_columns(self) -> list[bool]:
        """For each column, whether all its cells are numbers (drawn right-aligned)."""
        width = len(self.header) or max((len(row) for row in self.rows), default=1)
        return [all(_is_number(row[i]) for row in self.rows if i < len(row)) for i in range(width)]


def _is_number(cell: str) -> bool:
    return bool(cell) and all(ch.isdigit() or ch in ",.%-" for ch in cell)


def percentile(sorted_values: Sequence[int], p: float) -> int:
    """The nearest-rank percentile: the smallest value with at least `p`% of the values at or below it."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def length_stats(lengths: Sequence[int]) -> dict[str, int]:
    """min, p50, p90, p99 and max of the row lengths (nearest-rank percentiles)."""
    ordered = sorted(lengths)
    stats = {"min": ordered[0]}
    stats.update({f"p{p}": percentile(ordered, p) for p in PERCENTILES})
    stats["max"] = ordered[-1]
    return stats


def histogram(lengths: Sequence[int], bins: int = HISTOGRAM_BINS) -> list[tuple[int, int, int]]:
    """Equal-width integer bins over [min, max]: `(low, high, count)` with both ends inclusive."""
    low, high = min(lengths), max(lengths)
    width = max(1, math.ceil((high - low + 1) / bins))
    counts = [0] * math.ceil((high - low + 1) / width)
    for length in lengths:
        counts[(length - low) // width] += 1
    return [(low + i * width, min(high, low + (i + 1) * width - 1), n) for i, n in enumerate(counts)]


def _bar(count: int, largest: int) -> str:
    # At least one block for a non-empty bin, so a rare long row is never invisible.
    return "█" * max(1 if count else 0, round(HISTOGRAM_WIDTH * count / largest)) if largest else ""


def _role_order(report: PreparationReport) -> list[str]:
    known = [role for role in ROLE_NAMES if role in report.tokens_per_role]
    return known + sorted(set(report.tokens_per_role) - set(known))


def summary_tables(report: PreparationReport) -> list[SummaryTable]:
    """Rows, tokens, tokens per role, lengths, warnings and bad rows, as tables of strings."""
    rows = [("read", f"{report.rows_read:,}"), ("kept", f"{report.rows_kept:,}"),
            ("dropped", f"{sum(report.dropped.values()):,}")]
    rows += [(f"  {reason}", f"{n:,}") for reason, n in sorted(report.dropped.items())]
    rows.append(("truncated", f"{report.truncated:,}"))
    tables = [SummaryTable("Rows", rows)]

    tables.append(SummaryTable("Tokens", [
        ("total", f"{report.tokens_total:,}"),
        ("trained", f"{report.tokens_trained:,}"),
        ("trained fraction", f"{report.trained_fraction:.1%}"),
    ]))

    per_role = []
    for role in _role_order(report):
        total, trained = report.tokens_per_role[role], report.trained_per_role.get(role, 0)
        per_role.append((role, f"{total:,}", f"{trained:,}", f"{trained / total:.1%}" if total else "-"))
    tables.append(SummaryTable("Tokens per role", per_role, ("role", "tokens", "trained", "trained %")))

    if report.lengths:
        stats = length_stats(report.lengths)
        tables.append(SummaryTable("Row length (tokens)", [tuple(str(v) for v in stats.values())],
                                   tuple(stats)))
        bins = histogram(report.lengths)
        largest = max(n for _, _, n in bins)
        tables.append(SummaryTable("Length histogram", [
            (f"{lo}–{hi}" if lo != hi else f"{lo}", f"{n:,}", _bar(n, largest)) for lo, hi, n in bins
        ], ("tokens", "rows", "")))

    if report.expanded:
        # Rule 8a: the cost of training turns as at inference is re-reading their history.
        per_trained = report.expanded_tokens / report.expanded_trained if report.expanded_trained else 0.0
        overall = report.tokens_total / report.tokens_trained if report.tokens_trained else 0.0
        tables.append(SummaryTable("History rewritten: one row per turn", [
            ("conversations expanded", f"{report.expanded:,}"),
            ("rows made from them", f"{report.expanded_rows:,}"),
            ("tokens read per trained token (those rows)", f"{per_trained:.2f}"),
            ("tokens read per trained token (all rows)", f"{overall:.2f}"),
        ]))

    if report.warnings:
        tables.append(SummaryTable("Warnings", [(kind, f"{n:,}") for kind, n in sorted(report.warnings.items())]))

    if report.notes:
        tables.append(SummaryTable("Notes", [(kind, note) for kind, note in sorted(report.notes.items())]))

    if report.bad_row_messages:
        shown = report.bad_row_messages[:MAX_BAD_ROW_MESSAGES]
        messages = [(message,) for message in shown]
        more = max(report.dropped.get("bad_row", 0), len(report.bad_row_messages)) - len(shown)
        if more > 0:
            messages.append((f"… and {more:,} more",))
        tables.append(SummaryTable("Bad rows", messages))
    return tables


def _rich_table(table: SummaryTable) -> Table:
    rich_table = Table(title=table.title, title_justify="left", title_style="bold",
                       show_header=bool(table.header), box=None, padding=(0, 2, 0, 0))
    # Numbers line up on the right; labels, bars and messages read left to right.
    for i, numeric in enumerate(table.numeric_columns()):
        rich_table.add_column(table.header[i] if table.header else "", justify="right" if numeric else "left",
                              overflow="fold")
    for row in table.rows:
        rich_table.add_row(*row)
    return rich_table


def render_table(table: SummaryTable) -> Table:
    """One table as `render_summary` draws it (for tables of other reports, such as a mixture's sources)."""
    return _rich_table(table)


def render_summary(report: PreparationReport) -> Group:
    """The summary as rich tables, one per section, ready for `console.print`."""
    parts: list = [Text("Summary", style="bold underline")]
    for table in summary_tables(report):
        parts += [Text(""), _rich_table(table)]
    if not report.lengths:
        parts += [Text(""), Text("no rows kept", style="bold red")]
    return Group(*parts)
