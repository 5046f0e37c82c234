"""The sources of a data mixture: each one's settings, checked, and its rows read as conversations.

`data:` in a training config is one path, or a list of sources. A source is a path (a file, a folder or
a Hub dataset name) or a mapping with `path` and any of the keys in `SOURCE_KEYS`: where the rows come
from (Hub `split`, `name`, `revision`, `data_files`), how they are read (`format`, `columns`, `roles`,
`system`), how they are encoded (any encoding option but `template`, which is one for the whole run),
its share (`rows`, `fraction` or `weight`, `repeat`) and its held-out rows (`eval_split`, `eval_rows`).

`parse_sources` checks the settings (a `ValueError` naming the source and key, which the configuration
turns into its one-line error); `check_readable` checks the files and the column mapping against the
first row, before any tokenizer or model is loaded; `source_reader` reads a source's rows, mapped, as
the `(row index, conversation)` pairs `prepare_dataset` encodes.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructune.data.conversation import ROLES, Conversation, ConversationError, Message
from instructune.data.options import EncodingOptions, OptionError
from instructune.data.shares import SHARE_KEYS, Share
from instructune.data.sources import RawRow, iter_hub_rows, iter_rows, looks_like_hub_name
from instructune.data.stream import StreamTally, stream_conversations
from instructune.errors import UserError

HUB_KEYS = ("split", "name", "revision", "data_files")
"""What `datasets.load_dataset` takes besides the dataset's name (`name` is its configuration)."""
ENCODING_KEYS = {"format": "data_format", "train_on": "train_on", "max_length": "max_length",
                 "truncation": "truncation", "on_bad_row": "on_bad_row", "history": "history",
                 "reasoning": "reasoning", "train_on_eos": "train_on_eos", "system_role": "system_role",
                 "template_vars": "template_vars"}
"""A source's encoding keys (as the configuration names them) and the `EncodingOptions` field of each."""
SOURCE_KEYS = ("path", "label", *SHARE_KEYS, "repeat", "eval_split", "eval_rows", "columns", "roles", "system",
               *HUB_KEYS, *ENCODING_KEYS)
TURN_KEYS = ("messages", "conversations", "prompt", "completion")
"""Record keys that may hold a list of messages, whose speakers `roles` renames."""


@dataclass(frozen=True)
class SourceSpec:
    """One source of a mixture, checked."""

    index: int
    """Its place in the `data:` list (0-based)."""
    path: str
    label: str
    """What rows, summaries and errors call it: the `label` given, else its index."""
    share: Share
    eval_split: float | None = None
    """Share of its rows held out for evaluation (by content hash); None: the run's default."""
    eval_rows: int | None = None
    """Exactly this many rows held out instead (the lowest content hashes)."""
    columns: tuple[tuple[str, str], ...] = ()
    """(the key a format reads, the record's own column) pairs."""
    roles: tuple[tuple[str, str], ...] = ()
    """(the record's speaker name, the role it stands for) pairs."""
    system: str | None = None
    """A system prompt for its conversations that have none."""
    encoding: tuple[tuple[str, Any], ...] = ()
    """(EncodingOptions field, value) pairs that replace the run's settings for this source."""
    hub: tuple[tuple[str, Any], ...] = ()
    """(`datasets.load_dataset` keyword, value) pairs."""

    @property
    def where(self) -> str:
        """`data source 2 (chat.csv)`, or `data source 'chat' (chat.csv)` when it has a label, for errors."""
        name = f"'{self.label}'" if self.label != str(self.index) else str(self.index)
        return f"data source {name} ({self.path})"

    def options(self, base: EncodingOptions) -> EncodingOptions:
        """The run's encoding options with this source's own settings in place."""
        return dataclasses.replace(base, **dict(self.encoding))


def parse_sources(value: Any) -> list[SourceSpec]:
    """The sources of a `data:` list, checked; a `ValueError` names the source and key of the first mistake."""
    if not isinstance(value, list) or not value:
        raise ValueError("expected a path or a non-empty list of sources (paths, or mappings with a 'path')")
    sources = [_parse_source(index, item) for index, item in enumerate(value)]
    labels = [source.label for source in sources]
    for source in sources:
        if labels.count(source.label) > 1:
            raise ValueError(f"{source.where}: 'label' {source.label!r} names more than one source; give each its own")
    return sources


def _parse_source(index: int, item: Any) -> SourceSpec:
    if isinstance(item, (str, os.PathLike)):
        item = {"path": str(item)}
    if not isinstance(item, dict):
        raise ValueError(f"data source {index}: expected a path or a mapping with a 'path', got {item!r}")
    path = item.get("path")
    name = f"data source {index}" + (f" ({path})" if isinstance(path, str) else "")
    for key in item:
        if key not in SOURCE_KEYS:
            close = difflib.get_close_matches(str(key), SOURCE_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"{name}: unknown key '{key}'{hint}; a source takes {', '.join(SOURCE_KEYS)}")
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{name}: 'path' must be a file, a folder or a Hub dataset name, got {path!r}")
    label = item.get("label", str(index))
    if not isinstance(label, (str, int)) or isinstance(label, bool) or not str(label).strip():
        raise ValueError(f"{name}: 'label' must be a non-empty name, got {label!r}")
    if "label" in item:
        name = f"data source '{label}' ({path})"
    return SourceSpec(index=index, path=path, label=str(label), share=_share(item, name),
                      eval_split=_eval_split(item, name), eval_rows=_count(item, "eval_rows", name, minimum=0),
                      columns=_mapping(item, "columns", name), roles=_roles(item, name),
                      system=_text(item, "system", name), encoding=_encoding(item, name),
                      hub=tuple((key, item[key]) for key in HUB_KEYS if item.get(key) is not None))


def _share(item: dict, name: str) -> Share:
    given = [key for key in SHARE_KEYS if item.get(key) is not None]
    if len(given) > 1:
        raise ValueError(f"{name}: give one of 'rows', 'fraction' or 'weight', not {' and '.join(repr(k) for k in given)}")
    repeat = item.get("repeat", True)
    if not isinstance(repeat, bool):
        raise ValueError(f"{name}: 'repeat' must be true or false, got {repeat!r}")
    if not given:
        return Share(None, 1, repeat)
    key = given[0]
    if key == "rows":
        return Share(key, _count(item, key, name, minimum=0), repeat)
    value = item[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
        raise ValueError(f"{name}: '{key}' must be a number of 0 or more, got {value!r}")
    return Share(key, value, repeat)


def _count(item: dict, key: str, name: str, *, minimum: int) -> int | None:
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: '{key}' must be a whole number of {minimum} or more, got {value!r}")
    return value


def _eval_split(item: dict, name: str) -> float | None:
    value = item.get("eval_split")
    if value is None:
        return None
    if item.get("eval_rows") is not None:
        raise ValueError(f"{name}: give 'eval_split' or 'eval_rows', not both")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name}: 'eval_split' must be in [0, 1), got {value!r}")
    return float(value)


def _text(item: dict, key: str, name: str) -> str | None:
    value = item.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name}: '{key}' must be a string, got {value!r}")
    return value


def _mapping(item: dict, key: str, name: str) -> tuple[tuple[str, str], ...]:
    value = item.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{name}: '{key}' must map names to names, such as {{messages: dialog}}, got {value!r}")
    return tuple(value.items())


def _roles(item: dict, name: str) -> tuple[tuple[str, str], ...]:
    pairs = _mapping(item, "roles", name)
    for speaker, role in pairs:
        if role not in ROLES:
            raise ValueError(f"{name}: 'roles' maps {speaker!r} to {role!r}, which is not a role (expected one of "
                             f"{', '.join(ROLES)})")
    return pairs


def _encoding(item: dict, name: str) -> tuple[tuple[str, Any], ...]:
    pairs = tuple((field, item[key]) for key, field in ENCODING_KEYS.items() if key in item)
    try:
        options = dataclasses.replace(EncodingOptions(), **dict(pairs))
    except OptionError as error:
        key = "format" if error.field == "data_format" else error.field
        raise ValueError(f"{name}: '{key}' {error.problem}") from None
    # template_vars as the options hold them (sorted JSON pairs), so the source stays hashable.
    return tuple((field, getattr(options, field)) for field, _ in pairs)


# -- reading -------------------------------------------------------------------------------------------

def raw_rows(source: SourceSpec) -> Iterator[RawRow]:
    """The source's rows as read, before any mapping; a `UserError` naming the source when it is missing."""
    path = Path(source.path).expanduser()
    if path.exists():
        if source.hub:
            keys = ", ".join(f"'{key}'" for key, _ in source.hub)
            raise UserError(f"{source.where}: {keys} only apply to Hub datasets, and this is a local "
                            f"{'folder' if path.is_dir() else 'file'}")
        return iter_rows(path)
    if looks_like_hub_name(source.path):
        return iter_hub_rows(source.path, **dict(source.hub))
    raise UserError(f"{source.where}: 'path': no such file or folder")


def check_readable(sources: list[SourceSpec]) -> None:
    """Every source exists, and the columns its `columns` mapping names are in its first row: a
    `UserError` naming the source, the key and the row otherwise. Hub datasets are left to reading."""
    for source in sources:
        path = Path(source.path).expanduser()
        if not path.exists():
            if not looks_like_hub_name(source.path):
                raise UserError(f"{source.where}: 'path': no such file or folder")
            continue
        if not source.columns:
            continue
        first = next(iter(raw_rows(source)), None)
        if first is not None and isinstance(first.record, dict):
            try:
                map_columns(first, source)
            except ConversationError as error:
                row = first.location().removeprefix(f"{source.path}, ")  # the file only when a folder's
                raise UserError(f"{source.where}, {row}: {error}") from None


def map_columns(raw: RawRow, source: SourceSpec) -> dict:
    """The row's record with the source's columns renamed to the keys its format reads; a missing column is
    a `ConversationError` (a bad row) that names the key and the columns the row has."""
    record = dict(raw.record)
    for key, column in source.columns:
        if column not in raw.record:
            have = ", ".join(repr(k) for k in raw.record) or "none"
            raise ConversationError(f"'columns' maps {key!r} to the column {column!r}, which this row does not "
                                    f"have (its columns: {have})")
        record.pop(column)
    for key, column in source.columns:
        record[key] = raw.record[column]
    return record


def _renamed_speakers(record: dict, roles: dict[str, str]) -> dict:
    """`record` with the speakers of its message lists (`role` or `from`) renamed by `roles`."""
    for key in TURN_KEYS:
        turns = record.get(key)
        if isinstance(turns, str) and turns.lstrip().startswith("["):  # a CSV cell holds the list as JSON text
            try:
                turns = json.loads(turns)
            except ValueError:
                continue  # the format's own reader reports it
        if not isinstance(turns, list):
            continue
        renamed = []
        for message in turns:
            if isinstance(message, dict):
                message = dict(message)
                for speaker_key in ("role", "from"):
                    speaker = message.get(speaker_key)
                    if isinstance(speaker, str) and speaker in roles:
                        message[speaker_key] = roles[speaker]
            renamed.append(message)
        record[key] = renamed
    return record


def mapped_rows(source: SourceSpec) -> Iterator[RawRow]:
    """The source's rows with its columns and speakers renamed: what its format then reads. A row whose
    column is missing is a bad row (an error, or skipped and counted with `on_bad_row: skip`)."""
    roles = dict(source.roles)
    for raw in raw_rows(source):
        if raw.error is not None or not isinstance(raw.record, dict) or not (source.columns or roles):
            yield raw
            continue
        try:
            record = map_columns(raw, source)
        except ConversationError as error:
            yield dataclasses.replace(raw, record=None, error=str(error))
            continue
        yield dataclasses.replace(raw, record=_renamed_speakers(record, roles))


def with_system(conv: Conversation, system: str | None) -> Conversation:
    """`conv` with the system prompt `system` first, unless it has one of its own (or is plain text)."""
    if not system or conv.text is not None or any(m.role == "system" for m in conv.messages):
        return conv
    return dataclasses.replace(conv, messages=[Message("system", system), *conv.messages])


def content_hash(conv: Conversation) -> int:
    """A 64-bit hash of a conversation's content (messages, tools, text, variables), before the source's
    system prompt is added: the same row gets the same hash in any source, in any position, under any seed."""
    from instructune.data.prepare import key_fields

    text = json.dumps(key_fields(conv), ensure_ascii=False, default=str, sort_keys=True)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def source_reader(source: SourceSpec, options: EncodingOptions,
                  hashes: array) -> Callable[[StreamTally | None], Iterator[tuple[int, Conversation]]]:
    """A `read(tally)` for `prepare_dataset`: the source's conversations, mapped and with its system prompt,
    recording each row's `content_hash` in `hashes` (an `array('Q')` indexed by row) as it goes."""

    def read(tally: StreamTally | None = None) -> Iterator[tuple[int, Conversation]]:
        stream = stream_conversations(source.where, data_format=options.data_format, on_bad_row=options.on_bad_row,
                                      tally=tally, rows=mapped_rows(source))
        for index, conv in stream:
            if index >= len(hashes):
                hashes.extend([0] * (index + 1 - len(hashes)))
                hashes[index] = content_hash(conv)
            yield index, with_system(conv, source.system)

    return read

