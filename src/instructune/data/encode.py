"""Encoding a conversation into `input_ids` and `labels` with an exact mask (docs/masking.md, rules 1-10).

The conversation is rendered once with the chat template and tokenized once, so the ids are exactly
what the model sees at inference time. The trained character spans come from the template's
`{% generation %}` blocks when it has them, otherwise from a second render of the same conversation
with placeholders (`instructune.data.spans`): each trained assistant turn runs from the end of the
generation prompt (what the model writes at inference: think tags, reasoning, content, tool calls)
through its closing token. Character spans are mapped to tokens through the tokenizer's offsets, and
every trained turn is verified by decoding it. Anything that cannot be derived and verified drops the
row with a named reason (`DropRow`): a row is either exactly right or not trained on at all.

A template that rewrites earlier turns (strips their reasoning) cannot give one exact row: with
`history: auto` (the default) `encode_all` then makes one row per trained turn, the conversation up
to that turn as the template renders it at inference (rule 8a).
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import replace

from transformers.utils.chat_template_utils import render_jinja_template

from instructune import IGNORE_INDEX
from instructune.data.closing import message_opening, probe_closing_markers, special_strings_re
from instructune.data.conversation import Conversation, Message
from instructune.data.encoded import ROLE_CODE, EncodedRow
from instructune.data.options import DEFAULT_ENCODING, EncodingOptions
from instructune.data.spans import REASONING_KEYS, Alignment, placeholder_messages
from instructune.data.templates import END_OF_TURN_MARKERS
from instructune.data.truncate import cut_end, drop_oldest_turn
from instructune.data.turns import (  # DropRow is part of this module's interface
    DropRow,
    HistoryRewritten,
    TurnSpan,
    TurnSpans,
    message_region,
    message_starts,
    token_roles,
)

__all__ = ["ConversationEncoder", "DropRow", "SYSTEM_HINT"]

_PLACEHOLDER_RENDERS_KEPT = 512  # shapes of conversation whose placeholder render is kept
# Jinja that can reach a message's keys without naming them (filters over a whole dict, dict methods).
_GENERIC_ACCESS = re.compile(r"\|\s*(?:tojson|string|pprint|dictsort|xmlattr|list)\b|\.(?:items|keys|values)\s*\(")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_NEVER = re.compile("(?!)")  # matches nothing: a template without any closing marker
_MARKER_SHAPE = re.compile(r"<\|[^<>|\s]{1,40}\|>|<｜[^<>｜]{1,40}｜>|</?[A-Za-z_][\w:.\-]{0,40}>|\[\|?/?[A-Za-z_]{2,30}\|?\]")
SYSTEM_HINT = ("the template rejects the system message: set `system_role: merge` (--system-role merge) "
               "to fold it into the first user turn, or `system_role: drop`")


class ConversationEncoder(TurnSpans):
    """Turns conversations into `EncodedRow`s for one tokenizer, template text and set of options.

    Of `options`, the encoder reads the masking, length, history, reasoning, end-of-turn and system
    policies and `template_vars`; `template_text` is the already resolved template. `warnings` counts
    rows kept with a caveat; `notes` holds one-line explanations for the summary.
    """

    def __init__(self, tokenizer, template_text: str, options: EncodingOptions = DEFAULT_ENCODING):
        self.tokenizer = tokenizer
        self.template = template_text
        self.options = options
        self.has_generation_tags = bool(_GENERATION_TAG.search(template_text))
        self.template_kwargs = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        self.template_vars = _allowed_variables(options.template_variables())
        self.prefix_special_ids = prefix_special_ids_of(tokenizer)
        vocab = tokenizer.get_vocab()
        # Closing markers are derived per turn from the template (instructune.data.closing); the markers
        # of the common formats and the EOS are only hints, for turns whose renders disagree.
        hints = {m for m in END_OF_TURN_MARKERS if m in vocab or m in template_text}
        if tokenizer.eos_token:
            hints.add(tokenizer.eos_token)
        # Strings a closing marker must never split: the vocabulary's added (special) tokens, the hints, and
        # what the template writes in the shape of a marker (`<|...|>`, `<tag>`, `[|...|]`, `[TAG]`), which
        # a tokenizer that lacks them still reads as one unit of the format.
        atoms = {*hints, *tokenizer.get_added_vocab(), *_MARKER_SHAPE.findall(template_text)}
        self.special_atoms = special_strings_re(atoms)
        self.longest_atom = max((len(a) for a in atoms), default=0)
        # Whether the template reads a reasoning key at all (gpt-oss reads `thinking`, which the renderer
        # also fills from `reasoning_content`): if not, reasoning in such a key is simply never rendered.
        self.reads_reasoning = any(key in template_text for key in REASONING_KEYS)
        self.warnings: dict[str, int] = {}
        self.notes: dict[str, str] = {}
        self._placeholder_renders: dict[str, str] = {}
        self._keys_read: dict[str, bool] = {}
        self._reads_generically = bool(_GENERIC_ACCESS.search(template_text))
        self._tails: dict[tuple[str, int, str], str | None] = {}
        self._closings: dict[tuple[str, str, str], str | None] = {}
        self.generation_prompt = self._probe_generation_prompt()
        self.message_opening = self._probe_message_opening()
        self._closing_re = special_strings_re(hints) or _NEVER  # the hints alone, for the probe
        self.closing_markers = sorted({*hints, *probe_closing_markers(self)}, key=len, reverse=True)
        self._closing_re = special_strings_re(self.closing_markers) or _NEVER  # longest first: `<|end|>` vs `<|end|>\n</s>`
        missing = [m for m in self.closing_markers if m in template_text and m not in vocab]
        self.marker_note = (
            f"closing markers not in the vocabulary ({', '.join(missing)}): a marker's last token may merge "
            "with the next text and be trained; add them as special tokens" if missing else "")

    # -- rendering and tokenizing ------------------------------------------------------------------

    def render(self, conv: Conversation, n: int | None = None, *, add_generation_prompt: bool = False,
               with_generation_indices: bool = False, messages: list[dict] | None = None,
               ) -> tuple[str, list[tuple[int, int]]]:
        """Render the first `n` messages (all by default; `messages` replaces the conversation's own);
        also return `{% generation %}` spans if asked."""
        if messages is None:
            messages = conv.template_messages()
        messages = messages[: n if n is not None else len(messages)]
        rendered, indices = render_jinja_template(
            [messages], tools=conv.tools, chat_template=self.template,
            add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=with_generation_indices,
            # A row's own variables win over the configured ones; the special tokens over both.
            **{**self.template_vars, **_allowed_variables(conv.variables), **self.template_kwargs},
        )
        return rendered[0], (indices[0] if indices else [])

    def tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Tokenize the full render once; add the tokenizer's own leading specials (BOS) unless present."""
        backend = self._direct_backend()
        if backend is not None:
            encoding = backend.encode(text, add_special_tokens=False)
            ids, offsets = encoding.ids, encoding.offsets
        else:
            encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(encoding["input_ids"]), list(encoding["offset_mapping"])
        prefix = self.prefix_special_ids
        if prefix and ids[: len(prefix)] != prefix:  # a template that writes its own BOS keeps one BOS
            ids = prefix + ids
            offsets = [(0, 0)] * len(prefix) + offsets
        return ids, offsets

    def _direct_backend(self):
        """The fast tokenizer's Rust backend when calling it gives exactly what `tokenizer(text)` gives.

        `transformers` calls the same backend after setting truncation, padding and whether special
        tokens are split; with none of the first two and the same third setting, the ids and offsets are
        the same, without the wrapper's per-call cost (about a fifth of a row's encoding time).
        """
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is None or not getattr(self.tokenizer, "is_fast", False):
            return None
        if backend.truncation is not None or backend.padding is not None:
            return None
        if backend.encode_special_tokens != bool(getattr(self.tokenizer, "split_special_tokens", False)):
            return None
        return backend

    def _probe_generation_prompt(self) -> str:
        """The text the generation prompt adds after a user turn (`<|im_start|>assistant\\n`), or ""."""
        probe = Conversation([Message("user", "Hello")])
        try:
            with_prompt = self.render(probe, add_generation_prompt=True)[0]
            without = self.render(probe)[0]
        except Exception:  # a template that needs more than one user turn: positions fall back to content
            return ""
        return with_prompt[len(without):] if with_prompt.startswith(without) else ""

    def _probe_message_opening(self) -> str:
        """The template text before the first message's content, less the BOS: what opens a message
        (`<|im_start|>user\n`), or "" when the template refuses the probe."""
        from instructune.data.spans import placeholder_text

        probe = Conversation([Message("user", placeholder_text(0))])
        try:
            rendered = self.render(probe)[0]
        except Exception:
            return ""
        return message_opening(rendered[: max(rendered.find(placeholder_text(0)), 0)], self.tokenizer.bos_token)

    # -- the public entry points -------------------------------------------------------------------

    def encode(self, conv: Conversation, row: int = 0) -> EncodedRow:
        """Encode one conversation as one row (with truncation); raise `DropRow` when it cannot be
        exactly right, including when the template rewrites history (see `encode_all`)."""
        conv = self._apply_system_policy(conv)
        encoded = self._encode_text(conv, row) if conv.is_text else self._encode_messages(conv, row)
        return self._finish(conv, encoded, row)

    def encode_all(self, conv: Conversation, row: int = 0) -> list[EncodedRow]:
        """Encode one conversation as the rows the `history` policy asks for: one row, or one row per
        trained assistant turn when the template rewrites earlier turns (rule 8a). Raise `DropRow`."""
        conv = self._apply_system_policy(conv)
        if conv.is_text:
            return [self._finish(conv, self._encode_text(conv, row), row)]
        turns = [k for k in self._trainable(conv) if conv.messages[k].role == "assistant"]
        if self.options.history == "expand" and len(turns) > 1 and self.options.train_on != "all":
            return self._expand(conv, row, turns)
        try:
            return [self._finish(conv, self._encode_messages(conv, row), row)]
        except HistoryRewritten as rewritten:
            if self.options.history == "drop":
                raise DropRow("history_rewritten", rewritten.detail) from None
            return self._expand(conv, row, turns)

    def _expand(self, conv: Conversation, row: int, turns: list[int]) -> list[EncodedRow]:
        """One row per trained turn k: messages up to k, as at inference, training turn k only."""
        rows = []
        for k in turns:
            shorter = replace(conv, messages=conv.messages[: k + 1])
            encoded = self._encode_messages(shorter, row, only_last=True)
            rows.append(replace(self._finish(shorter, encoded, row, only_last=True), turn=k))
        return rows

    def _finish(self, conv: Conversation, encoded: EncodedRow, row: int, only_last: bool = False) -> EncodedRow:
        if self.options.max_length is not None and len(encoded.input_ids) > self.options.max_length:
            encoded = self._truncate(conv, encoded, row, only_last)
        if not any(label != IGNORE_INDEX for label in encoded.labels[1:]):
            # Position 0 is never a target (nothing precedes it), so it does not count.
            raise DropRow("no_trained_tokens", "no token of this row would be scored")
        return encoded

    def _truncate(self, conv: Conversation, encoded: EncodedRow, row: int, only_last: bool) -> EncodedRow:
        """Fit a row longer than `max_length` by the truncation policy (see `instructune.data.truncate`)."""
        max_length = self.options.max_length
        if self.options.truncation == "drop":
            raise DropRow("too_long", f"{len(encoded.input_ids)} tokens > max_length {max_length}")
        if self.options.truncation == "keep_response" and not conv.is_text:
            current = conv
            while (shorter := drop_oldest_turn(current)) is not None:
                try:
                    candidate = self._encode_messages(shorter, row, only_last)
                except DropRow:
                    break
                if not any(label != IGNORE_INDEX for label in candidate.labels[1:]):
                    break  # the dropped turn held the only trained tokens: cutting the end keeps more
                current, encoded = shorter, replace(candidate, truncated=True)
                if len(encoded.input_ids) <= max_length:
                    return encoded
        return cut_end(encoded, max_length)

    def _apply_system_policy(self, conv: Conversation) -> Conversation:
        """`system_role: merge` folds the system prompt into the first user turn; `drop` leaves it out."""
        if self.options.system_role == "keep" or conv.is_text or not any(m.role == "system" for m in conv.messages):
            return conv
        system = "\n\n".join(m.content for m in conv.messages if m.role == "system")
        rest = [m for m in conv.messages if m.role != "system"]
        if self.options.system_role == "merge":
            first_user = next((i for i, m in enumerate(rest) if m.role == "user"), None)
            if first_user is not None:
                user = rest[first_user]
                rest[first_user] = replace(user, content=system + "\n\n" + user.content if user.content else system)
        return replace(conv, messages=rest)

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

    def _render_full(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        try:
            return self.render(conv, with_generation_indices=self.has_generation_tags)
        except Exception as error:  # a template may raise anything (TemplateError, its own exceptions)
            detail = _one_line(error)
            if any(m.role == "system" for m in conv.messages):
                try:  # does the template render the same conversation without its system prompt?
                    self.render(replace(conv, messages=[m for m in conv.messages if m.role != "system"]))
                except Exception:
                    pass
                else:
                    self.notes["system_not_supported"] = SYSTEM_HINT
                    detail = f"{SYSTEM_HINT} ({detail})"
            raise DropRow("template_error", detail) from None

    def _encode_messages(self, conv: Conversation, row: int, only_last: bool = False) -> EncodedRow:
        full, generation_spans = self._render_full(conv)
        ids, offsets = self.tokenize(full)
        alignment, placeholders = self._align(conv, full)
        n_prefix = len(self.prefix_special_ids)
        labels = [IGNORE_INDEX] * len(ids)
        starts, ends = (list(column) for column in zip(*offsets)) if offsets else ([], [])

        if self.options.train_on == "all":
            starts_by_message = message_starts(conv, alignment, self._closing_re, [])
            roles = token_roles(conv, starts, ends, starts_by_message, n_prefix)
            for i in range(max(n_prefix, 1), len(ids)):  # position 0 is never a target
                labels[i] = ids[i]
            for k, message in enumerate(conv.messages):
                if message.train is False:
                    start, end = message_region(starts_by_message, k, len(full))
                    for t in _tokens_overlapping(starts, ends, start, end):
                        labels[t] = IGNORE_INDEX
            return EncodedRow(row=row, input_ids=ids, labels=labels, roles=roles)

        trainable = [len(conv.messages) - 1] if only_last else self._trainable(conv)
        if generation_spans or self.has_generation_tags:
            spans = self._generation_spans(conv, full, generation_spans, trainable)
        else:
            spans = [self._turn_span(conv, full, alignment, placeholders, k) for k in trainable]
        ordered = sorted(spans, key=lambda span: span.start)
        for a, b in zip(ordered, ordered[1:]):
            if b.start < a.end:  # two turns cannot share characters: one of them was placed wrongly
                raise DropRow("content_not_found", f"messages {a.index} and {b.index} overlap in the render")
        spans = self._apply_eos_policy(full, alignment, spans)
        for span in spans:
            tokens = _tokens_overlapping(starts, ends, span.start, span.end)
            self._verify(span, full, [ids[t] for t in tokens], offsets[tokens[-1]][1] if tokens else 0)
            for t in tokens:
                labels[t] = ids[t]
        roles = token_roles(conv, starts, ends, message_starts(conv, alignment, self._closing_re, spans), n_prefix)
        return EncodedRow(row=row, input_ids=ids, labels=labels, roles=roles)

    def _align(self, conv: Conversation, full: str) -> tuple[Alignment, list[dict]]:
        """Locate every message's fields in `full` (see `instructune.data.spans`)."""
        messages = conv.template_messages()
        alignment = placeholders = None
        for empty in (True, False):
            placeholders, fields = placeholder_messages(conv, messages, empty=empty)
            alignment = self._placeholder_alignment(conv, full, placeholders, fields)
            if alignment.exact or not any(f.kind == "content" and not f.value for f in fields):
                break  # a template that branches on empty content renders differently: retry without them
        return alignment, placeholders

    def _placeholder_alignment(self, conv: Conversation, full: str, placeholders: list[dict],
                               fields: list) -> Alignment:
        """Align `full` with the render of `placeholders`, reusing the render of an earlier conversation
        of the same shape.

        With every field replaced by a numbered placeholder, conversations of one shape (the same roles,
        tools and variables: every Alpaca row, say) render the same text, so it is rendered once. A
        reused render is trusted only when it aligns exactly; otherwise (a template that writes the date,
        say) the conversation is rendered afresh, so the result is always what a fresh render gives.
        """
        read = [{k: v for k, v in message.items() if self._template_may_read(k)} for message in placeholders]
        try:
            key = json.dumps([read, conv.tools, conv.variables], sort_keys=True)
        except (TypeError, ValueError):  # values JSON cannot write: no reuse, no risk of a wrong key
            key = None
        reused = self._placeholder_renders.get(key) if key is not None else None
        if reused is not None:
            alignment = Alignment(full, reused, fields)
            if alignment.exact:
                alignment.shape_key = key
                return alignment
            for f in fields:  # the failed alignment searched them: start again from nothing
                f.start = f.end = None
                f.occurrences = 0
        try:
            rendered = self.render(conv, messages=placeholders)[0]
        except Exception:
            return Alignment(full, "", fields)  # nothing found: every trained turn drops as content_not_found
        if key is not None:
            if len(self._placeholder_renders) >= _PLACEHOLDER_RENDERS_KEPT:
                self._placeholder_renders.clear()
                self._tails.clear()
            self._placeholder_renders[key] = rendered
        alignment = Alignment(full, rendered, fields)
        alignment.shape_key = key
        return alignment

    def _template_may_read(self, name: str) -> bool:
        """Whether the template can read message key `name`: it names it, or reads messages generically
        (`items`, `tojson`, ...). Keys it cannot read (Alpaca's `instruction` for a ChatML template) are
        left out of the shape, so that such rows share one render."""
        known = self._keys_read.get(name)
        if known is None:
            known = self._keys_read[name] = name in ("role", "content") or self._reads_generically or name in self.template
        return known

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

    def _verify(self, span: TurnSpan, full: str, token_ids: list[int], last_token_end: int) -> None:
        """The decoded trained tokens must hold the turn's texts (whitespace aside) and its closing token."""
        if not token_ids:
            if not any(t.strip() for t in span.texts):
                return  # an empty turn trained without its closing token (train_on_eos: none)
            raise DropRow("empty_span", f"message {span.index} maps to no tokens")
        decoded = "".join(self._decode(token_ids).split())
        at = 0
        for text in (*span.texts, full[span.marker_start:span.end]):  # each in order: reasoning, content, marker
            expected = "".join(text.split())
            found = decoded.find(expected, at)
            if found < 0:
                raise DropRow("decode_mismatch",
                              f"the trained tokens of message {span.index} do not decode to its text")
            at = found + len(expected)
        if last_token_end > span.end:  # the closing token merged with the text after it (rule 7)
            self._warn("closing_token_merged")

    def _decode(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, specials kept, no clean-up: the fast tokenizer's own decoder when
        there is one (what `tokenizer.decode` calls, without its per-call overhead)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return backend.decode(token_ids, skip_special_tokens=False)
        return self.tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _warn(self, kind: str) -> None:
        self.warnings[kind] = self.warnings.get(kind, 0) + 1


# render_jinja_template's own parameters: a variable of that name would clash with them.
_RENDER_PARAMETERS = frozenset({"conversations", "tools", "chat_template", "return_assistant_tokens_mask",
                                "continue_final_message", "add_generation_prompt"})


def _allowed_variables(variables: dict) -> dict:
    return {k: v for k, v in variables.items() if k not in _RENDER_PARAMETERS} if variables else {}


def _tokens_overlapping(starts: list[int], ends: list[int], start: int, end: int) -> list[int]:
    """Token indices overlapping [start, end) (docs/masking.md, rule 5: a straddling token counts)."""
    first = bisect.bisect_right(ends, start)
    last = bisect.bisect_left(starts, end, lo=first)
    return [t for t in range(first, last) if ends[t] > starts[t]]


def prefix_special_ids_of(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text (BOS for Llama-style tokenizers, none for others)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(special) - len(plain) + 1):
        if special[i : i + len(plain)] == plain:
            return list(special[:i])
    return []


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__
