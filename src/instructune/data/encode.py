"""Encoding a conversation into `input_ids` and `labels` with an exact mask (docs/masking.md, rules 1-10).

The conversation is rendered once with the chat template and tokenized once, so the ids are exactly
what the model sees at inference time. The trained character spans come from the template's
`{% generation %}` blocks when it has them, otherwise from prefix renders: rendering the first k
messages must give a literal prefix of the full render, so the text between two prefixes is one
message, and the text after the generation prompt is the assistant's own output. Character spans are
mapped to tokens through the tokenizer's offsets, and every trained turn is verified by decoding it.
Anything that cannot be derived and verified drops the row with a named reason (`DropRow`): a row is
either exactly right or not trained on at all.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, replace

from transformers.utils.chat_template_utils import render_jinja_template

from instructune import IGNORE_INDEX
from instructune.data.conversation import Conversation
from instructune.data.encoded import ROLE_CODE, EncodedRow
from instructune.data.options import DEFAULT_ENCODING, EncodingOptions
from instructune.data.templates import END_OF_TURN_MARKERS
from instructune.data.truncate import cut_end, drop_oldest_turn

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class DropRow(Exception):
    """The row cannot be encoded exactly; `reason` is the short name it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class _Span:
    """Characters [start, end) of the rendered text that are trained, for message `index`."""

    index: int
    start: int
    end: int
    content: str


class ConversationEncoder:
    """Turns conversations into `EncodedRow`s for one tokenizer, template text and set of options.

    Of `options`, the encoder reads the masking and length policy (`train_on`, `max_length`,
    `truncation`); `template_text` is the already resolved template.
    """

    def __init__(self, tokenizer, template_text: str, options: EncodingOptions = DEFAULT_ENCODING):
        self.tokenizer = tokenizer
        self.template = template_text
        self.options = options
        self.has_generation_tags = bool(_GENERATION_TAG.search(template_text))
        self.template_kwargs = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        self.prefix_special_ids = _prefix_special_ids(tokenizer)
        vocab = tokenizer.get_vocab()
        markers = {m for m in END_OF_TURN_MARKERS if m in vocab or m in template_text}
        if tokenizer.eos_token:
            markers.add(tokenizer.eos_token)
        # Longest first, so that a marker that contains another one wins at the same position.
        self.closing_markers = sorted(markers, key=len, reverse=True)
        self._closing_re = re.compile("|".join(re.escape(m) for m in self.closing_markers))
        self.warnings: dict[str, int] = {}

    # -- rendering and tokenizing ------------------------------------------------------------------

    def render(self, conv: Conversation, n: int | None = None, *, add_generation_prompt: bool = False,
               with_generation_indices: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """Render the first `n` messages (all by default); also return `{% generation %}` spans if asked."""
        messages = conv.template_messages()[: n if n is not None else len(conv.messages)]
        rendered, indices = render_jinja_template(
            [messages], tools=conv.tools, chat_template=self.template,
            add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=with_generation_indices, **self.template_kwargs,
        )
        return rendered[0], (indices[0] if indices else [])

    def tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Tokenize the full render once; add the tokenizer's own leading specials (BOS) unless present."""
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoding["input_ids"]), list(encoding["offset_mapping"])
        prefix = self.prefix_special_ids
        if prefix and ids[: len(prefix)] != prefix:  # a template that writes its own BOS keeps one BOS
            ids = prefix + ids
            offsets = [(0, 0)] * len(prefix) + offsets
        return ids, offsets

    # -- the public entry point --------------------------------------------------------------------

    def encode(self, conv: Conversation, row: int = 0) -> EncodedRow:
        """Encode one conversation (with truncation); raise `DropRow` when it cannot be exactly right."""
        encoded = self._encode_text(conv, row) if conv.is_text else self._encode_messages(conv, row)
        if self.options.max_length is not None and len(encoded.input_ids) > self.options.max_length:
            encoded = self._truncate(conv, encoded, row)
        if not any(label != IGNORE_INDEX for label in encoded.labels[1:]):
            # Position 0 is never a target (nothing precedes it), so it does not count.
            raise DropRow("no_trained_tokens", "no token of this row would be scored")
        return encoded

    def _truncate(self, conv: Conversation, encoded: EncodedRow, row: int) -> EncodedRow:
        """Fit a row longer than `max_length` by the truncation policy (see `instructune.data.truncate`)."""
        max_length = self.options.max_length
        if self.options.truncation == "drop":
            raise DropRow("too_long", f"{len(encoded.input_ids)} tokens > max_length {max_length}")
        if self.options.truncation == "keep_response" and not conv.is_text:
            current = conv
            while (shorter := drop_oldest_turn(current)) is not None:
                try:
                    candidate = self._encode_messages(shorter, row)
                except DropRow:
                    break
                if not any(label != IGNORE_INDEX for label in candidate.labels[1:]):
                    break  # the dropped turn held the only trained tokens: cutting the end keeps more
                current, encoded = shorter, replace(candidate, truncated=True)
                if len(encoded.input_ids) <= max_length:
                    return encoded
        return cut_end(encoded, max_length)

    # -- plain text rows -----------------------------------------------------------------------------

    def _encode_text(self, conv: Conversation, row: int) -> EncodedRow:
        ids, _ = self.tokenize(conv.text)
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)  # a document ends with EOS so the model learns where documents stop
        n_prefix = len(self.prefix_special_ids)
        n_masked = max(n_prefix, 1)  # position 0 is never a target
        labels = [IGNORE_INDEX] * n_masked + ids[n_masked:]
        roles = [ROLE_CODE["other"]] * n_prefix + [ROLE_CODE["text"]] * (len(ids) - n_prefix)
        return EncodedRow(row=row, input_ids=ids, labels=labels, roles=roles)

    # -- conversations -------------------------------------------------------------------------------

    def _encode_messages(self, conv: Conversation, row: int) -> EncodedRow:
        try:
            full, generation_spans = self.render(conv, with_generation_indices=self.has_generation_tags)
        except Exception as error:  # a template may raise anything (TemplateError, its own exceptions)
            raise DropRow("template_error", _one_line(error)) from None
        ids, offsets = self.tokenize(full)
        boundaries = self._message_boundaries(conv, full)
        roles = _token_roles(conv, offsets, boundaries, len(self.prefix_special_ids))
        labels = [IGNORE_INDEX] * len(ids)

        if self.options.train_on == "all":
            for i in range(max(len(self.prefix_special_ids), 1), len(ids)):  # position 0 is never a target
                labels[i] = ids[i]
            for k, message in enumerate(conv.messages):
                if message.train is False:
                    start, end = _region(boundaries, k, "train: false")
                    for t in _tokens_overlapping(offsets, start, end):
                        labels[t] = IGNORE_INDEX
            return EncodedRow(row=row, input_ids=ids, labels=labels, roles=roles)

        for span in self._trained_spans(conv, full, boundaries, generation_spans):
            tokens = _tokens_overlapping(offsets, span.start, span.end)
            self._verify(span, [ids[t] for t in tokens])
            for t in tokens:
                labels[t] = ids[t]
        return EncodedRow(row=row, input_ids=ids, labels=labels, roles=roles)

    def _trainable(self, conv: Conversation) -> list[int]:
        """Indices of the messages whose content is trained under the policy and per-message flags."""
        assistant = [k for k, m in enumerate(conv.messages) if m.role == "assistant"]
        chosen = set(assistant if self.options.train_on == "assistant" else assistant[-1:])
        for k, message in enumerate(conv.messages):
            if message.train is True:
                chosen.add(k)
            elif message.train is False:
                chosen.discard(k)
        return sorted(chosen)

    def _message_boundaries(self, conv: Conversation, full: str) -> list[int | None]:
        """Character offset where each message's render starts (None where a prefix render disagrees).

        `boundaries[k]` is len(render(messages[:k])) when that render is a literal prefix of the full
        one; `boundaries[n]` is len(full).
        """
        n = len(conv.messages)
        boundaries: list[int | None] = [None] * (n + 1)
        boundaries[n] = len(full)
        for k in range(n):
            try:
                prefix = self.render(conv, k)[0] if k else self._render_empty(conv)
            except Exception:
                continue
            if full.startswith(prefix):
                boundaries[k] = len(prefix)
        if boundaries[0] is None:
            boundaries[0] = 0  # templates that cannot render no messages start the first one at 0
        return boundaries

    def _render_empty(self, conv: Conversation) -> str:
        try:
            return self.render(conv, 0)[0]
        except Exception:
            return ""

    def _trained_spans(self, conv: Conversation, full: str, boundaries: list[int | None],
                       generation_spans: list[tuple[int, int]]) -> list[_Span]:
        spans = []
        assistant_indices = [k for k, m in enumerate(conv.messages) if m.role == "assistant"]
        by_message = {}
        if self.has_generation_tags:
            if len(generation_spans) != len(assistant_indices):
                raise DropRow("generation_spans_mismatch",
                              f"{len(generation_spans)} generation blocks for {len(assistant_indices)} assistant turns")
            by_message = dict(zip(assistant_indices, generation_spans))
        for k in self._trainable(conv):
            message = conv.messages[k]
            if k in by_message:
                start, end = by_message[k]
                end = self._extend_to_closing(full, start, end)
            else:
                start, end = _region(boundaries, k, "the template rewrites earlier turns")
                if message.role == "assistant":
                    start = self._after_generation_prompt(conv, k, full, start, end)
            spans.append(self._locate(message, full, start, end, k))
        return spans

    def _after_generation_prompt(self, conv: Conversation, k: int, full: str, start: int, end: int) -> int:
        """Where the assistant's own output begins: after the generation prompt, when it is a prefix."""
        try:
            prompt = self.render(conv, k, add_generation_prompt=True)[0]
        except Exception:
            return start
        if full.startswith(prompt) and start <= len(prompt) <= end:
            return len(prompt)
        return start

    def _extend_to_closing(self, full: str, start: int, end: int) -> int:
        """A `{% generation %}` block that stops before the closing token: take the token right after."""
        if self._closing_re.search(full, start, end):
            return end
        match = self._closing_re.search(full, end)
        if match and not full[end:match.start()].strip():
            return match.end()
        return end

    def _locate(self, message, full: str, start: int, end: int, k: int) -> _Span:
        """The trained characters of message k inside [start, end): its content through the closing token."""
        content = message.content
        stripped = content.strip()
        if content and full.startswith(content, start):
            a, content_end = start, start + len(content)
        elif stripped:
            a = full.find(stripped, start, end)
            if a < 0:
                raise DropRow("content_not_found", f"message {k}'s content is not in its rendered turn")
            content_end = a + len(stripped)
        else:  # empty content (a tool-call turn): the turn's own output starts after leading whitespace
            region = full[start:end]
            a = content_end = start + len(region) - len(region.lstrip())
        closing = self._closing_re.search(full, content_end, end)
        if closing:
            b = closing.end()
        else:
            b = content_end + len(full[content_end:end].rstrip())
            self.warnings["no_closing_token"] = self.warnings.get("no_closing_token", 0) + 1
        return _Span(index=k, start=a, end=b, content=stripped)

    def _verify(self, span: _Span, token_ids: list[int]) -> None:
        """The decoded trained tokens must contain the message's content (whitespace aside)."""
        if not token_ids:
            raise DropRow("empty_span", f"message {span.index} maps to no tokens")
        decoded = self.tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if "".join(span.content.split()) not in "".join(decoded.split()):
            raise DropRow("decode_mismatch", f"the trained tokens of message {span.index} do not decode to its content")


def _region(boundaries: list[int | None], k: int, why: str) -> tuple[int, int]:
    start, end = boundaries[k], boundaries[k + 1]
    if start is None or end is None or end < start:
        raise DropRow("prefix_mismatch", f"cannot isolate message {k}: {why}")
    return start, end


def _tokens_overlapping(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Token indices overlapping [start, end) (docs/masking.md, rule 5: a straddling token counts)."""
    return [t for t, (s, e) in enumerate(offsets) if e > s and s < end and e > start]


def _token_roles(conv: Conversation, offsets: list[tuple[int, int]], boundaries: list[int | None],
                 n_prefix: int) -> list[int]:
    """The role of the message each token was rendered from; template text outside messages is `other`."""
    known = [(b, k) for k, b in enumerate(boundaries[:-1]) if b is not None]
    starts = [b for b, _ in known]
    codes = [ROLE_CODE[m.role] for m in conv.messages]
    roles = []
    for t, (s, e) in enumerate(offsets):
        if t < n_prefix or e <= s:
            roles.append(ROLE_CODE["other"])
            continue
        i = bisect.bisect_right(starts, s) - 1
        roles.append(codes[known[i][1]] if i >= 0 else ROLE_CODE["other"])
    return roles


def _prefix_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text (BOS for Llama-style tokenizers, none for others)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(special) - len(plain) + 1):
        if special[i : i + len(plain)] == plain:
            return list(special[:i])
    return []


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__
