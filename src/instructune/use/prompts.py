"""Prompts to answer, from JSONL records in any dataset format or from plain lines of text.

- **JSONL** (the first non-blank line starts with `{`): each object is a prompt in any of the dataset
  formats: `prompt` (a string or a list of messages), `instruction` (+ `input`, `system`, `history`),
  `messages` or `conversations` (a trailing assistant turn is left out: that is what gets answered).
- **text**: every non-blank line is one prompt, read as `{"prompt": line}`.
"""

from __future__ import annotations

import json
from typing import Any

from instructune.data.conversation import Conversation, Message
from instructune.errors import UserError


def read_prompts(lines: list[str], source: str) -> tuple[list[dict[str, Any]], bool]:
    """The input records (text lines become `{"prompt": line}`) and whether the input was JSONL."""
    first = next((line for line in lines if line.strip()), "")
    if not first.lstrip().startswith("{"):
        return [{"prompt": line.rstrip("\r\n")} for line in lines if line.strip()], False
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{source}, line {number}: invalid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{source}, line {number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records, True


def record_conversation(record: dict[str, Any], system: str | None = None) -> Conversation:
    """The conversation a prompt record asks to continue (a trailing assistant turn removed)."""
    from instructune.data.formats import PROMPT_FORMATS, find_format
    from instructune.use.generation import prompt_conversation

    fmt = find_format(record, for_prompts=True)
    if fmt is None:
        keys = ", ".join(repr(k) for k in record) or "none"
        wanted = [f"`{f.key}`" for f in PROMPT_FORMATS]
        raise UserError(f"no prompt in the record (keys: {keys}); give {', '.join(wanted[:-1])} or {wanted[-1]}")
    if fmt.answer_field is not None:
        record = {**record, fmt.answer_field: ""}  # a reference answer, if any, is not part of the prompt
    conv = prompt_conversation(fmt.convert(record))
    if not conv.messages or conv.messages[-1].role == "assistant":
        raise UserError("the record has nothing to answer: it needs a user turn at the end")
    if system and conv.messages[0].role != "system":
        conv.messages.insert(0, Message("system", system))
    return conv
