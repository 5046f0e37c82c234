"""A mixture's sources as two tables: what each gave, from rows read to rows taken; then the taken rows'
tokens and lengths."""

from __future__ import annotations

from collections.abc import Sequence

from instructune.data.mixture import SourceResult
from instructune.show.summary import SummaryTable, length_stats

ROWS_HEADER = ("source", "read", "dropped", "duplicate", "held out", "available", "taken", "repeats")
TOKENS_HEADER = ("source", "tokens", "trained", "trained %", "p50", "max", "path")


def sources_tables(results: Sequence[SourceResult]) -> list[SummaryTable]:
    """Per source: rows read, dropped by the encoder, duplicate, held out, available for training, taken
    (exactly the share) and of them repeats; then the taken rows' tokens, trained tokens and lengths."""
    rows, tokens = [], []
    for result in results:
        label, train = result.source.label, result.train
        rows.append((label, f"{result.encoding.rows_read:,}", f"{sum(result.encoding.dropped.values()):,}",
                     f"{result.duplicates:,}", f"{result.held_out:,}", f"{result.available:,}",
                     f"{result.taken:,}", f"{result.repeated:,}"))
        stats = length_stats(train.lengths) if train.lengths else {"p50": "-", "max": "-"}
        tokens.append((label, f"{train.tokens_total:,}", f"{train.tokens_trained:,}", f"{train.trained_fraction:.1%}",
                       str(stats["p50"]), str(stats["max"]), result.source.path))
    return [SummaryTable("Sources: rows", rows, ROWS_HEADER),
            SummaryTable("Sources: tokens of the rows taken", tokens, TOKENS_HEADER)]
