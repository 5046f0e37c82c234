"""Per-token views of an encoded row: the text each token adds, its id, label and role.

Every renderer (terminal, HTML) draws the same `RowView`, so what a user sees in one is what they
see in the other. The marker convention lives here too, because it is part of what a user reads:

- a run of trained tokens is wrapped in `⟦` … `⟧` (U+27E6/U+27E7: rare in real data, unlike `[[`);
- without colour, exactly one sign stands between two neighbouring tokens: `⟦` or `⟧` where training
  starts or stops, `¦` elsewhere (also at the start of a line, since a token may go on past its
  newline); with colour, alternating background shades show the boundaries instead of `¦`;
- a newline shows as `↵` followed by a real newline, a tab as `→`, other control characters as
  their Unicode control pictures (`␍`, `␀`, …);
- a token that adds no text of its own (the first bytes of a character split across tokens, whose
  text appears on the token that completes it) shows as `▯`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from instructune import IGNORE_INDEX
from instructune.data.encoded import ROLE_NAMES, EncodedRow

MARK_OPEN = "⟦"
MARK_CLOSE = "⟧"
SEPARATOR = "¦"
EMPTY_PIECE = "▯"
NEWLINE = "↵"
TAB = "→"

_HEX_COLOUR = re.compile(r"#[0-9a-fA-F]{6}")


@dataclass
class TokenView:
    """One token as shown: the text it adds to the decoded row, its id and label, and how to draw it."""

    text: str
    token_id: int
    label: int
    role: str = "other"
    special: bool = False
    background: str | None = None
    """A `#rrggbb` colour that replaces the trained/masked shading (e.g. a colour scale of the loss)."""
    note: str = ""
    """Extra hover text after id and label (e.g. `loss 1.61`)."""

    def __post_init__(self) -> None:
        # The colour goes into rich styles and inline CSS; a fixed shape keeps both safe.
        if self.background is not None and not _HEX_COLOUR.fullmatch(self.background):
            raise ValueError(f"background must look like #rrggbb, got {self.background!r}")

    @property
    def trained(self) -> bool:
        """True when the loss scores this token."""
        return self.label != IGNORE_INDEX

    def describe(self) -> str:
        """The hover text: `id 1234 · label 1234 · assistant` or `id 3 · label -100 (masked) · user`."""
        label = f"label {self.label}" if self.trained else f"label {self.label} (masked)"
        parts = [f"id {self.token_id}", label, self.role]
        if self.special:
            parts.append("special")
        if self.note:
            parts.append(self.note)
        return " · ".join(parts)


@dataclass
class RowView:
    """A row ready to draw: its index in the source, its tokens, and whether it was truncated."""

    row: int
    tokens: list[TokenView]
    truncated: bool = False
    notes: list[str] = field(default_factory=list)
    """Extra facts for the row's header line (e.g. `mean loss 1.23`)."""

    @property
    def num_trained(self) -> int:
        """Tokens the loss scores."""
        return sum(token.trained for token in self.tokens)

    def header(self) -> str:
        """One line that names the row: `row 12 · 57 tokens · 20 trained · truncated`."""
        parts = [f"row {self.row}", f"{len(self.tokens)} tokens", f"{self.num_trained} trained"]
        if self.truncated:
            parts.append("truncated")
        return " · ".join(parts + self.notes)


def visible(text: str) -> str:
    """`text` with whitespace and control characters made visible (newline as `↵` plus a real newline)."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append(NEWLINE + "\n")
        elif ch == "\t":
            out.append(TAB)
        elif ord(ch) < 0x20:
            out.append(chr(0x2400 + ord(ch)))  # the Unicode "control pictures" block
        elif ch == "\x7f":
            out.append("␡")
        else:
            out.append(ch)
    return "".join(out) or EMPTY_PIECE


def decode_pieces(tokenizer: Any, input_ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded sequence; their concatenation is the decoded row.

    Decoding tokens one by one is wrong twice over: SentencePiece drops a token's leading space when
    it is decoded alone, and a character split over several byte tokens decodes to `�`. So each
    token is decoded with the tokens before it (a short window) and credited with what it adds; a
    token that only starts a character adds "" and the token that completes it gets the character.
    """
    ids = [int(i) for i in input_ids]

    def decode(window: list[int]) -> str:
        return tokenizer.decode(window, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pieces: list[str] = []
    prefix_start = read_start = 0
    for i in range(len(ids)):
        prefix_text = decode(ids[prefix_start:read_start])
        new_text = decode(ids[prefix_start:i + 1])
        incomplete = new_text.endswith("\ufffd") and i + 1 < len(ids)
        if new_text.startswith(prefix_text) and len(new_text) > len(prefix_text) and not incomplete:
            pieces.append(new_text[len(prefix_text):])
            prefix_start, read_start = read_start, i + 1
        elif not new_text.startswith(prefix_text):
            # A decoder that rewrites earlier text (rare): fall back to this token on its own.
            pieces.append(decode([ids[i]]))
            prefix_start = read_start = i + 1
        else:
            pieces.append("")
    return pieces


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (BOS, EOS, `<|im_end|>`, ...), drawn apart from text."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def row_view(row: EncodedRow, tokenizer: Any) -> RowView:
    """The view of an encoded row: decoded pieces, ids, labels and roles, token by token."""
    pieces = decode_pieces(tokenizer, row.input_ids)
    special = special_ids(tokenizer)
    roles = list(row.roles) or [0] * len(row.input_ids)  # rows built by hand may carry no roles
    tokens = [
        TokenView(text=piece, token_id=int(token_id), label=int(label),
                  role=ROLE_NAMES[role] if 0 <= role < len(ROLE_NAMES) else str(role),
                  special=int(token_id) in special)
        for piece, token_id, label, role in zip(pieces, row.input_ids, row.labels, roles, strict=True)
    ]
    # A row of an expanded conversation (rule 8a) says which turn it trains, with its history as context.
    notes = [f"turn {row.turn}: history as at inference"] if getattr(row, "turn", None) is not None else []
    if getattr(row, "source", None) is not None:  # a mixture's row: which source its row number counts in
        notes.insert(0, f"source {row.source}")
    return RowView(row=row.row, tokens=tokens, truncated=row.truncated, notes=notes)
