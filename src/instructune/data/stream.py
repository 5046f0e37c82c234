"""Conversations one at a time, for sources too large to hold as a list.

`stream_conversations` gives exactly what `readers.read_conversations` gives, row indices, bad-row
handling and errors included, but yields each (row index, conversation) as it is read and keeps only
counts (and the first few bad rows) in a `StreamTally`. What it holds in memory depends on the format
(see `sources.iter_rows`):

- JSONL: one line at a time (true streaming).
- Parquet: one record batch (1,024 rows) at a time (true streaming).
- CSV: one line at a time (true streaming).
- Hub datasets: `datasets` keeps them memory-mapped on disk; rows are taken one at a time.
- JSON (`.json`): the standard library parses a whole document at once, so the file's records are in
  memory while it is read (a JSON array cannot be split without a streaming parser). The conversations
  made from them are still not kept. For millions of rows, JSONL is the format to use.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from instructune.data.conversation import Conversation, ConversationError, validate_conversation
from instructune.data.encoded import MAX_NAMED_DROPS
from instructune.data.formats import FORMATS, normalize_format_name
from instructune.data.options import ON_BAD_ROW
from instructune.data.readers import MAX_BAD_ROW_MESSAGES, _detect, _record_of
from instructune.data.sources import iter_rows
from instructune.errors import UserError


@dataclass
class StreamTally:
    """What a stream has read so far: `ReadResult`'s counts without its list of conversations."""

    rows_read: int = 0
    conversations: int = 0
    bad_rows: int = 0
    bad_row_indices: list[int] = field(default_factory=list)
    """The row index of the first `MAX_NAMED_DROPS` skipped rows."""
    bad_row_messages: list[str] = field(default_factory=list)
    format: str = ""


def stream_conversations(source: str | os.PathLike, data_format: str | None = None, on_bad_row: str = "error",
                         limit: int | None = None, tally: StreamTally | None = None
                         ) -> Iterator[tuple[int, Conversation]]:
    """Yield (row index, conversation) for every good row of `source`, as `read_conversations` lists them.

    Counts go into `tally`. The errors are `read_conversations`' own; the one for a source without a good
    row comes once the stream is exhausted.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise UserError(f"on_bad_row must be one of {', '.join(ON_BAD_ROW)}, got {on_bad_row!r}")
    tally = tally if tally is not None else StreamTally()
    fmt = normalize_format_name(data_format) if data_format is not None else None
    tally.format = fmt or ""
    convert = FORMATS[fmt].convert if fmt else None
    for row_index, raw in enumerate(iter_rows(source)):
        if limit is not None and row_index >= limit:
            break
        tally.rows_read += 1
        try:
            record = _record_of(raw)
            if convert is None:
                fmt = _detect(raw)
                tally.format, convert = fmt, FORMATS[fmt].convert
            conversation = convert(record)
            try:
                validate_conversation(conversation)
            except ConversationError as exc:
                if exc.field == "messages":  # name the record's own field, as read_conversations does
                    exc.field = FORMATS[fmt].turns_field
                raise
        except ConversationError as exc:
            message = f"{raw.location(exc.field)}: {exc}"
            if on_bad_row == "error":
                raise UserError(message) from None
            tally.bad_rows += 1
            if len(tally.bad_row_indices) < MAX_NAMED_DROPS:
                tally.bad_row_indices.append(row_index)
            if len(tally.bad_row_messages) < MAX_BAD_ROW_MESSAGES:
                tally.bad_row_messages.append(message)
            continue
        tally.conversations += 1
        yield row_index, conversation
    if not tally.conversations:
        if tally.rows_read == 0:
            raise UserError(f"{source}: no rows to read")
        raise UserError(f"{source}: all {tally.rows_read} rows are bad, nothing to train on; the first: "
                        f"{tally.bad_row_messages[0]}")


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last one shorter), taken from `items` as they come."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
