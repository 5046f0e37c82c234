"""Preparing a whole dataset: read, encode in parallel, count what happened, and cache the result.

The cache is keyed by the conversations themselves, the tokenizer, the template text and the
options that shape rows (`EncodingOptions.row_settings`), so a second run with the same inputs loads
the encoded rows instead of encoding them again, and any change to one of those inputs encodes afresh.

With the cache on (the default), preparation streams: a first pass reads the source row by row to
compute the key (nothing is kept), and on a miss a second pass reads it again in chunks of
`SHARD_ROWS` conversations, which worker processes encode and write to the cache as shards
(`data/shards.py`) as they go. Memory holds a few chunks, whatever the size of the source; a run
that is interrupted leaves its finished shards, and the next run with the same inputs encodes only
the rest. The rows come back memory-mapped (`shards.ShardedRows`). With the cache off
(`cache_dir=False`), the rows are encoded into a list in memory, as for one-off evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shlex
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import instructune
from instructune.cache import cache_dir as default_cache_dir
from instructune.data.conversation import Conversation
from instructune.data.encode import ConversationEncoder, DropRow
from instructune.data.encoded import EncodedRow, PreparationReport
from instructune.data.options import DEFAULT_ENCODING, EncodingOptions
from instructune.data.shards import (
    cache_full_error,
    finished_shard,
    lengths_of,
    load_manifest,
    write_manifest,
    write_shard,
)
from instructune.data.stream import StreamTally, chunked, record_rows, stream_conversations
from instructune.data.templates import add_template_tokens, resolve_template
from instructune.disk import is_disk_full
from instructune.errors import UserError

# Below this many rows, starting worker processes costs more than it saves.
PARALLEL_MIN_ROWS = 2000
SHARD_ROWS = 4096
"""Most conversations per shard: large enough that a shard's files and its trip to a worker cost little
next to encoding it, small enough that a few in flight per worker stay a few MB."""
MIN_SHARD_ROWS = 256
"""Fewest conversations per shard (but for the last): smaller sources get 16 shards or fewer, so that the
workers share them evenly."""


def shard_rows(total: int) -> int:
    """Conversations per shard for a source of `total`: a function of the source alone, so that a
    resumed run cuts the same chunks."""
    return min(SHARD_ROWS, max(MIN_SHARD_ROWS, -(-total // 16)))


@dataclass
class PreparedDataset:
    """Encoded rows ready for batching, with the report of how they were made.

    `rows` is a list, or with the cache on a memory-mapped `shards.ShardedRows` (a sequence of
    `EncodedRow` too: index it, slice it, iterate it).
    """

    rows: Sequence[EncodedRow]
    report: PreparationReport
    template: str
    """The Jinja template text the rows were rendered with (saved with checkpoints)."""
    from_cache: bool = False
    read_again: Callable[[], Iterator[tuple[int, Conversation]]] | None = None
    """Reads the source's conversations again (what `conversations` lists)."""
    _conversations: list[tuple[int, Conversation]] | None = None
    tokenizer: object = None
    """The tokenizer the rows were encoded with."""
    options: EncodingOptions = DEFAULT_ENCODING
    """The encoding options the rows were made with."""

    def __len__(self) -> int:
        return len(self.rows)

    def to_hf(self, *, streaming: bool = False):
        """The rows as a `datasets.Dataset` (`datasets.IterableDataset` with `streaming=True`, for data
        larger than memory) with columns `input_ids`, `labels` (-100 where not trained), `attention_mask`
        and `row` (the source row): what TRL's `SFTTrainer` and transformers' `Trainer` take as is."""
        from instructune.data.hf_dataset import to_hf_dataset, to_iterable_hf_dataset

        return to_iterable_hf_dataset(self.rows) if streaming else to_hf_dataset(self.rows)

    @property
    def conversations(self) -> list[tuple[int, Conversation]]:
        """Every conversation read, kept or dropped, as (row index, conversation).

        Read again from the source the first time it is asked for, so that preparing a large source
        does not hold them all.
        """
        if self._conversations is None:
            self._conversations = list(self.read_again()) if self.read_again is not None else []
        return self._conversations


def prepare_dataset(data: str | os.PathLike | Sequence[Conversation | dict | list] | Callable, tokenizer,
                    options: EncodingOptions = DEFAULT_ENCODING, *, template_text: str | None = None,
                    num_proc: int | None = None,
                    cache_dir: str | os.PathLike | None | bool = None, limit: int | None = None) -> PreparedDataset:
    """Read `data`, encode every row with masks, and report; `cache_dir=False` disables the cache.

    `data` is a source (a file, a folder, a Hub dataset name), or rows in memory: `Conversation`s, or
    records in any dataset format (dicts; a list of messages is a `messages` record), which are read
    like a file's rows (the same format detection, checks and errors, the source named `records`), or a
    function `read(tally)` that yields (row index, conversation) and counts into the `StreamTally` it
    is given (when not None), as `stream.stream_conversations` does (`limit` does not apply to it).

    A built-in template's missing markers are added to `tokenizer` as special tokens (see
    `templates.add_template_tokens`); a caller holding a model resizes its embeddings to match.
    `template_text` is a template the caller has already resolved (a loaded model's): it renders
    instead of `options.template`, and no tokens are added. `limit` takes only the first `limit` rows.
    """
    if template_text is None:
        add_template_tokens(tokenizer, options.template)
        template_text = resolve_template(options.template, tokenizer)
    encoder = ConversationEncoder(tokenizer, template_text, options)

    def read(tally: StreamTally | None = None) -> Iterator[tuple[int, Conversation]]:
        if callable(data):  # a reader of its own (a mixture's source: data/mixture_sources.py)
            return data(tally)
        if isinstance(data, (str, os.PathLike)):
            return stream_conversations(data, data_format=options.data_format, on_bad_row=options.on_bad_row,
                                        limit=limit, tally=tally)
        if not all(isinstance(item, Conversation) for item in data):
            return stream_conversations("records", data_format=options.data_format, on_bad_row=options.on_bad_row,
                                        limit=limit, tally=tally, rows=record_rows(data))
        conversations = list(enumerate(data))[:limit]
        if tally is not None:
            tally.rows_read = tally.conversations = len(conversations)
        return iter(conversations)

    report, tally = PreparationReport(), StreamTally()
    prepared = PreparedDataset(rows=[], report=report, template=template_text, read_again=read, tokenizer=tokenizer,
                               options=options)
    if cache_dir is False:
        conversations = list(read(tally))
        prepared._conversations = conversations
        _count_reading(report, tally)
        prepared.rows, encoding_report = encode_conversations(encoder, conversations, num_proc)
        report.merge(encoding_report)
        return prepared

    key = CacheKey(tokenizer, template_text, options)
    for index, conv in read(tally):  # the key needs every conversation; they are not kept
        key.add(index, conv)
    _count_reading(report, tally)
    entry = Path(cache_dir or default_cache_dir()) / "prepared" / key.hexdigest()
    stored = load_manifest(entry)
    prepared.from_cache = stored is not None
    if stored is None:
        try:
            _encode_to_shards(encoder, read(), entry, num_proc, tally.conversations)
            stored = load_manifest(entry)
        except OSError as error:
            if is_disk_full(error):  # the run would fill the same disk with its checkpoints: say so now
                raise cache_full_error(entry, tally.conversations) from None
            stored = None
    if stored is None:  # the cache is an optimisation: a read-only cache folder must not stop the run
        prepared._conversations = list(read())
        prepared.rows, encoding_report = encode_conversations(encoder, prepared._conversations, num_proc)
        report.merge(encoding_report)
        return prepared
    prepared.rows, encoding_report = stored
    encoding_report.lengths = lengths_of(prepared.rows)
    # What reading found (rows read, bad rows) belongs to this run; what encoding found comes from the shards.
    report.merge(encoding_report)
    return prepared


def _count_reading(report: PreparationReport, tally: StreamTally) -> None:
    report.rows_read = tally.rows_read
    if tally.bad_rows:
        report.count_drop("bad_row", tally.bad_rows)
    report.add_drops([(index, "bad_row") for index in tally.bad_row_indices])
    report.bad_row_messages = list(tally.bad_row_messages)


def nothing_kept(report: PreparationReport) -> str:
    """`no rows kept: 12 template_error, 3 too_long` (the most frequent reason first)."""
    if not report.rows_read:
        return "no rows kept: the data has no rows"
    reasons = sorted(report.dropped.items(), key=lambda item: (-item[1], item[0]))
    return "no rows kept: " + (", ".join(f"{n:,} {reason}" for reason, n in reasons) or f"{report.rows_read:,} read")


def require_kept_rows(source: str | os.PathLike, report: PreparationReport, hint: str) -> None:
    """A `UserError` when preparing `source` kept no row: the drop reasons and counts, then `hint`
    (what shows why, such as the `instructune inspect` command for the same settings)."""
    if not report.rows_kept:
        raise UserError(f"{source}: {nothing_kept(report)}; {hint}")


def encoding_flags(options: EncodingOptions) -> str:
    """The command-line flags that give `options` (those that differ from the defaults), such as
    ` --template chat.jinja --max-length 256`, for a command to suggest."""
    flags = []
    for item in dataclasses.fields(options):
        value = getattr(options, item.name)
        if value == getattr(DEFAULT_ENCODING, item.name):
            continue
        if item.name == "template_vars":  # stored as (name, JSON) pairs; the flag takes a JSON object
            value = json.dumps(options.template_variables(), ensure_ascii=False)
        flag = "--format" if item.name == "data_format" else "--" + item.name.replace("_", "-")
        flags.append(f" {flag} {shlex.quote(str(value))}")
    return "".join(flags)


def encode_conversations(encoder: ConversationEncoder, conversations: list[tuple[int, Conversation]],
                         num_proc: int | None = None) -> tuple[list[EncodedRow], PreparationReport]:
    """Encode (row, conversation) pairs, in worker processes for large inputs; keeps the input order.

    Returns the kept rows and a report of the encoding (kept, dropped by reason, tokens, warnings).
    """
    if num_proc is None:
        num_proc = (os.cpu_count() or 1) if len(conversations) >= PARALLEL_MIN_ROWS else 1
    if num_proc <= 1 or len(conversations) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return _encode_range(encoder, conversations, 0, len(conversations))
    # Workers are forked, so they inherit the encoder and the conversations without pickling them;
    # each one encodes a range and counts its own part of the report.
    global _WORKER_STATE
    _WORKER_STATE = (encoder, conversations)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    size = max(1, -(-len(conversations) // (num_proc * 4)))
    ranges = [(i, min(i + size, len(conversations))) for i in range(0, len(conversations), size)]
    try:
        with multiprocessing.get_context("fork").Pool(num_proc) as pool:
            results = pool.starmap(_encode_in_worker, ranges)
    finally:
        _WORKER_STATE = None
    rows, report = [], PreparationReport()
    for part_rows, part_report in results:
        rows.extend(part_rows)
        report.merge(part_report)
    return rows, report


_WORKER_STATE: tuple | None = None
"""What forked workers inherit: (encoder, conversations) or (encoder, cache entry folder)."""


def _encode_in_worker(start: int, end: int):
    encoder, conversations = _WORKER_STATE
    return _encode_range(encoder, conversations, start, end)


def _encode_range(encoder: ConversationEncoder, conversations, start: int, end: int):
    rows, report = [], PreparationReport()
    encoder.warnings, encoder.notes = report.warnings, report.notes
    if encoder.marker_note:
        report.notes["markers_not_in_vocabulary"] = encoder.marker_note
    for index, conv in conversations[start:end]:
        try:
            encoded = encoder.encode_all(conv, index)
        except DropRow as drop:
            report.drop_row(index, drop.reason)
            continue
        rows.extend(encoded)
        for row in encoded:
            report.add_row(row)
        if encoded[0].turn is not None:
            report.add_expanded(encoded)
    return rows, report


# -- the cache -----------------------------------------------------------------------------------------

def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((type(tokenizer).__name__ + specials + vocab).encode()).hexdigest()


class CacheKey:
    """The cache key, fed one (row index, conversation) at a time so that no list of them is needed."""

    def __init__(self, tokenizer, template_text: str, options: EncodingOptions):
        self._digest = hashlib.sha256()
        # `entry` changes when what an entry holds changes (2: the report names each dropped row; 3: the
        # trained turn of expanded rows). Shards hold what an entry 3 held, so the key stays.
        settings = {"version": instructune.__version__, "entry": 3, **options.row_settings()}
        for part in (json.dumps(settings, sort_keys=True), template_text, _tokenizer_fingerprint(tokenizer)):
            self._digest.update(part.encode())
            self._digest.update(b"\0")

    def add(self, index: int, conv: Conversation) -> None:
        """Account for the next conversation of the source."""
        self._digest.update(json.dumps([index, *key_fields(conv)], ensure_ascii=False, default=str).encode())

    def hexdigest(self) -> str:
        """The key: a folder name under the cache's `prepared/`."""
        return self._digest.hexdigest()[:32]


KEY_MESSAGE_FIELDS = ("role", "content", "train", "extra")
KEY_CONVERSATION_FIELDS = ("messages", "tools", "text", "variables")


def key_fields(conv: Conversation) -> list:
    """Every field of `conv` and of its messages, as plain values for the key: what `dataclasses.asdict`
    gives, without its deep copy (which cost most of the key pass). A test keeps the field lists whole."""
    messages = [[m.role, m.content, m.train, m.extra] for m in conv.messages]
    return [messages, conv.tools, conv.text, conv.variables]


def _cache_key(conversations, tokenizer, template_text: str, options: EncodingOptions) -> str:
    key = CacheKey(tokenizer, template_text, options)
    for index, conv in conversations:
        key.add(index, conv)
    return key.hexdigest()


def _encode_to_shards(encoder: ConversationEncoder, conversations: Iterator[tuple[int, Conversation]],
                      entry: Path, num_proc: int | None, total: int) -> None:
    """Encode `conversations` chunk by chunk into the shards of `entry` (in worker processes for large
    inputs), keeping the shards a previous run finished; then write the manifest.

    Chunks go to the workers as they are read, at most two per worker ahead of the one being waited
    for, so memory holds a few chunks whatever the size of the source.
    """
    if num_proc is None:
        num_proc = (os.cpu_count() or 1) if total >= PARALLEL_MIN_ROWS else 1
    size = shard_rows(total)
    num_proc = min(num_proc, -(-total // size))
    parallel = num_proc > 1 and "fork" in multiprocessing.get_all_start_methods()
    report, shards, pending = PreparationReport(), [], deque()
    pool = None
    if parallel:
        # Forked workers inherit the encoder; each chunk travels to one and only its report comes back.
        global _WORKER_STATE
        _WORKER_STATE = (encoder, entry)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        pool = multiprocessing.get_context("fork").Pool(num_proc)
    try:
        for number, chunk in enumerate(chunked(conversations, size)):
            where = {"number": number, "first_row": chunk[0][0], "conversations": len(chunk)}
            shards.append(where)
            done = finished_shard(entry, number, first_row=where["first_row"], conversations=len(chunk))
            if done is not None:
                pending.append(done)
            elif pool is not None:
                pending.append(pool.apply_async(_encode_chunk_in_worker, (number, chunk)))
            else:
                pending.append(_encode_chunk(encoder, entry, number, chunk))
            while len(pending) > 2 * num_proc:
                report.merge(_result(pending.popleft()))
        while pending:
            report.merge(_result(pending.popleft()))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
            _WORKER_STATE = None
    write_manifest(entry, shards, report)


def _result(pending) -> PreparationReport:
    return pending if isinstance(pending, PreparationReport) else pending.get()


def _encode_chunk(encoder: ConversationEncoder, entry: Path, number: int, chunk: list) -> PreparationReport:
    """Encode one chunk, write it as shard `number`, and return its report."""
    rows, report = _encode_range(encoder, chunk, 0, len(chunk))
    write_shard(entry, number, rows, report, first_row=chunk[0][0], conversations=len(chunk))
    return report


def _encode_chunk_in_worker(number: int, chunk: list) -> PreparationReport:
    encoder, entry = _WORKER_STATE
    return _encode_chunk(encoder, entry, number, chunk)
