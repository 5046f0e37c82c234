"""Dataset formats: turn one raw record (a dict) into a canonical `Conversation`.

`FORMATS` (at the end of the converters) is the one registry of formats: one `DataFormat` entry per
format, from which detection, the format names users may give, the readers and the prompts of
`instructune generate` all read. Adding a format is one converter and one entry there.

Each converter checks the record's own fields and raises `ConversationError` whose `field` names
the offending part in the record's own terms (`conversations[2].from`, not `messages[3].role`), so
the reader can point the user at the exact spot in their file.

Extra top-level keys of `messages` and `sharegpt` records become template variables
(`Conversation.variables`); extra keys in a message are kept in `Message.extra`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from instructune.data.conversation import ROLES, Conversation, ConversationError, Message
from instructune.errors import UserError


@dataclass(frozen=True)
class DataFormat:
    """One dataset format: the key that marks its records, how to convert one, and how to name its parts."""

    name: str
    """The canonical name, as users give it (`--format`, `data_format:`) and as reports show it."""
    key: str
    """The record key that marks a record of this format."""
    rank: int
    """How structured the marker key's column is: 0 whole conversations, 1 instructions with their
    parts, 2 prompts, 3 plain text. Records often carry several marker keys (Alpaca dumps a pre-rendered
    `text`, chat dumps a `prompt` beside `messages`), and detection trusts the most structured one."""
    needs: str
    """The keys a record needs, for error messages."""
    convert: Callable[[dict], Conversation]
    """The converter: a record of this format to a `Conversation` (not validated yet)."""
    turns_field: str
    """The record field that holds the turns, so a conversation-level error (empty, no assistant turn)
    names a field the user can find in their file."""
    example: dict
    """A small valid record of this format, for documentation and for the registry's own tests."""
    prompts: bool = True
    """Whether a record of this format can be a prompt to answer (`instructune generate`)."""
    answer_field: str | None = None
    """For a prompt: the field that holds only the answer, which a prompt record may leave out (it is
    blanked). None when the answer is the conversation's trailing assistant turn, which is dropped."""


SHAREGPT_SPEAKERS = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
    "function_response": "tool",
}

# Message keys the converters consume; everything else goes to `Message.extra`.
_MESSAGE_KEYS = {"role", "content", "from", "value", "train", "weight"}


def detect_format(record: dict) -> str:
    """The format of a record, judged from its keys (see `find_format`); `UserError` if none fits."""
    if not isinstance(record, dict):
        raise UserError(f"cannot detect the data format: the record is a {type(record).__name__}, not an object")
    found = find_format(record)
    if found is not None:
        return found.name
    keys = ", ".join(repr(k) for k in record) or "none"
    known = "; ".join(f"{fmt.name} ({fmt.needs})" for fmt in FORMATS.values())
    raise UserError(
        f"cannot detect the data format from the record's keys ({keys}); known formats: {known}. "
        "Rename the columns or pass the format explicitly."
    )


def normalize_format_name(name: str) -> str:
    """The canonical name of a format given by the user (`prompt-completion` -> `prompt_completion`)."""
    canonical = name.strip().lower().replace("-", "_")
    if canonical not in FORMATS:
        raise UserError(f"unknown data format {name!r} (expected one of {', '.join(FORMATS)})")
    return canonical


def find_format(record: dict, *, for_prompts: bool = False) -> DataFormat | None:
    """The format whose marker key the record has (the most structured one when it has several), or None.

    `for_prompts` considers only the formats a prompt to answer can be written in.
    """
    for fmt in _BY_RANK:
        if fmt.key in record and (fmt.prompts or not for_prompts):
            return fmt
    return None


def alpaca_to_conversation(record: dict) -> Conversation:
    """An Alpaca record as system?, history pairs, then user + assistant.

    The user turn is `instruction`, followed by a blank line ("\\n\\n") and `input` when `input` is
    non-empty: the common convention of Alpaca prompt templates. `history` is a list of
    `[instruction, response]` pairs that come before the final exchange.
    """
    instruction = _required_str(record, "instruction")
    output = _required_str(record, "output")
    extra_input = _optional_str(record, "input")
    messages = _system_messages(record)
    history = record.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise ConversationError(_type_message("a list of [instruction, response] pairs", history), "history")
        for i, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ConversationError("expected an [instruction, response] pair", f"history[{i}]")
            for j, text in enumerate(pair):
                if not isinstance(text, str):
                    raise ConversationError(_type_message("a string", text), f"history[{i}][{j}]")
            messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    user = "\n\n".join(part for part in (instruction, extra_input) if part)
    # The built-in `alpaca` template reads `instruction` and `input` apart, to write the exact
    # Stanford Alpaca prompt; other templates only see `content`.
    fields = {"instruction": instruction, "input": extra_input or ""}
    messages += [Message("user", user, extra=fields), Message("assistant", output)]
    return Conversation(messages=messages)


def prompt_completion_to_conversation(record: dict) -> Conversation:
    """A prompt/completion record (optional `tools`): strings become one user and one assistant message;
    message lists are concatenated, and assistant turns inside the prompt get `train=False` (only the completion is
    trained, whatever the prompt's messages say)."""
    for key in ("prompt", "completion"):
        if key not in record:
            raise ConversationError(_missing_message(key, record), key)
    prompt = _turns(record, "prompt", "user")
    for message in prompt:
        if message.role == "assistant":
            message.train = False
    completion = _turns(record, "completion", "assistant")
    return Conversation(messages=prompt + completion, tools=_tools(record))


def messages_to_conversation(record: dict) -> Conversation:
    """An OpenAI-style record: `messages` of {role, content, ...} and optional `tools`."""
    turns = _turn_list(record, "messages")
    messages = [_parse_message(m, f"messages[{i}]", roles=None) for i, m in enumerate(turns)]
    return Conversation(messages=messages, tools=_tools(record), variables=_variables(record, "messages"))


def sharegpt_to_conversation(record: dict) -> Conversation:
    """A ShareGPT record: `conversations` of {from, value} (speaker names mapped by
    `SHAREGPT_SPEAKERS`; `{role, content}` also accepted), optional top-level `system` and `tools`."""
    turns = _turn_list(record, "conversations")
    messages = [_parse_message(m, f"conversations[{i}]", roles=SHAREGPT_SPEAKERS) for i, m in enumerate(turns)]
    system = _system_messages(record)
    if system and messages and messages[0].role == "system":
        # Two system prompts would leave one silently dropped by most chat templates.
        raise ConversationError(
            "the record has a top-level system prompt and also starts with a system turn; keep one", "system"
        )
    return Conversation(messages=system + messages, tools=_tools(record),
                        variables=_variables(record, "conversations", "system"))


def _variables(record: dict, *consumed: str) -> dict[str, Any]:
    """The record's other top-level keys, passed to the template as variables (FireFunction's
    `functions`); keys the template engine sets itself are left out, so a row cannot override them."""
    reserved = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", *consumed}
    return {k: v for k, v in record.items() if isinstance(k, str) and k.isidentifier() and k not in reserved}


def text_to_conversation(record: dict) -> Conversation:
    """A plain document: `text`, trained on every token."""
    return Conversation(text=_required_str(record, "text"))


FORMATS: dict[str, DataFormat] = {fmt.name: fmt for fmt in (
    DataFormat(
        "alpaca", key="instruction", rank=1, needs="instruction, output, optional input/system/history",
        convert=alpaca_to_conversation, turns_field="output", answer_field="output",
        example={"instruction": "Name an ocean.", "input": "", "output": "The Pacific."},
    ),
    DataFormat(
        "prompt_completion", key="prompt", rank=2, needs="prompt, completion",
        convert=prompt_completion_to_conversation, turns_field="completion", answer_field="completion",
        example={"prompt": "The sky is", "completion": " blue."},
    ),
    DataFormat(
        "messages", key="messages", rank=0, needs="messages",
        convert=messages_to_conversation, turns_field="messages",
        example={"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ),
    DataFormat(
        "sharegpt", key="conversations", rank=0, needs="conversations",
        convert=sharegpt_to_conversation, turns_field="conversations",
        example={"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ),
    DataFormat(
        "text", key="text", rank=3, needs="text",
        convert=text_to_conversation, turns_field="text", prompts=False,
        example={"text": "Once upon a time."},
    ),
)}
"""Every format, by canonical name, in the order messages and help texts list them."""

_BY_RANK = sorted(FORMATS.values(), key=lambda fmt: fmt.rank)  # stable: equal ranks keep the order above

PROMPT_FORMATS = tuple(sorted((fmt for fmt in FORMATS.values() if fmt.prompts), key=lambda fmt: -fmt.rank))
"""The formats a prompt to answer can be written in, the simplest first (as help texts list them)."""


# ---- helpers -----------------------------------------------------------------------------------


def _type_message(expected: str, value: Any) -> str:
    if value is None:
        return f"expected {expected}, got null"
    return f"expected {expected}, got {type(value).__name__}"


def _missing_message(key: str, record: dict) -> str:
    keys = ", ".join(repr(k) for k in record) or "none"
    return f"missing key {key!r} (the record has keys {keys})"


def _required_str(record: dict, key: str) -> str:
    if key not in record:
        raise ConversationError(_missing_message(key, record), key)
    value = record[key]
    if not isinstance(value, str):
        raise ConversationError(_type_message("a string", value), key)
    return value


def _optional_str(record: dict, key: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConversationError(_type_message("a string", value), key)
    return value


def _system_messages(record: dict) -> list[Message]:
    system = _optional_str(record, "system")
    return [Message("system", system)] if system else []


def _maybe_json(value: Any, key: str) -> Any:
    # CSV cells (and some Parquet dumps) can only hold strings, so list-valued fields arrive as JSON text.
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise ConversationError(f"expected a list or a JSON string of one; not valid JSON ({exc})", key) from None
    return value


def _turn_list(record: dict, key: str) -> list:
    if key not in record:
        raise ConversationError(_missing_message(key, record), key)
    turns = _maybe_json(record[key], key)
    if not isinstance(turns, list):
        raise ConversationError(_type_message("a list of messages", turns), key)
    return turns


def _turns(record: dict, key: str, role_of_string: str) -> list[Message]:
    """`prompt` or `completion`: a string (one message of `role_of_string`) or a list of messages."""
    value = record[key]
    if isinstance(value, str):
        return [Message(role_of_string, value)]
    if not isinstance(value, list):
        raise ConversationError(_type_message("a string or a list of messages", value), key)
    return [_parse_message(m, f"{key}[{i}]", roles=None) for i, m in enumerate(value)]


def _tools(record: dict) -> list[dict[str, Any]] | None:
    tools = record.get("tools")
    if tools is None or tools == "":
        return None
    tools = _maybe_json(tools, "tools")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ConversationError(_type_message("a list of tool definitions (objects)", tools), "tools")
    return tools or None


def _parse_message(message: Any, where: str, roles: dict[str, str] | None) -> Message:
    """One turn. `roles` maps speaker names to canonical roles (ShareGPT); None means OpenAI roles."""
    if not isinstance(message, dict):
        raise ConversationError(_type_message("a message object", message), where)
    if roles is not None and "from" in message:
        role_key, content_key = "from", "value"
    else:
        role_key, content_key = "role", "content"
    if role_key not in message:
        raise ConversationError(_missing_message(role_key, message), f"{where}.{role_key}")
    speaker = message[role_key]
    if roles is None:
        role = speaker if speaker in ROLES else None
        expected = ", ".join(ROLES)
    else:
        role = roles.get(speaker.lower()) if isinstance(speaker, str) else None
        expected = ", ".join(roles)
    if role is None:
        kind = "role" if roles is None else "speaker"
        raise ConversationError(f"unknown {kind} {speaker!r} (expected one of {expected})", f"{where}.{role_key}")
    if content_key not in message and role != "assistant":
        raise ConversationError(_missing_message(content_key, message), f"{where}.{content_key}")
    content = _content(message.get(content_key), role, f"{where}.{content_key}")
    extra = {k: v for k, v in message.items() if k not in _MESSAGE_KEYS and v is not None}
    return Message(role, content, train=_train_flag(message, where), extra=extra)


def _content(value: Any, role: str, where: str) -> str:
    if isinstance(value, str):
        return value
    # An assistant turn that only calls tools has no text (OpenAI writes null).
    if value is None and role == "assistant":
        return ""
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict):
                raise ConversationError(_type_message("a content part {type: text, text: ...}", part), f"{where}[{i}]")
            if part.get("type", "text") != "text":
                raise ConversationError(
                    f"unsupported content part type {part['type']!r} (only text is supported)", f"{where}[{i}].type"
                )
            if not isinstance(part.get("text"), str):
                raise ConversationError(_type_message("a string", part.get("text")), f"{where}[{i}].text")
            parts.append(part["text"])
        # Chat templates that accept part lists emit the parts back to back, so do the same.
        return "".join(parts)
    raise ConversationError(_type_message("a string", value), where)


def _train_flag(message: dict, where: str) -> bool | None:
    """`train: bool` as given, else LLaMA-Factory's `weight: 0|1`; `train` wins when both are present."""
    train = message.get("train")
    if train is not None:
        if not isinstance(train, bool):
            raise ConversationError(f"train must be true or false, got {train!r}", f"{where}.train")
        return train
    weight = message.get("weight")
    if weight is None:
        return None
    if isinstance(weight, (bool, int, float)) and weight in (0, 1):
        return bool(weight)
    raise ConversationError(f"weight must be 0 or 1, got {weight!r}", f"{where}.weight")
