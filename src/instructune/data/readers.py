"""Read a dataset into validated canonical conversations: the entry point of the data pipeline.

`read_conversations` = a source (`sources.iter_rows`) + a format (`formats.FORMATS`, detected
from the first record unless given) + `validate_conversation`, with every bad row either raised
as a `UserError` that names the file, the row and the field, or skipped and counted: the rows of
`stream.stream_conversations`, kept as a list.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from instructune.data.conversation import Conversation
from instructune.data.formats import detect_format
from instructune.data.stream import StreamTally, stream_conversations

__all__ = ["ReadResult", "read_conversations", "detect_format"]


@dataclass
class ReadResult:
    """The conversations of a source and what happened to the rows that did not make it."""

    conversations: list[tuple[int, Conversation]] = field(default_factory=list)
    """(row index, conversation): the row index counts every row read, bad ones included, across all
    files of a folder in order (0-based)."""
    rows_read: int = 0
    bad_rows: int = 0
    bad_row_indices: list[int] = field(default_factory=list)
    """The row index of every skipped row."""
    bad_row_messages: list[str] = field(default_factory=list)
    """The first few error messages of skipped rows."""
    format: str = ""
    """The detected or given format name."""


def read_conversations(
    source: str | os.PathLike, data_format: str | None = None, on_bad_row: str = "error",
    limit: int | None = None,
) -> ReadResult:
    """Read every row of `source` (file, folder or Hub `name[:split]`) into a validated `Conversation`.

    `data_format` overrides detection from the first record's keys. `on_bad_row="error"` raises a
    `UserError` at the first bad row; `"skip"` drops bad rows and counts them. A file that cannot be
    read at all, a first record whose format cannot be detected, and a source with no good row are
    errors in both modes. Errors name JSONL rows by 1-based `line N` and other files' rows by 0-based
    `row N` within the named file (which, for a single file, is also the row index in the result).
    `limit` reads only the first `limit` rows (bad ones included).
    """
    tally = StreamTally(named_limit=None)
    conversations = list(stream_conversations(source, data_format, on_bad_row, limit, tally))
    return ReadResult(conversations=conversations, rows_read=tally.rows_read, bad_rows=tally.bad_rows,
                      bad_row_indices=tally.bad_row_indices, bad_row_messages=tally.bad_row_messages,
                      format=tally.format)
