"""A data mixture: several sources, each encoded (and cached) on its own, then deduplicated, split into
training and held-out rows, and sampled by exact shares.

`prepare_mixture` takes the sources (`mixture_sources.SourceSpec`) through these steps, in order:

1. **Encode** each source with its own settings through `prepare_dataset`, which caches it by its own
   content: changing one source re-encodes that source only. The rows a source's conversation becomes
   (one, or one per turn: docs/masking.md, rule 8a) stay together as one *unit* from here on.
2. **Dedupe** (`dedupe: exact`): a unit whose encoded rows (tokens and trained positions) equal an
   earlier unit's, in the same or an earlier source, is dropped and counted as `duplicate`.
3. **Hold out** per source the units whose content hash (`mixture_sources.content_hash`: the
   conversation as read, whatever its position, source or the seed) falls below `eval_split` of the hash
   range, or with `eval_rows: N` the N lowest hashes. A row's side depends on its content alone, so
   appending rows to a source never moves an earlier row between training and evaluation (with
   `eval_split`), and the same content is held out in every source it appears in.
4. **Sample** the training units by the exact counts of `shares.plan_counts`: a count above what the
   source has repeats every unit as often as it fits, and the rest (or a smaller count) is the units
   first in a seeded order (a hash of the seed and the unit's content and row), so the same seed and
   data take the same rows whatever `num_proc`, and appending rows keeps most of a sample.

The result's rows carry their source (`EncodedRow.source`, the label) and their row within it.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from instructune.data.encoded import EncodedRow, PreparationReport
from instructune.data.mixture_sources import SourceSpec, check_readable, source_reader
from instructune.data.options import EncodingOptions
from instructune.data.prepare import PreparedDataset, nothing_kept, prepare_dataset
from instructune.data.shards import RowSequence, row_digests, source_rows
from instructune.data.shares import plan_counts
from instructune.data.templates import add_template_tokens, resolve_template
from instructune.errors import UserError

DEDUPE = ("none", "exact")
"""`dedupe`: keep every row, or drop a row that encodes exactly like an earlier one."""
HASH_RANGE = 1 << 64


@dataclass
class SourceResult:
    """What the mixture did with one source: the counts its summary line and table show."""

    source: SourceSpec
    encoding: PreparationReport
    """The source's own preparation report: every row read, kept or dropped by the encoder."""
    units: int = 0
    """Conversations the encoder kept (the unit of held-out rows and of shares)."""
    duplicates: int = 0
    held_out: int = 0
    available: int = 0
    """Training units: kept, less duplicates and held-out ones."""
    wanted: int = 0
    """What the share asks for (exactly what is taken)."""
    repeated: int = 0
    """Taken units that repeat one taken before."""
    train: PreparationReport = field(default_factory=PreparationReport)
    """The taken training rows (repeats counted each time): tokens, trained tokens, lengths."""
    eval_rows: int = 0

    @property
    def taken(self) -> int:
        """Units taken for training (equal to `wanted`)."""
        return self.wanted


@dataclass
class Mixture:
    """The training and held-out rows of a mixture, and what happened to each source."""

    train_rows: Sequence[EncodedRow]
    eval_rows: Sequence[EncodedRow]
    sources: list[SourceResult]
    report: PreparationReport
    """The training rows' report: rows read and dropped over every source, tokens and lengths of the rows
    taken (repeats counted each time), and the encoders' warnings and notes."""
    template: str
    train_digests: set[bytes] = field(default_factory=set, repr=False)
    """The `row_digests` of the training rows, to find evaluation rows that equal one."""

    def overlap(self, rows: Sequence[EncodedRow]) -> int:
        """How many of `rows` (evaluation rows) equal a training row, token for token."""
        return sum(digest in self.train_digests for digest in row_digests(rows))


class MixtureRows(RowSequence):
    """Rows of several sources' prepared rows, by position, each labelled with its source."""

    def __init__(self, parts: list[tuple[str, Sequence[EncodedRow], np.ndarray]]):
        self._parts = [(label, rows, np.asarray(positions, dtype=np.int64)) for label, rows, positions in parts]
        counts = [len(positions) for _, _, positions in self._parts]
        self._starts = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=self._starts[1:])
        lengths = [_lengths(rows)[positions] for _, rows, positions in self._parts]
        self.lengths = np.concatenate(lengths).astype(np.int32) if lengths else np.zeros(0, dtype=np.int32)

    def _row(self, index: int) -> EncodedRow:
        number = int(np.searchsorted(self._starts, index, side="right")) - 1
        label, rows, positions = self._parts[number]
        return replace(rows[int(positions[index - int(self._starts[number])])], source=label)


def _lengths(rows: Sequence[EncodedRow]) -> np.ndarray:
    if isinstance(rows, RowSequence):
        return np.asarray(rows.lengths)
    return np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))


def prepare_mixture(sources: list[SourceSpec], tokenizer, options: EncodingOptions, *, seed: int = 42,
                    eval_split: float = 0.0, dedupe: str = "none", mixture_rows: int | None = None,
                    num_proc: int | None = None, cache_dir: str | os.PathLike | None | bool = None) -> Mixture:
    """Encode, dedupe, hold out and sample `sources` (see the module's docstring); `options` are the run's
    encoding settings, which each source's own replace; `eval_split` is the held-out share of a source that
    gives neither `eval_split` nor `eval_rows`. A share that cannot be met, or a source left without a
    training row, is a `UserError` naming the source and the key."""
    if dedupe not in DEDUPE:
        raise UserError(f"dedupe must be one of {', '.join(DEDUPE)}, got {dedupe!r}")
    check_readable(sources)
    add_template_tokens(tokenizer, options.template)
    template = resolve_template(options.template, tokenizer)
    seen: set[bytes] = set()
    parts = []
    for source in sources:
        hashes = array("Q")
        own = source.options(options)
        prepared = prepare_dataset(source_reader(source, own, hashes), tokenizer, own, template_text=template,
                                   num_proc=num_proc, cache_dir=cache_dir)
        parts.append(_SourceUnits(source, prepared, hashes))
        parts[-1].split(seen if dedupe == "exact" else None, eval_split)
    counts = plan_counts([p.source.share for p in parts], [p.result.available for p in parts],
                         [p.source.where for p in parts], mixture_rows)
    train, held, digests = [], [], set()
    for part, count in zip(parts, counts, strict=True):
        positions = part.take(count, seed)
        train.append((part.source.label, part.prepared.rows, positions))
        held.append((part.source.label, part.prepared.rows, part.positions(part.held)))
        digests.update(part.digests[i] for i in np.unique(positions))
    return Mixture(train_rows=MixtureRows(train), eval_rows=MixtureRows(held),
                   sources=[p.result for p in parts], report=_training_report(parts), template=template,
                   train_digests=digests)


class _SourceUnits:
    """One source's encoded rows grouped by conversation, and which of them go where."""

    def __init__(self, source: SourceSpec, prepared: PreparedDataset, hashes: array):
        self.source, self.prepared = source, prepared
        self.result = SourceResult(source, prepared.report)
        numbers = source_rows(prepared.rows)
        self.starts = np.flatnonzero(np.r_[True, numbers[1:] != numbers[:-1]]) if len(numbers) else \
            np.zeros(0, dtype=np.int64)
        self.ends = np.r_[self.starts[1:], len(numbers)].astype(np.int64)
        self.rows = numbers[self.starts]
        """The source row of each unit."""
        self.hashes = np.array([hashes[r] for r in self.rows.tolist()], dtype=np.uint64)
        self.digests = self._unit_digests()
        self.result.units = len(self.rows)
        self.train = np.arange(len(self.rows))
        self.held = np.zeros(0, dtype=np.int64)

    def _unit_digests(self) -> list[bytes]:
        rows = row_digests(self.prepared.rows)
        if len(rows) == len(self.starts):
            return rows
        return [hashlib.blake2b(b"".join(rows[a:b]), digest_size=8).digest()
                for a, b in zip(self.starts.tolist(), self.ends.tolist())]

    def split(self, seen: set[bytes] | None, default_split: float) -> None:
        """Drop duplicates (of `seen`, which it extends; None: no dedupe), then hold out by content hash."""
        source, result = self.source, self.result
        keep = np.arange(len(self.rows))
        if seen is not None:
            unique = []
            for unit in keep.tolist():
                if self.digests[unit] not in seen:
                    seen.add(self.digests[unit])
                    unique.append(unit)
            result.duplicates = len(keep) - len(unique)
            keep = np.asarray(unique, dtype=np.int64)
        if source.eval_rows is not None:
            if source.eval_rows >= len(keep) and source.eval_rows:
                raise UserError(f"{source.where}: 'eval_rows' holds out {source.eval_rows:,} rows, but the source "
                                f"has {len(keep):,} (after dropped and duplicate rows), which would leave none to "
                                "train on; lower eval_rows")
            order = np.lexsort((self.rows[keep], self.hashes[keep]))
            held_mask = np.zeros(len(keep), dtype=bool)
            held_mask[order[:source.eval_rows]] = True
        else:
            share = source.eval_split if source.eval_split is not None else default_split
            held_mask = self.hashes[keep] < np.uint64(min(HASH_RANGE - 1, int(share * HASH_RANGE)))
        self.train, self.held = keep[~held_mask], keep[held_mask]
        result.held_out = result.eval_rows = len(self.held)
        result.available = len(self.train)
        if not result.available and not (source.share.key is not None and source.share.value == 0):
            raise UserError(f"{source.where}: no training row left ({self._accounting()}); check the source "
                            "with `instructune inspect` on the run's config")

    def _accounting(self) -> str:
        result = self.result
        parts = [f"{result.encoding.rows_read:,} read", nothing_kept(result.encoding).removeprefix("no rows kept: ")
                 if not result.units else f"{result.units:,} kept"]
        if result.duplicates:
            parts.append(f"{result.duplicates:,} duplicate")
        if result.held_out:
            parts.append(f"{result.held_out:,} held out")
        return ", ".join(parts)

    def take(self, count: int, seed: int) -> np.ndarray:
        """The positions (in the prepared rows) of `count` training units: every unit as often as it fits,
        the rest the first in the seeded order; in source-row order, repeats side by side."""
        result, units = self.result, self.train
        result.wanted = count
        times = np.full(len(units), count // len(units) if len(units) else 0, dtype=np.int64)
        rest = count - int(times.sum())
        if rest:
            keys = [hashlib.blake2b(f"{seed}:{h}:{r}".encode(), digest_size=8).digest()
                    for h, r in zip(self.hashes[units].tolist(), self.rows[units].tolist())]
            first = sorted(range(len(units)), key=keys.__getitem__)[:rest]
            times[first] += 1
        result.repeated = count - int(np.count_nonzero(times))
        chosen = np.repeat(units, times)
        for unit, n in zip(units[times > 0].tolist(), times[times > 0].tolist()):
            for row in range(int(self.starts[unit]), int(self.ends[unit])):
                encoded = self.prepared.rows[row]
                for _ in range(n):
                    result.train.add_row(encoded)
        result.train.rows_read = result.encoding.rows_read
        return self.positions(chosen)

    def positions(self, units: np.ndarray) -> np.ndarray:
        """The positions in the prepared rows of `units`' rows, in order."""
        if not len(units):
            return np.zeros(0, dtype=np.int64)
        if np.all(self.ends[units] - self.starts[units] == 1):
            return self.starts[units]
        return np.concatenate([np.arange(self.starts[u], self.ends[u]) for u in units.tolist()])


def _training_report(parts: list[_SourceUnits]) -> PreparationReport:
    report = PreparationReport()
    for part in parts:
        encoding, train = part.result.encoding, part.result.train
        report.rows_read += encoding.rows_read
        for reason, n in encoding.dropped.items():
            report.count_drop(reason, n)
        if part.result.duplicates:
            report.count_drop("duplicate", part.result.duplicates)
        for name in ("warnings",):
            for key, n in getattr(encoding, name).items():
                report.warnings[key] = report.warnings.get(key, 0) + n
        report.notes.update(encoding.notes)
        report.bad_row_messages += encoding.bad_row_messages[:5 - len(report.bad_row_messages)]
        train_only = replace(train, warnings={}, notes={})
        report.merge(train_only)
    return report
