"""Conversations one at a time, for sources too large to hold as a list.

`stream_conversations` is the one loop that turns rows into validated conversations;
`readers.read_conversations` collects it into a list. It yields each (row index, conversation) as it is read and keeps only
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
from instructune.data.formats import FORMATS, detect_format, normalize_format_name
from instructune.data.options import ON_BAD_ROW
from instructune.data.sources import RawRow, iter_rows
from instructune.errors import UserError

MAX_BAD_ROW_MESSAGES = 5


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
    named_limit: int | None = MAX_NAMED_DROPS
    """How many bad rows `bad_row_indices` names (None: every one)."""


SKIP_HINT = " (to skip bad rows instead: --on-bad-row skip, or on_bad_row=skip for instructune train)"
"""Added to the error a bad row raises: most bad rows are a few broken lines in a large file."""


def stream_conversations(source: str | os.PathLike, data_format: str | None = None, on_bad_row: str = "error",
                         limit: int | None = None, tally: StreamTally | None = None,
                         rows: Iterable[RawRow] | None = None) -> Iterator[tuple[int, Conversation]]:
    """Yield (row index, conversation) for every good row of `source`, as `read_conversations` lists them.

    Counts go into `tally`. The errors are `read_conversations`' own; the one for a source without a good
    row comes once the stream is exhausted. `rows` are the source's rows when they are already in memory
    (`record_rows`); `source` then only names them in errors.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise UserError(f"on_bad_row must be one of {', '.join(ON_BAD_ROW)}, got {on_bad_row!r}")
    tally = tally if tally is not None else StreamTally()
    fmt = normalize_format_name(data_format) if data_format is not None else None
    tally.format = fmt or ""
    convert = FORMATS[fmt].convert if fmt else None
    for row_index, raw in enumerate(iter_rows(source) if rows is None else rows):
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
                # The validator speaks of canonical `messages`; point at the record's own field instead.
                if exc.field == "messages":
                    exc.field = FORMATS[fmt].turns_field
                raise
        except ConversationError as exc:
            message = f"{raw.location(exc.field)}: {exc}"
            if on_bad_row == "error":
                raise UserError(f"{message}{SKIP_HINT}") from None
            tally.bad_rows += 1
            if tally.named_limit is None or len(tally.bad_row_indices) < tally.named_limit:
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


def record_rows(records: Iterable, source: str = "records") -> Iterator[RawRow]:
    """In-memory records (dicts in any dataset format) as the rows of a source named `source`; a list of
    messages stands for `{"messages": [...]}`."""
    for index, record in enumerate(records):
        yield RawRow(source, index, None, {"messages": record} if isinstance(record, list) else record)


def _record_of(raw: RawRow) -> dict:
    """The row's record, or a `ConversationError` (a bad row) when it is not a JSON object."""
    if raw.error is not None:
        raise ConversationError(raw.error)
    if not isinstance(raw.record, dict):
        kind = "null" if raw.record is None else type(raw.record).__name__
        raise ConversationError(f"expected a record (a JSON object), got {kind}")
    return raw.record


def _detect(raw: RawRow) -> str:
    """The format of the first good record; not being able to tell is an error for the whole source."""
    try:
        return detect_format(raw.record)
    except UserError as exc:
        raise UserError(f"{raw.location()}: {exc}") from None


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
