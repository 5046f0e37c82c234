"""One answer's text as its tokens arrive: pieces safe to show at once, cut at the first stop string.

A server streams an answer piece by piece, so it may only give out text that later tokens cannot
take back. Two things can take text back: a token that ends inside a character (byte-level BPE
decodes its partial bytes as U+FFFD until the rest arrive), and a stop string that has begun but not
yet ended (`stop=["\\n\\n"]` after one newline). Both are held back until they resolve. Each piece
carries the tokens whose text begins in it, so per-token data (probabilities) travels with its text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PARTIAL = "\ufffd"
"""What a decoder shows for the bytes of a character that has not fully arrived."""


@dataclass
class Piece:
    """Text safe to show and the tokens (with whatever was recorded for each) that begin in it."""

    text: str
    tokens: list[Any] = field(default_factory=list)


class AnswerText:
    """The decoded answer so far, released in pieces; `stopped` once a stop string appeared.

    The released pieces join to the decoded answer (`tokenizer.decode(ids, skip_special_tokens=True)`)
    up to the first stop string, which is left out, like OpenAI's API leaves it out.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.records: list[Any] = []
        self.starts: list[int] = []
        """Where each token's text begins in the decoded answer."""
        self.text = ""
        """The decoded answer so far, without a trailing partial character."""
        self.released = 0
        """How many characters of `text` were given out."""
        self.released_tokens = 0
        self.stopped = False

    def add(self, token_id: int, record: Any = None) -> Piece | None:
        """Take the next token; return what can now be shown (None when nothing new can)."""
        if self.stopped:
            return None
        self.starts.append(len(self.text))
        self.ids.append(token_id)
        self.records.append(record)
        decoded = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        # A token that ends inside a character: its text is only known once the character completes.
        self.text = decoded.rstrip(PARTIAL) if decoded.startswith(self.text) else self.text
        return self._release(final=False)

    def finish(self) -> Piece | None:
        """The answer ended (stop token or length): release whatever was held back."""
        if self.stopped:
            return None
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._release(final=True)

    def _stop_at(self) -> int | None:
        """Where the first stop string begins in the text, if one has appeared."""
        longest = max((len(s) for s in self.stop), default=0)
        # Text released already held no stop string: search only where a new one could begin.
        begin = max(0, self.released - longest + 1)
        found = [at for at in (self.text.find(s, begin) for s in self.stop) if at >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """How many trailing characters might begin a stop string (so cannot be shown yet)."""
        for size in range(min(len(self.text), max((len(s) for s in self.stop), default=0)), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) and s != tail for s in self.stop):
                return size
        return 0

    def _release(self, *, final: bool) -> Piece | None:
        end = self._stop_at()
        if end is not None:
            self.stopped = True
        else:
            end = len(self.text) if final else len(self.text) - self._held_back()
        end = max(end, self.released)
        count = sum(1 for start in self.starts[self.released_tokens:] if start < end)
        if final and not self.stopped:
            count = len(self.ids) - self.released_tokens  # tokens with no text of their own go with the last piece
        if end == self.released and count == 0:
            return None
        piece = Piece(self.text[self.released:end], self.records[self.released_tokens:self.released_tokens + count])
        self.released, self.released_tokens = end, self.released_tokens + count
        return piece
