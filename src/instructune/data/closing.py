"""The marker that closes a turn, derived from the template itself (docs/masking.md, rule 3).

A trained turn is graded through whatever the template writes after the turn's last field and before the
next message: `<|im_end|>`, `<|eot_id|>`, `[|endofturn|]`, a plain `### End` line, the EOS. That text is
found by comparing two renders of the same conversation, not by looking for known names:

- `following`: the full render after the turn's last field, up to the next message's first field
  (closing marker + separator + the next message's header);
- `as_last`: what the template writes after that field when the turn is the last message (the render of
  the messages up to it: closing marker + separator, plus anything a template writes at the very end).

Their common beginning is the closing marker and the separator; the pure-whitespace separator at its end
is left out (ChatML's newline after `<|im_end|>` stays untrained). Three guards keep it from reaching into
the next message: it never ends inside a special token (two headers that share their first characters),
it stops where the generation prompt begins (a template that always appends the assistant header), and
it never ends with the special tokens that open every message (what the render starts with).
When the two renders disagree from the start (gpt-oss closes the last turn with `<|return|>` and earlier
ones with `<|end|>`), the known markers and the EOS decide, as hints.
"""

from __future__ import annotations

import os
import re

from instructune.data.conversation import Conversation, Message

__all__ = ["closing_text", "hint_closing", "message_opening", "probe_closing_markers", "special_strings_re",
           "unsplit"]


def special_strings_re(strings) -> re.Pattern | None:
    """A pattern matching any of `strings` (special tokens, known markers), longest first; None if none."""
    kept = sorted({s for s in strings if isinstance(s, str) and len(s.strip()) > 1}, key=len, reverse=True)
    return re.compile("|".join(re.escape(s) for s in kept)) if kept else None


def unsplit(text: str, n: int, atoms: re.Pattern | None, longest: int) -> int:
    """`n`, or the start of the special token of `text` that position `n` would split."""
    if atoms is None or n <= 0 or n >= len(text):
        return n
    for start in range(max(0, n - longest + 1), n):
        match = atoms.match(text, start)
        if match and match.end() > n:
            return start
    return n


def closing_text(following: str, as_last: str | None, *, generation_prompt: str,
                 atoms: re.Pattern | None, longest: int, openings: tuple[str, ...] = ()) -> str | None:
    """The closing marker of a turn (see the module docstring): text that may start with whitespace and
    never ends with it; "" when the template writes nothing after the turn; None when the two renders
    disagree from the start or `as_last` is unknown (the caller then falls back on `hint_closing`).

    The renders are compared with whitespace left out (Nemotron writes `</TOOLCALL><SPECIAL_12>` after
    a last tool call and `</TOOLCALL>\n<SPECIAL_12>` before more): the marker is `following`'s text.
    """
    if as_last is None:
        return None
    count = _common_visible(following, as_last)  # characters other than whitespace both begin with
    while True:  # never end inside a special token of either text
        cut = min(_visible(following, unsplit(following, _position(following, count), atoms, longest)),
                  _visible(as_last, unsplit(as_last, _position(as_last, count), atoms, longest)))
        if cut == count:
            break
        count = cut
    prompt = generation_prompt.strip()
    if prompt:  # the header the template appends after the last turn is not part of its closing
        for text in (as_last, following):
            at = text.find(prompt, 0, _position(text, count) + len(prompt))
            if 0 <= at and _visible(text, at) < count:
                count = _visible(text, at)
    marker = following[:_position(following, count)].rstrip()
    for opening in openings:
        marker = _without_opening(marker, opening, atoms)
    if not marker and as_last.strip():
        return None  # the last turn is closed otherwise than the same turn followed by more
    return marker


def _common_visible(a: str, b: str) -> int:
    """How many characters other than whitespace `a` and `b` begin with alike (whitespace left out)."""
    a_visible, b_visible = "".join(a.split()), "".join(b.split())
    return len(os.path.commonprefix([a_visible, b_visible]))


def _visible(text: str, position: int) -> int:
    """The number of characters other than whitespace in `text[:position]`."""
    return position - sum(c.isspace() for c in text[:position])


def _position(text: str, count: int) -> int:
    """The end of the first `count` characters of `text` other than whitespace (0 for none)."""
    if count <= 0:
        return 0
    seen = 0
    for position, char in enumerate(text):
        if not char.isspace():
            seen += 1
            if seen == count:
                return position + 1
    return len(text)


def _without_opening(marker: str, opening: str, atoms: re.Pattern | None) -> str:
    """`marker` less the special tokens at its end that open every message (Command R7B starts each turn
    with `<|START_OF_TURN_TOKEN|>` and appends one after the last turn: the two renders share it)."""
    if not opening or atoms is None:
        return marker
    for start in range(len(marker)):  # the longest such end first
        if atoms.match(marker, start) and opening.startswith(marker[start:]):
            return marker[:start].rstrip()
    return marker


def message_opening(before_first_field: str, bos: str | None) -> str:
    """What opens a message: the template text a render writes before its first field, less the BOS and
    leading whitespace (`<|im_start|>user\n`)."""
    if bos and before_first_field.startswith(bos):
        before_first_field = before_first_field[len(bos):]
    return before_first_field.lstrip()


def hint_closing(following: str, hints: re.Pattern | None) -> tuple[int, int] | None:
    """Where the first known marker (or the EOS) lies in `following`, as (start, end); None if nowhere."""
    if hints is None:
        return None
    match = hints.search(following)
    return (match.start(), match.end()) if match else None


def probe_closing_markers(encoder) -> list[str]:
    """The closing markers the template writes after an assistant turn, found by the encoder's own rule
    on probe conversations: the turn followed by a user turn, and the turn last. Used as hints (the `all`
    end-of-turn policy, where messages start) and as stop strings for generation; [] when the template
    renders neither shape."""
    from instructune.data.spans import Alignment, placeholder_messages

    markers: list[str] = []
    shapes = ([Message("user", "Hello"), Message("assistant", "Hi there"), Message("user", "Bye")],
              [Message("system", "Be brief."), Message("user", "Hello"), Message("assistant", "Hi there"),
               Message("user", "Bye")])
    for messages in shapes:
        assistant = len(messages) - 2
        for conv in (Conversation(messages), Conversation(messages[:-1])):
            try:
                placeholders, fields = placeholder_messages(conv, conv.template_messages(), empty=True)
                full = encoder.render(conv)[0]
                alignment = Alignment(full, encoder.render(conv, messages=placeholders)[0], fields)
                own = alignment.of(assistant)
                if not alignment.exact or not own:
                    continue
                after = max(f.end for f in own)
                closing = encoder._closing(conv, full, alignment, placeholders, assistant, after,
                                           alignment.bounds(assistant)[1])
            except Exception:  # a template that refuses this shape: try the next one
                continue
            marker = full[closing[0]:closing[1]].strip() if closing else ""
            if marker and marker not in markers:
                markers.append(marker)
        if markers:
            break
    return markers
