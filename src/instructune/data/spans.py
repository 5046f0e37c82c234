"""Where each message's text lies in the full render, for any template (docs/masking.md, rule 7).

The conversation is rendered a second time with every *field* - a message's content, its reasoning,
each tool call's function name - replaced by a unique placeholder. Splitting that render at the
placeholders gives the template's own text between the fields (the *segments*). When the full render
equals `segment0 + value1 + segment1 + value2 + ...` exactly, every field's position in the full render
is known exactly, and any position inside a segment maps from one render to the other. This needs no
prefix stability: both renders are of the same conversation, so a template that ends every render with
EOS, adds a think block to the last turn or writes the system prompt late renders both alike.

When the template transforms a field (trims it, splits reasoning off the content, drops it from
history), the equality fails, and each field is searched instead: verbatim (whitespace-trimmed), in
order, where the template text before its placeholder ends. A field found nowhere is *missing*; the
encoder decides what that means (a rewritten history, or a drop).

This module finds positions only; what is trained, and the verification, are the encoder's.
"""

from __future__ import annotations

import bisect
import copy
import re
from dataclasses import dataclass
from typing import Any

from instructune.data.conversation import Conversation

REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
"""Message keys that hold an assistant turn's reasoning (OpenAI/Qwen/DeepSeek; gpt-oss; older data), in
the order the renderer reads them (it fills `reasoning_content` and `thinking` from the first one)."""

_PLACEHOLDER = "ZqPH{}QZ"  # ASCII and word-like: survives trim, strip, split, tojson and lstrip('\n')
_PLACEHOLDER_RE = re.compile(r"ZqPH(\d+)QZ")
_PLACEHOLDER_ANY_CASE = re.compile(r"ZqPH(\d+)QZ", re.I)  # a template that upper-cases content changes it too
_INLINE_THINK = re.compile(r"(\s*<think>)(.*?)(</think>)", re.S)  # reasoning written into the content
_ANCHOR_TAIL = 32  # characters of template text before a field that must precede it in a search


@dataclass
class Field:
    """One placeholder-able value of message `message`: `kind` is content, reasoning or tool."""

    message: int
    kind: str
    value: str
    start: int | None = None
    """Position in the full render (None: not found)."""
    end: int | None = None
    occurrences: int = 0
    """How many times the placeholder render wrote it (a trained field must appear exactly once)."""
    source: str = ""
    """For reasoning: the message key it came from, or `inline` (a <think> block in the content)."""
    rendered: str | None = None
    """The text the template wrote for it, when that is not the value itself (a transformed last field)."""

    @property
    def text(self) -> str:
        """What the render holds for this field: its value, or what the template made of it."""
        return self.value if self.rendered is None else self.rendered


def reasoning_of(message) -> tuple[str | None, str]:
    """The message's reasoning key and text (None, "" when it has none)."""
    for key in REASONING_KEYS:
        value = message.extra.get(key)
        if isinstance(value, str) and value:
            return key, value
    return None, ""


def _tool_name_slot(call: Any) -> tuple[dict, str] | None:
    """The dict and key holding a tool call's function name, when it is a plain identifier."""
    if isinstance(call, dict):
        function = call.get("function")
        holder = function if isinstance(function, dict) else call
        name = holder.get("name")
        if isinstance(name, str) and re.fullmatch(r"[A-Za-z_][\w.\-]*", name):
            return holder, "name"
    return None


def placeholder_messages(conv: Conversation, messages: list[dict], *, empty: bool) -> tuple[list[dict], list[Field]]:
    """Copies of the template `messages` with each field replaced by a placeholder, and the fields.

    `empty`: also replace empty contents (a template that branches on `if content` then renders
    differently, so the caller retries without them).
    """
    fields: list[Field] = []
    out = []

    def slot(k: int, kind: str, value: str, source: str = "") -> str:
        fields.append(Field(k, kind, value, source=source))
        return _PLACEHOLDER.format(len(fields) - 1)

    for k, (message, rendered) in enumerate(zip(conv.messages, messages)):
        rendered = dict(rendered)
        inline = _INLINE_THINK.match(message.content) if message.role == "assistant" else None
        if inline:  # the tags stay, so a template that splits reasoning off the content still can
            reasoning = slot(k, "reasoning", inline.group(2), "inline")
            answer = slot(k, "content", message.content[inline.end():])
            rendered["content"] = inline.group(1) + reasoning + inline.group(3) + answer
        elif isinstance(message.content, str) and (message.content or empty):
            rendered["content"] = slot(k, "content", message.content)
        key, reasoning = reasoning_of(message)
        if key:
            rendered[key] = slot(k, "reasoning", reasoning, key)
        calls = rendered.get("tool_calls")
        if isinstance(calls, list) and calls:
            calls = copy.deepcopy(calls)
            for call in calls:
                found = _tool_name_slot(call)
                if found:
                    holder, name_key = found
                    holder[name_key] = slot(k, "tool", holder[name_key])
            rendered["tool_calls"] = calls
        out.append(rendered)
    return out, fields


class Alignment:
    """The fields of one conversation located in its full render (see the module docstring)."""

    def __init__(self, full: str, placeholder_render: str, fields: list[Field]):
        self.full = full
        self.placeholder_render = placeholder_render
        self.fields = fields
        self._of: dict[int, list[Field]] = {}  # answers of `of` and `bounds`, per message
        self._bounds: dict[int, tuple[int, int]] = {}
        self.shape_key: str | None = None
        """The encoder's key for conversations of this shape (they share one placeholder render)."""
        parts = _PLACEHOLDER_RE.split(placeholder_render)
        if len(parts) // 2 < placeholder_render.lower().count("zqph"):  # (the exact pattern is much faster)
            parts = _PLACEHOLDER_ANY_CASE.split(placeholder_render)
        self.segments = parts[0::2]
        self.order = [int(i) for i in parts[1::2]]
        # Text that looks like a placeholder in the data itself would be mistaken for one: find nothing.
        self.valid = all(0 <= i < len(fields) for i in self.order) and (
            "zqph" not in full.lower() or not _PLACEHOLDER_ANY_CASE.search(full))
        self._p_starts: list[int] = []  # segment starts in the placeholder render ...
        self._f_starts: list[int] = []  # ... and the same segments' starts in the full render
        self.exact = self.valid and self._align_exactly()
        if not self.exact:
            for f in fields:
                f.start = f.end = None
                f.occurrences = 0
            if self.valid:
                self._search()
                self._locate_transformed_last_field()

    def _align_exactly(self) -> bool:
        values = [self.fields[i].value for i in self.order]
        rebuilt = self.segments[0] + "".join(v + s for v, s in zip(values, self.segments[1:]))
        if rebuilt != self.full:
            return False
        p = f = 0
        for j, segment in enumerate(self.segments):
            self._p_starts.append(p)
            self._f_starts.append(f)
            p += len(segment)
            f += len(segment)
            if j < len(self.order):
                field = self.fields[self.order[j]]
                field.occurrences += 1
                if field.occurrences == 1:
                    field.start, field.end = f, f + len(field.value)
                p += len(_PLACEHOLDER.format(self.order[j]))
                f += len(field.value)
        return True

    def _search(self) -> None:
        """Each field verbatim (trimmed), in order, after the template text that precedes it."""
        pos = 0
        for j, i in enumerate(self.order):
            field = self.fields[i]
            field.occurrences += 1
            value = field.value.strip()
            if not value or field.occurrences > 1:
                continue
            tail = self.segments[j].strip()[-_ANCHOR_TAIL:]
            # The render's last field is followed by the template's closing text and nothing else: of the
            # places the text before it allows, prefer the one that ends the render that way (an equal
            # answer earlier in the conversation is another turn's).
            closing = self.segments[j + 1].strip() if j + 1 == len(self.segments) - 1 else None
            first = None
            at = self.full.find(value, pos)
            while at >= 0:
                if not tail or self.full[:at].rstrip().endswith(tail):
                    first = at if first is None else first
                    if closing is None or self.full[at + len(value):].strip() == closing:
                        break
                at = self.full.find(value, at + 1)
            at = first if at < 0 else at
            if at is not None and at >= 0:
                field.start, field.end = at, at + len(value)
                pos = field.end

    def _locate_transformed_last_field(self) -> None:
        """The render's last field, when the template transformed it (`replace`, `upper`): between the
        template text written just before it and the template text that ends the render.

        Only the last field; the template text between fields is found in order, each piece where it first
        occurs after the one before, and the render must end with the template's final text; what lies
        between is the field's rendered text, unless it holds the text before it again (then an earlier
        field held that text and the place is not certain). (docs/masking.md, rule 7.)
        """
        if not self.order or len(self.segments) != len(self.order) + 1:
            return
        field = self.fields[self.order[-1]]
        if field.start is not None or field.kind != "content" or field.message != max(f.message for f in self.fields):
            return
        before, final = self.segments[-2], self.segments[-1]
        end = len(self.full) - len(final)
        if not before.strip() or not self.full.endswith(final):
            return
        # The template's text between fields, in order, each where it first occurs after the one before.
        if not self.full.startswith(self.segments[0]):
            return
        start = len(self.segments[0])
        for segment in self.segments[1:-1]:
            at = self.full.find(segment, start, end)
            if at < 0:
                return
            start = at + len(segment)
        # Had an earlier field held the text that comes before the last one, that text would still follow.
        if end > start and self.full[start:end].strip() and before.strip() not in self.full[start:end]:
            field.start, field.end = start, end
            field.rendered = self.full[start:end]

    def to_full(self, p: int) -> int | None:
        """The full-render position of placeholder-render position `p`, when `p` is in template text."""
        if not self.exact:
            return None
        j = bisect.bisect_right(self._p_starts, p) - 1
        if j < 0 or p - self._p_starts[j] > len(self.segments[j]):
            return None
        return self._f_starts[j] + (p - self._p_starts[j])

    def placeholder_start(self, message: int) -> int | None:
        """Where message `message`'s first field begins in the placeholder render (None: it has none)."""
        p = len(self.segments[0])
        for j, i in enumerate(self.order):
            if self.fields[i].message == message:
                return p
            p += len(_PLACEHOLDER.format(i)) + len(self.segments[j + 1])
        return None

    def of(self, message: int) -> list[Field]:
        """The found fields of message `message`, in render order (a new list each time)."""
        found = self._of.get(message)
        if found is None:  # positions are final once the alignment is made: each message is sorted once
            found = self._of[message] = sorted((f for f in self.fields if f.message == message and f.start is not None),
                                               key=lambda f: f.start)
        return list(found)

    def missing(self, message: int, kinds: tuple[str, ...] = ("content", "reasoning")) -> list[Field]:
        """Fields of `message` (of the given kinds, non-empty) that the full render does not hold exactly once."""
        return [f for f in self.fields if f.message == message and f.kind in kinds and f.value.strip()
                and (f.start is None or f.occurrences != 1)]

    def bounds(self, message: int) -> tuple[int, int]:
        """The full-render characters around message `message`: from the end of the last other field
        before its own fields to the start of the first other field after them (by position, as a
        template may write messages out of order; by message order for a message without fields)."""
        known = self._bounds.get(message)
        if known is None:
            known = self._bounds[message] = self._bounds_of(message)
        return known

    def _bounds_of(self, message: int) -> tuple[int, int]:
        own = self.of(message)
        others = [f for f in self.fields if f.message != message and f.start is not None]
        if own:
            first, last = own[0].start, max(f.end for f in own)
            before = [f.end for f in others if f.end <= first]
            after = [f.start for f in others if f.start >= last]
        else:
            before = [f.end for f in others if f.message < message]
            after = [f.start for f in others if f.message > message]
        return max(before, default=0), min(after, default=len(self.full))


def placeholder_text(i: int) -> str:
    """The placeholder that stands for field `i` in a placeholder render."""
    return _PLACEHOLDER.format(i)


def text_after_message(placeholder_render: str, fields: list[Field], message: int) -> str | None:
    """The template text a placeholder render holds after message `message`'s last field (None when the
    render holds none of its fields)."""
    ends = []
    for i, field in enumerate(fields):
        if field.message == message:
            placeholder = _PLACEHOLDER.format(i)
            at = placeholder_render.rfind(placeholder)
            if at >= 0:
                ends.append(at + len(placeholder))
    return placeholder_render[max(ends):] if ends else None
