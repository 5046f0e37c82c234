"""What encoding produces: rows of `input_ids` and `labels`, and the report of a preparation run."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLE_NAMES = ("other", "system", "user", "assistant", "tool", "text")
"""Per-token role codes: index into this tuple. `other` is template text outside any message (BOS, separators)."""
ROLE_CODE = {name: code for code, name in enumerate(ROLE_NAMES)}


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
    """Rows not kept, by reason (`bad_row`, `no_trained_tokens`, `too_long`, `prefix_mismatch`, ...)."""
    drops: list[tuple[int, str]] = field(default_factory=list)
    """Each row not kept as (row index, reason), in row order: `dropped` row by row."""
    truncated: int = 0
    tokens_total: int = 0
    tokens_trained: int = 0
    tokens_per_role: dict[str, int] = field(default_factory=dict)
    trained_per_role: dict[str, int] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)
    """Token length of every kept row, in order."""
    warnings: dict[str, int] = field(default_factory=dict)
    """Rows kept with a caveat, by kind (e.g. `no_closing_token`: the template closes turns with nothing)."""
    bad_row_messages: list[str] = field(default_factory=list)
    """The first few error messages of skipped bad rows, for the user to see."""

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
        self.drops.append((row, reason))

    def add_row(self, row: EncodedRow) -> None:
        """Account for one kept row."""
        self.rows_kept += 1
        self.truncated += int(row.truncated)
        self.tokens_total += len(row.input_ids)
        self.lengths.append(len(row.input_ids))
        for role, label in zip(row.roles, row.labels):
            name = ROLE_NAMES[role]
            self.tokens_per_role[name] = self.tokens_per_role.get(name, 0) + 1
            if label != -100:
                self.tokens_trained += 1
                self.trained_per_role[name] = self.trained_per_role.get(name, 0) + 1

    def merge(self, other: PreparationReport) -> None:
        """Add the counts of `other` (a report of another part of the same dataset) to this one."""
        for name in ("rows_kept", "truncated", "tokens_total", "tokens_trained"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("dropped", "tokens_per_role", "trained_per_role", "warnings"):
            mine = getattr(self, name)
            for key, n in getattr(other, name).items():
                mine[key] = mine.get(key, 0) + n
        self.lengths.extend(other.lengths)
        self.drops.extend(other.drops)
