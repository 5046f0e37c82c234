"""The canonical in-memory example: a conversation of messages, each with a role and content.

Every dataset format is read into `Conversation`; every template renders a `Conversation`. Plain
language-modelling rows (`text` format) are a `Conversation` with `text` set and no messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from instructune.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Message:
    """One turn. `train` overrides the `train_on` policy for this turn when it is not None."""

    role: str
    content: str
    train: bool | None = None
    # Carried through to templates that use them (OpenAI-style `tool_calls`, `name`, `tool_call_id`, ...).
    extra: dict[str, Any] = field(default_factory=dict)

    def to_template_dict(self) -> dict[str, Any]:
        """The message as a chat template expects it: role, content and any extra fields."""
        return {"role": self.role, "content": self.content, **self.extra}


@dataclass
class Conversation:
    """A training example: messages (and the tools they may call), or a plain `text` document."""

    messages: list[Message] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    text: str | None = None
    # Not compared: two rows with the same turns are the same conversation; the cache key still hashes them.
    variables: dict[str, Any] = field(default_factory=dict, compare=False)
    """Extra template variables from the row's other top-level keys (FireFunction's `functions`, ...)."""

    @property
    def is_text(self) -> bool:
        """True for a plain language-modelling row, which is trained on every token."""
        return self.text is not None

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as plain dicts for a Jinja chat template."""
        return [m.to_template_dict() for m in self.messages]


class ConversationError(UserError):
    """A conversation that breaks a rule; `field` names the offending part (e.g. `messages[2].role`)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def validate_conversation(conv: Conversation) -> Conversation:
    """Check roles, content types and that there is something to train on; raise `ConversationError`."""
    if conv.is_text:
        if not isinstance(conv.text, str):
            raise ConversationError(f"text must be a string, got {type(conv.text).__name__}", "text")
        if not conv.text.strip():
            raise ConversationError("text is empty", "text")
        return conv
    if not conv.messages:
        raise ConversationError("the conversation is empty", "messages")
    for i, message in enumerate(conv.messages):
        if message.role not in ROLES:
            raise ConversationError(
                f"unknown role {message.role!r} (expected one of {', '.join(ROLES)})", f"messages[{i}].role"
            )
        if not isinstance(message.content, str):
            raise ConversationError(
                f"content must be a string, got {type(message.content).__name__}", f"messages[{i}].content"
            )
        if message.train is not None and not isinstance(message.train, bool):
            raise ConversationError(
                f"train must be true or false, got {message.train!r}", f"messages[{i}].train"
            )
    if not any(m.role == "assistant" for m in conv.messages):
        raise ConversationError("the conversation has no assistant turn to train on", "messages")
    return conv
