"""Preparing a whole dataset: read, encode in parallel, count what happened, and cache the result.

The cache is keyed by the conversations themselves, the tokenizer, the template text and the
options that shape rows (`EncodingOptions.row_settings`), so a second run with the same inputs loads
the encoded rows instead of encoding them again, and any change to one of those inputs encodes afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shlex
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import instructune
from instructune.cache import cache_dir as default_cache_dir
from instructune.data.conversation import Conversation
from instructune.data.encode import ConversationEncoder, DropRow
from instructune.data.encoded import EncodedRow, PreparationReport
from instructune.data.options import DEFAULT_ENCODING, EncodingOptions
from instructune.data.readers import read_conversations
from instructune.data.templates import add_template_tokens, resolve_template
from instructune.errors import UserError

# Below this many rows, starting worker processes costs more than it saves.
PARALLEL_MIN_ROWS = 2000


@dataclass
class PreparedDataset:
    """Encoded rows ready for batching, with the report of how they were made."""

    rows: list[EncodedRow]
    report: PreparationReport
    template: str
    """The Jinja template text the rows were rendered with (saved with checkpoints)."""
    from_cache: bool = False
    conversations: list[tuple[int, Conversation]] = field(default_factory=list)
    """Every conversation read, kept or dropped, as (row index, conversation)."""


def prepare_dataset(data: str | os.PathLike | list[Conversation], tokenizer,
                    options: EncodingOptions = DEFAULT_ENCODING, *, template_text: str | None = None,
                    num_proc: int | None = None,
                    cache_dir: str | os.PathLike | None | bool = None, limit: int | None = None) -> PreparedDataset:
    """Read `data`, encode every row with masks, and report; `cache_dir=False` disables the cache.

    A built-in template's missing markers are added to `tokenizer` as special tokens (see
    `templates.add_template_tokens`); a caller holding a model resizes its embeddings to match.
    `template_text` is a template the caller has already resolved (a loaded model's): it renders
    instead of `options.template`, and no tokens are added. `limit` takes only the first `limit` rows.
    """
    if template_text is None:
        add_template_tokens(tokenizer, options.template)
        template_text = resolve_template(options.template, tokenizer)
    report = PreparationReport()
    if isinstance(data, (str, os.PathLike)):
        read = read_conversations(data, data_format=options.data_format, on_bad_row=options.on_bad_row,
                                  limit=limit)
        conversations = read.conversations
        report.rows_read = read.rows_read
        for index in read.bad_row_indices:
            report.drop_row(index, "bad_row")
        report.bad_row_messages = list(read.bad_row_messages)
    else:
        conversations = list(enumerate(data))[:limit]
        report.rows_read = len(conversations)

    encoder = ConversationEncoder(tokenizer, template_text, options)
    prepared = PreparedDataset(rows=[], report=report, template=template_text, conversations=conversations)
    cache_path = None
    if cache_dir is not False:
        key = _cache_key(conversations, tokenizer, template_text, options)
        cache_path = Path(cache_dir or default_cache_dir()) / "prepared" / key
        cached = _load_cache(cache_path, report)
        if cached is not None:
            prepared.rows, prepared.from_cache = cached, True
            return prepared

    prepared.rows, encoding_report = encode_conversations(encoder, conversations, num_proc)
    report.merge(encoding_report)
    report.drops.sort()  # the bad rows of reading and the drops of encoding, in row order
    if cache_path is not None:
        _save_cache(cache_path, prepared.rows, report)
    return prepared


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


_WORKER_STATE: tuple[ConversationEncoder, list] | None = None


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


def _cache_key(conversations, tokenizer, template_text: str, options: EncodingOptions) -> str:
    digest = hashlib.sha256()
    # `entry` changes when what an entry holds changes (2: the report names each dropped row; 3: the
    # trained turn of expanded rows).
    settings = {"version": instructune.__version__, "entry": 3, **options.row_settings()}
    for part in (json.dumps(settings, sort_keys=True), template_text, _tokenizer_fingerprint(tokenizer)):
        digest.update(part.encode())
        digest.update(b"\0")
    for index, conv in conversations:
        digest.update(json.dumps([index, asdict(conv)], ensure_ascii=False, default=str).encode())
    return digest.hexdigest()[:32]


def _save_cache(path: Path, rows: list[EncodedRow], report: PreparationReport) -> None:
    """Write the cache entry into a temporary folder, then rename it into place (never half-written)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
        lengths = np.array([len(r.input_ids) for r in rows], dtype=np.int64)
        np.savez(
            tmp / "rows.npz",
            lengths=lengths,
            row=np.array([r.row for r in rows], dtype=np.int64),
            truncated=np.array([r.truncated for r in rows], dtype=np.bool_),
            turn=np.array([-1 if r.turn is None else r.turn for r in rows], dtype=np.int64),
            input_ids=np.array([t for r in rows for t in r.input_ids], dtype=np.int64),
            labels=np.array([t for r in rows for t in r.labels], dtype=np.int64),
            roles=np.array([t for r in rows for t in r.roles], dtype=np.int8),
        )
        (tmp / "report.json").write_text(json.dumps(asdict(report)))
        try:
            os.replace(tmp, path)
        except OSError:  # another process wrote the same entry first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass  # the cache is an optimisation; a read-only or full disk must not stop the run


def _load_cache(path: Path, report: PreparationReport) -> list[EncodedRow] | None:
    try:
        arrays = np.load(path / "rows.npz", allow_pickle=False)
        saved = json.loads((path / "report.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    # What reading found (rows read, bad rows) belongs to this run; what encoding found comes from the cache.
    for key, value in saved.items():
        if key == "dropped":
            for reason, n in value.items():
                if reason != "bad_row":
                    report.count_drop(reason, n)
        elif key == "drops":
            cached_drops = [(row, reason) for row, reason in value if reason != "bad_row"]
            report.drops = sorted(report.drops + cached_drops)
        elif key not in ("rows_read", "bad_row_messages"):
            setattr(report, key, value)
    ends = np.cumsum(arrays["lengths"])
    starts = ends - arrays["lengths"]
    input_ids, labels, roles = arrays["input_ids"].tolist(), arrays["labels"].tolist(), arrays["roles"].tolist()
    turns = arrays["turn"].tolist()
    return [
        EncodedRow(row=int(r), input_ids=input_ids[s:e], labels=labels[s:e], roles=roles[s:e], truncated=bool(t),
                   turn=None if turn < 0 else int(turn))
        for r, s, e, t, turn in zip(arrays["row"].tolist(), starts.tolist(), ends.tolist(),
                                    arrays["truncated"].tolist(), turns)
    ]
