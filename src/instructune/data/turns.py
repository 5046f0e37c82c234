"""Which characters of the full render each trained turn covers (docs/masking.md, rules 3, 7, 8a, 8b).

`instructune.data.spans` finds where each message's fields lie; this module decides, from those
positions, what the model writes at inference for each trained turn - from the end of the generation
prompt (think tags, reasoning, content, tool calls) through its closing token - under the reasoning
and end-of-turn policies, and which message each character belongs to. `TurnSpans` is mixed into
`ConversationEncoder`, which provides the template, the options and the renders it uses.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from itertools import compress
from operator import le

from instructune.data.closing import closing_text, hint_closing, message_opening
from instructune.data.conversation import Conversation, Message
from instructune.data.encoded import ROLE_CODE
from instructune.data.spans import Alignment, placeholder_text, text_after_message

_UNKNOWN = object()
_CLOSINGS_KEPT = 4096  # closing markers derived, kept per (text after the turn, text to compare, opening)


class DropRow(Exception):
    """The row cannot be encoded exactly; `reason` is the short name it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class HistoryRewritten(DropRow):
    """An earlier trained turn is not in the full render verbatim: one row cannot hold it (rule 8a)."""

    def __init__(self, k: int):
        super().__init__("content_not_found",
                         f"message {k} is not rendered verbatim: the template rewrites earlier turns")


@dataclass
class TurnSpan:
    """Characters [start, end) of the rendered text trained for message `index`; [marker_start, end) is
    its closing token (marker_start == end when there is none); `texts` must decode from the tokens."""

    index: int
    start: int
    end: int
    marker_start: int
    texts: tuple[str, ...]


class TurnSpans:
    """The span-finding half of `ConversationEncoder` (which sets `options`, `reads_reasoning`,
    `generation_prompt`, `_closing_re`, `render` and `_warn`)."""

    def _trains_reasoning(self, message: Message) -> bool:
        """`reasoning: train`, or the message's own `train: true` (which wins over the policy)."""
        return message.train is True or self.options.reasoning == "train"

    def _turn_span(self, conv: Conversation, full: str, alignment: Alignment, placeholders: list[dict],
                   k: int) -> TurnSpan:
        """Message k's trained characters: from where the model starts writing through its closing token."""
        message = conv.messages[k]
        last = k == len(conv.messages) - 1
        reasoning_trained = self._trains_reasoning(message)
        kinds = ("content", "reasoning") if reasoning_trained else ("content",)
        # Reasoning from a message key that the template never reads is simply not rendered (Llama);
        # reasoning the template reads, or inline reasoning, that is missing was taken out of history.
        missing = [f for f in alignment.missing(k, kinds)
                   if f.kind != "reasoning" or f.source == "inline" or self.reads_reasoning]
        if missing:
            if not last and message.role == "assistant":
                raise HistoryRewritten(k)
            if any(f.kind == "content" for f in missing):
                raise DropRow("content_not_found", f"message {k}'s content is not in its rendered turn")
        if reasoning_trained and alignment.missing(k, ("reasoning",)):  # the template never writes it
            self._warn("reasoning_not_rendered")
        own = alignment.of(k)
        if not own and not alignment.exact:
            # Nothing of the turn was found and positions between renders do not map: its place is unknown.
            raise DropRow("content_not_found", f"message {k} has nothing to find in the render")
        low, high = alignment.bounds(k)
        content = next((f for f in own if f.kind == "content"), None)
        first = own[0].start if own else None
        start = None
        if message.role == "assistant":
            # The prompt may end inside the first field's leading whitespace (QwQ's prompt ends with
            # "<think>\n", which an inline reasoning also starts with). Without a field of its own,
            # the turn's place comes only from the render up to it.
            limit = high if first is None else first + len(own[0].text) - len(own[0].text.lstrip())
            start = self._output_start(conv, alignment, placeholders, k, low, limit, anchored=first is not None)
        if start is None:
            start = first
        if not reasoning_trained and content is not None:  # reasoning is context: start at the content
            start = content.start
        if start is None:
            raise DropRow("content_not_found", f"message {k} has nothing to find in the render")
        after = max([f.end for f in own] + [start])
        closing = self._closing(conv, full, alignment, placeholders, k, after, high)
        if closing:
            marker_start, end = closing
        else:
            end = marker_start = after
            self._warn("no_closing_token")
        if self.generation_prompt and (self.generation_prompt in full[start:start if first is None else first]
                                       or self.generation_prompt in full[after:end]):
            # Another turn's prompt before the turn's fields or after them: the span crosses a turn.
            # (Between them it is the turn's own: gpt-oss writes reasoning and answer as two messages.)
            raise DropRow("content_not_found", f"message {k}'s span would reach into another turn")
        texts = [f.text for f in own if f.kind == "content" or (f.kind == "reasoning" and reasoning_trained)]
        return TurnSpan(index=k, start=start, end=end, marker_start=marker_start, texts=tuple(texts))

    def _closing(self, conv: Conversation, full: str, alignment: Alignment, placeholders: list[dict], k: int,
                 after: int, high: int) -> tuple[int, int] | None:
        """Turn k's closing marker as full-render characters [start, end): what the template writes after
        the turn's last field, before the next message (`instructune.data.closing`); None if nothing."""
        following = full[after:high]
        if k == len(conv.messages) - 1:
            # The end of the render may hold more than the turn's closing (an EOS after every render): the
            # same turn followed by one more message shows what belongs to the turn.
            other = self._text_after_when_followed(conv, alignment, placeholders, k)
            other = following if other is None else other
        else:
            other = self._text_after_as_last(conv, alignment, placeholders, k)
        # Rows of one shape close their turns alike: the rule runs once per distinct pair of texts.
        key = (following, other, alignment.segments[0] if alignment.segments else "")
        marker = self._closings.get(key, _UNKNOWN)
        if marker is _UNKNOWN:
            marker = closing_text(following, other, generation_prompt=self.generation_prompt,
                                  atoms=self.special_atoms, longest=self.longest_atom,
                                  openings=(self.message_opening, self._row_opening(alignment)))
            if len(self._closings) >= _CLOSINGS_KEPT:
                self._closings.clear()
            self._closings[key] = marker
        if marker is None:  # the renders disagree: the known markers and the EOS decide
            hint = hint_closing(following, self._closing_re)
            return (after + hint[0], after + hint[1]) if hint else None
        if not marker:
            return None
        end = after + len(marker)
        if conv.messages[k].extra.get("tool_calls"):
            # Text after a tool call's name is the call's own (its arguments) up to the marker that ends
            # the turn: the known marker (or a special token) that the text ends with.
            for match in self._closing_re.finditer(marker):
                if match.end() == len(marker):
                    return after + match.start(), end
            for start in range(max(0, len(marker) - self.longest_atom), len(marker)):
                match = self.special_atoms.match(marker, start) if self.special_atoms else None
                if match and match.end() == len(marker):
                    return after + start, end
            return end, end  # no marker to tell from the call: the whole text is the call's
        return after, end

    def _row_opening(self, alignment: Alignment) -> str:
        """What this row's render writes before its first field, less the BOS: how a message opens."""
        return message_opening(alignment.segments[0] if alignment.segments else "", self.tokenizer.bos_token)

    def _text_after_as_last(self, conv: Conversation, alignment: Alignment, placeholders: list[dict],
                            k: int) -> str | None:
        """What the template writes after message k's last field when k is the last message (from a
        placeholder render of the messages up to k, kept per conversation shape); None if it cannot."""
        return self._tail(conv, alignment, k, "last", lambda: placeholders[: k + 1])

    def _text_after_when_followed(self, conv: Conversation, alignment: Alignment, placeholders: list[dict],
                                  k: int) -> str | None:
        """What the template writes after the last message k's last field when one more (user) message
        follows, up to that message's text; None if it cannot tell."""
        extra = placeholder_text(len(alignment.fields))
        return self._tail(conv, alignment, k, "followed",
                          lambda: [*placeholders, {"role": "user", "content": extra}], until=extra)

    def _tail(self, conv: Conversation, alignment: Alignment, k: int, kind: str, messages, until: str = "",
              ) -> str | None:
        """The text after message k's last field in a placeholder render of `messages()` (up to `until`
        when given: None if it is not there), kept per conversation shape: the render holds template
        text and placeholders only."""
        key = (alignment.shape_key, k, kind) if alignment.shape_key is not None else None
        if key is not None and key in self._tails:
            return self._tails[key]
        try:
            rendered = self.render(conv, messages=messages())[0]
        except Exception:  # a template that refuses this conversation: the hints decide
            tail = None
        else:
            tail = text_after_message(rendered, alignment.fields, k)
        if tail is not None and until:
            tail = tail[: tail.index(until)] if until in tail else None
        if key is not None:
            self._tails[key] = tail
        return tail

    def _output_start(self, conv: Conversation, alignment: Alignment, placeholders: list[dict], k: int,
                      low: int, high: int, anchored: bool) -> int | None:
        """Where the model starts writing turn k (the end of the generation prompt), from the first of:

        - the last generation prompt text (`<|im_start|>assistant\\n`) before the turn's fields;
        - the render of the messages before k with the generation prompt, when it is a prefix of the
          placeholder render (exact alignment) or of the full render (a template without generation
          prompt text, such as Mistral's, whose prompt ends with the user turn; one that always appends
          the next header, such as Command-R7B's);
        - the generation prompt text without the think block it opens (QwQ, DeepSeek-R1), for turns
          that history renders without one.
        """
        full = alignment.full
        prompt_text = self.generation_prompt
        if prompt_text and anchored:  # found without a render: the common case, and the cheap one
            at = full.rfind(prompt_text, low, high)
            if at >= 0:
                return at + len(prompt_text)
        for messages, rendered in ((placeholders, alignment.placeholder_render), (None, full)):
            if messages is placeholders and not alignment.exact:
                continue
            try:
                prompt = self.render(conv, k, add_generation_prompt=True, messages=messages)[0]
            except Exception:
                continue
            if rendered.startswith(prompt):
                start = alignment.to_full(len(prompt)) if messages is placeholders else len(prompt)
                if start is not None and low <= start <= high:
                    return start
        if anchored and "<think>" in prompt_text:
            opened = prompt_text[: prompt_text.rindex("<think>")]
            at = full.rfind(opened, low, high) if opened else -1
            if at >= 0:
                return at + len(opened)
        return None

    def _generation_spans(self, conv: Conversation, full: str, generation_spans: list[tuple[int, int]],
                          trainable: list[int]) -> list[TurnSpan]:
        """The spans of `{% generation %}` blocks, one per assistant turn, each through its closing token."""
        assistant = [k for k, m in enumerate(conv.messages) if m.role == "assistant"]
        if len(generation_spans) != len(assistant):
            raise DropRow("generation_spans_mismatch",
                          f"{len(generation_spans)} generation blocks for {len(assistant)} assistant turns")
        by_message = dict(zip(assistant, generation_spans))
        spans = []
        for k in trainable:
            if k not in by_message:
                raise DropRow("generation_spans_mismatch", f"message {k} is trained but has no generation block")
            start, end = by_message[k]
            closing = self._closing_re.search(full, start, end)
            if closing is None:  # a block that stops before the closing token: take the token right after
                closing = self._closing_re.search(full, end)
                if closing and full[end:closing.start()].strip():
                    closing = None
            marker_start, end = (closing.start(), max(end, closing.end())) if closing else (end, end)
            message = conv.messages[k]
            spans.append(TurnSpan(k, start, end, marker_start, (message.content.strip(),)))
        return spans

    def _apply_eos_policy(self, full: str, alignment: Alignment, spans: list[TurnSpan]) -> list[TurnSpan]:
        """`train_on_eos`: keep each trained turn's closing token (turn), only the last one's, none, or
        every closing token of the row (all)."""
        policy = self.options.train_on_eos
        if policy in ("none", "last"):
            spans = [s if policy == "last" and i == len(spans) - 1 else replace(s, end=s.marker_start)
                     for i, s in enumerate(spans)]
        if policy == "all":
            inside_fields = [(f.start, f.end) for f in alignment.fields if f.start is not None]
            for match in self._closing_re.finditer(full):
                if not any(a <= match.start() < b for a, b in inside_fields) and not any(
                        s.start <= match.start() < s.end for s in spans):
                    spans.append(TurnSpan(-1, match.start(), match.end(), match.start(), ()))
        return [s for s in spans if s.end > s.start or s.texts]


def message_starts(conv: Conversation, alignment: Alignment, closing_re, spans: list[TurnSpan]) -> dict[int, int]:
    """Where each message's render starts: after the closing token (and newline) that precedes its
    first field, or at a trained span's start if earlier; messages with no field found are left out."""
    starts = {}
    for k in range(len(conv.messages)):
        own = alignment.of(k)
        if not own:
            continue
        low, _ = alignment.bounds(k)
        closing = closing_re.search(alignment.full, low, own[0].start)
        start = own[0].start
        if closing is not None:
            start = closing.end() + len(alignment.full[closing.end():start]) - len(
                alignment.full[closing.end():start].lstrip())
        elif low == 0 and not any(k2 < k for k2 in starts):
            start = 0
        starts[k] = start
    for span in spans:
        if span.index in starts:
            starts[span.index] = min(starts[span.index], span.start)
    return starts


def message_region(starts: dict[int, int], k: int, length: int) -> tuple[int, int]:
    """Message k's characters [start, end): from its start to the next message's (for `train: false`
    under `train_on: all`); `DropRow` when message k was not found."""
    if k not in starts:
        raise DropRow("content_not_found", f"message {k} cannot be found in the render")
    later = [s for s in starts.values() if s > starts[k]]
    return starts[k], min(later, default=length)


def token_roles(conv: Conversation, starts: list[int], ends: list[int], starts_by_message: dict[int, int],
                n_prefix: int) -> list[int]:
    """The role of the message each token was rendered from (token character `starts` and `ends`);
    the tokenizer's prefix (BOS), empty tokens and template text before the first message are `other`."""
    other = ROLE_CODE["other"]
    known = sorted((s, ROLE_CODE[conv.messages[k].role]) for k, s in starts_by_message.items())
    n = len(starts)
    roles = [other] * n
    # Token starts only grow: each message's tokens are one slice, found by bisection.
    for i, (position, code) in enumerate(known):
        a = max(bisect.bisect_left(starts, position, lo=n_prefix), n_prefix)
        b = bisect.bisect_left(starts, known[i + 1][0], lo=a) if i + 1 < len(known) else n
        roles[a:b] = [code] * (b - a)
    for t in compress(range(n_prefix, n), map(le, ends[n_prefix:], starts[n_prefix:])):  # empty tokens
        roles[t] = other
    return roles
