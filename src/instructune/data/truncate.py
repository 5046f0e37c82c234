"""Fitting a row into `max_length` (spec rule 9).

`keep_response` (default) drops the oldest complete turns - a user message and the replies up to the
next user message - keeping the system message, re-rendering the shorter conversation each time (so
the ids stay exactly what the template produces), and only then cuts the end. `keep_start` cuts the
end at once; `drop` drops the row. A row left with no trained token is dropped by the caller.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from instructune import IGNORE_INDEX
from instructune.data.conversation import Conversation
from instructune.data.encoded import EncodedRow

if TYPE_CHECKING:
    from instructune.data.encode import ConversationEncoder


def drop_oldest_turn(conv: Conversation) -> Conversation | None:
    """The conversation without its oldest complete turn (system kept), or None if one turn is left."""
    messages = conv.messages
    first = next((i for i, m in enumerate(messages) if m.role != "system"), None)
    if first is None:
        return None
    next_user = next((i for i in range(first + 1, len(messages)) if messages[i].role == "user"), None)
    if next_user is None:
        return None
    kept = messages[:first] + messages[next_user:]
    return replace(conv, messages=kept)


def cut_end(encoded: EncodedRow, max_length: int) -> EncodedRow:
    """Keep the first `max_length` tokens."""
    return replace(encoded, input_ids=encoded.input_ids[:max_length], labels=encoded.labels[:max_length],
                   roles=encoded.roles[:max_length], truncated=True)


def truncate_row(encoder: ConversationEncoder, conv: Conversation, encoded: EncodedRow, row: int) -> EncodedRow:
    """Apply the encoder's truncation policy to a row longer than its `max_length`."""
    from instructune.data.encode import DropRow

    max_length = encoder.max_length
    if encoder.truncation == "drop":
        raise DropRow("too_long", f"{len(encoded.input_ids)} tokens > max_length {max_length}")
    if encoder.truncation == "keep_response" and not conv.is_text:
        current = conv
        while (shorter := drop_oldest_turn(current)) is not None:
            try:
                candidate = encoder._encode_messages(shorter, row)
            except DropRow:
                break
            if not any(label != IGNORE_INDEX for label in candidate.labels[1:]):
                break  # the dropped turn held the only trained tokens: cutting the end keeps more
            current, encoded = shorter, replace(candidate, truncated=True)
            if len(encoded.input_ids) <= max_length:
                return encoded
    return cut_end(encoded, max_length)
