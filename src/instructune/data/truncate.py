"""Fitting a row into `max_length` (docs/masking.md, rule 9).

`keep_response` (default) drops the oldest complete turns - a user message and the replies up to the
next user message - keeping the system message, re-rendering the shorter conversation each time (so
the ids stay exactly what the template produces), and only then cuts the end. `keep_start` cuts the
end at once; `drop` drops the row. A row left with no trained token is dropped by the caller.

This module holds the pure steps; the policy loop, which re-encodes, is the encoder's own
(`ConversationEncoder._truncate`), so this module never imports the encoder.
"""

from __future__ import annotations

from dataclasses import replace

from instructune.data.conversation import Conversation
from instructune.data.encoded import EncodedRow


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
