"""Read a dataset into validated canonical conversations: the entry point of the data pipeline.

`read_conversations` = a source (`sources.iter_rows`) + a format (`formats.FORMATS`, detected
from the first record unless given) + `validate_conversation`, with every bad row either raised
as a `UserError` that names the file, the row and the field, or skipped and counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from instructune.data.conversation import Conversation, ConversationError, validate_conversation
from instructune.data.formats import FORMATS, detect_format, normalize_format_name
from instructune.data.options import ON_BAD_ROW
from instructune.data.sources import RawRow, iter_rows
from instructune.errors import UserError

__all__ = ["ReadResult", "read_conversations", "detect_format"]

MAX_BAD_ROW_MESSAGES = 5


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
    if on_bad_row not in ON_BAD_ROW:
        raise UserError(f"on_bad_row must be one of {', '.join(ON_BAD_ROW)}, got {on_bad_row!r}")
    fmt = normalize_format_name(data_format) if data_format is not None else None
    result = ReadResult(format=fmt or "")
    convert = FORMATS[fmt].convert if fmt else None

    for row_index, raw in enumerate(iter_rows(source)):
        if limit is not None and row_index >= limit:
            break
        result.rows_read += 1
        try:
            record = _record_of(raw)
            if convert is None:
                fmt = _detect(raw)
                result.format, convert = fmt, FORMATS[fmt].convert
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
                raise UserError(message) from None
            result.bad_rows += 1
            result.bad_row_indices.append(row_index)
            if len(result.bad_row_messages) < MAX_BAD_ROW_MESSAGES:
                result.bad_row_messages.append(message)
            continue
        result.conversations.append((row_index, conversation))

    if not result.conversations:
        if result.rows_read == 0:
            raise UserError(f"{source}: no rows to read")
        raise UserError(
            f"{source}: all {result.rows_read} rows are bad, nothing to train on; the first: "
            f"{result.bad_row_messages[0]}"
        )
    return result


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
