"""The marker that closes a turn, derived from the template itself (docs/masking.md, rule 3).

A trained turn is graded through whatever the template writes after the turn's last field and before the
next message: `<|im_end|>`, `<|eot_id|>`, `[|endofturn|]`, a plain `### End` line, the EOS. That text is
found by comparing two renders of the same conversation, not by looking for known names:

- `following`: the full render after the turn's last field, up to the next message's first field
  (closing marker + separator + the next message's header);
- `as_last`: what the template writes after that field when the turn is the last message (the render of
  the messages up to it: closing marker + separator, plus anything a template writes at the very end).

Their common beginning is the closing marker and the separator; the pure-whitespace separator at its end
is left out (ChatML's newline after `<|im_end|>` stays untrained). Two guards keep it from reaching into
the next message: it never ends inside a special token (two headers that share their first characters),
and it stops where the generation prompt begins (a template that always appends the assistant header).
When the two renders disagree from the start (gpt-oss closes the last turn with `<|return|>` and earlier
ones with `<|end|>`), the known markers and the EOS decide, as hints.
"""

from __future__ import annotations

import os
import re

from instructune.data.conversation import Conversation, Message

__all__ = ["closing_text", "hint_closing", "probe_closing_markers", "special_strings_re", "unsplit"]


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
                 atoms: re.Pattern | None, longest: int) -> str | None:
    """The closing marker of a turn (see the module docstring): text that may start with whitespace and
    never ends with it; "" when the template writes nothing after the turn; None when the two renders
    disagree from the start or `as_last` is unknown (the caller then falls back on `hint_closing`)."""
    if as_last is None:
        return None
    n = len(os.path.commonprefix([following, as_last]))
    n = unsplit(following, n, atoms, longest)
    n = unsplit(as_last, n, atoms, longest)
    prompt = generation_prompt.strip()
    if prompt:  # the header the template appends after the last turn is not part of its closing
        for text in (as_last, following):
            at = text.find(prompt, 0, n + len(prompt))
            if 0 <= at < n:
                n = at
    marker = following[:n].rstrip()
    if not marker and as_last.strip():
        return None  # the last turn is closed otherwise than the same turn followed by more
    return marker


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
