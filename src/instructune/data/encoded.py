"""What encoding produces: rows of `input_ids` and `labels`, and the report of a preparation run."""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from itertools import compress

ROLE_NAMES = ("other", "system", "user", "assistant", "tool", "text")
"""Per-token role codes: index into this tuple. `other` is template text outside any message (BOS, separators)."""
ROLE_CODE = {name: code for code, name in enumerate(ROLE_NAMES)}

MAX_NAMED_DROPS = 10_000
"""A report names at most this many dropped rows (the first ones, in row order); `dropped` counts them all.
A million-row source with a bad setting would otherwise carry a million (row, reason) tuples."""


def length_array(values=()) -> array:
    """A compact array of row lengths (4 bytes a row, where a list of ints takes 36)."""
    return array("i", values)


@dataclass
class EncodedRow:
    """One training example, exactly as training sees it (labels unshifted, -100 = not scored)."""

    row: int
    """Index of the row in the source, counting every row read (0-based)."""
    input_ids: list[int]
    labels: list[int]
    roles: list[int]
    """Per-token role code (see `ROLE_NAMES`): which message each token was rendered from."""
    truncated: bool = False
    turn: int | None = None
    """For a row of an expanded conversation (docs/masking.md, rule 8a): the message it trains; else None."""
    source: str | None = None
    """The mixture source the row came from (its `label`), or None for a single source."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        """Tokens that carry a label (are scored by the loss)."""
        return sum(label != -100 for label in self.labels)


@dataclass
class PreparationReport:
    """What a preparation run did to a dataset (docs/masking.md, rule 13)."""

    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Rows not kept, by reason (`bad_row`, `no_trained_tokens`, `too_long`, `content_not_found`, ...)."""
    drops: list[tuple[int, str]] = field(default_factory=list)
    """Rows not kept as (row index, reason), in row order: `dropped` row by row, for the first
    `MAX_NAMED_DROPS` of them (all of them unless more were dropped)."""
    truncated: int = 0
    tokens_total: int = 0
    tokens_trained: int = 0
    tokens_per_role: dict[str, int] = field(default_factory=dict)
    trained_per_role: dict[str, int] = field(default_factory=dict)
    lengths: array = field(default_factory=length_array)
    """Token length of every kept row, in order (an `array('i')`: compact for millions of rows)."""
    warnings: dict[str, int] = field(default_factory=dict)
    """Rows kept with a caveat, by kind (e.g. `no_closing_token`: the template closes turns with nothing)."""
    bad_row_messages: list[str] = field(default_factory=list)
    """The first few error messages of skipped bad rows, for the user to see."""
    expanded: int = 0
    """Conversations made into one row per trained turn, as their template rewrites history (rule 8a)."""
    expanded_rows: int = 0
    """The rows those conversations became (counted in `rows_kept` too)."""
    expanded_tokens: int = 0
    """Tokens of those rows, and of them trained: `expanded_tokens / expanded_trained` is the cost."""
    expanded_trained: int = 0
    notes: dict[str, str] = field(default_factory=dict)
    """One-line explanations with their fix, by kind (`system_not_supported`, `markers_not_in_vocabulary`)."""

    @property
    def trained_fraction(self) -> float:
        """Share of all kept tokens that are scored by the loss."""
        return self.tokens_trained / self.tokens_total if self.tokens_total else 0.0

    def count_drop(self, reason: str, n: int = 1) -> None:
        """Count `n` rows dropped for `reason` (without naming them; see `drop_row`)."""
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def drop_row(self, row: int, reason: str) -> None:
        """Account for one row not kept, naming it."""
        self.count_drop(reason)
        if len(self.drops) < MAX_NAMED_DROPS:
            self.drops.append((row, reason))

    def add_expanded(self, rows: list[EncodedRow]) -> None:
        """Account for the rows of one expanded conversation (after `add_row` of each)."""
        self.expanded += 1
        self.expanded_rows += len(rows)
        self.expanded_tokens += sum(len(r.input_ids) for r in rows)
        self.expanded_trained += sum(r.num_trained for r in rows)

    def add_row(self, row: EncodedRow) -> None:
        """Account for one kept row."""
        self.rows_kept += 1
        self.truncated += int(row.truncated)
        self.tokens_total += len(row.input_ids)
        self.lengths.append(len(row.input_ids))
        # Counted per role code with Counter (C speed), then named: this runs once per row of a dataset.
        trained = Counter(compress(row.roles, [label != -100 for label in row.labels]))
        for role, n in Counter(row.roles).items():
            name = ROLE_NAMES[role]
            self.tokens_per_role[name] = self.tokens_per_role.get(name, 0) + n
            if trained[role]:
                self.tokens_trained += trained[role]
                self.trained_per_role[name] = self.trained_per_role.get(name, 0) + trained[role]

    def merge(self, other: PreparationReport) -> None:
        """Add the counts of `other` (a report of another part of the same dataset) to this one."""
        for name in ("rows_kept", "truncated", "tokens_total", "tokens_trained", "expanded", "expanded_rows",
                     "expanded_tokens", "expanded_trained"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("dropped", "tokens_per_role", "trained_per_role", "warnings"):
            mine = getattr(self, name)
            for key, n in getattr(other, name).items():
                mine[key] = mine.get(key, 0) + n
        self.notes.update(other.notes)
        self.lengths.extend(other.lengths)
        self.add_drops(other.drops)

    def add_drops(self, drops: list[tuple[int, str]]) -> None:
        """Name `drops` too (already counted in `dropped`), keeping the first `MAX_NAMED_DROPS` in row order."""
        self.drops.extend(drops)
        if len(self.drops) > MAX_NAMED_DROPS or drops:
            self.drops.sort()
            del self.drops[MAX_NAMED_DROPS:]
