"""Where records come from: local files (JSON, JSONL, Parquet, CSV), folders of them, or the Hub.

`iter_rows` yields every row of a source as a `RawRow` carrying where it came from, so that any
later error can name the file and the row. JSON and JSONL are parsed with the standard library
(much faster than going through `datasets` for files of this size); Parquet with pyarrow; CSV with
the standard `csv` module. Only a name that is not a local path goes through `datasets.load_dataset`.

Row numbering, as error messages show it:
- JSONL: `line N`, the 1-based line number in the file (blank lines are skipped but still counted
  as lines, so N is what an editor shows).
- JSON, Parquet, CSV and Hub datasets: `row N`, the 0-based index of the record in that file (for
  CSV the header is not a row).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructune.data.formats import find_format
from instructune.errors import UserError, where

JSON_SUFFIXES = (".json",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DATA_SUFFIXES = JSON_SUFFIXES + JSONL_SUFFIXES + (".parquet", ".csv")

# `name`, `owner/name`, optionally followed by `:split` (the split may carry slicing like `train[:10%]`).
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass(frozen=True, slots=True)
class RawRow:
    """One record as read from a source, before any format is applied."""

    file: str
    """The file (or Hub dataset) it came from, as error messages name it."""
    index: int
    """0-based position of the row within `file` (JSONL: counting non-blank lines)."""
    line: int | None
    """1-based line number for JSONL rows, None elsewhere."""
    record: Any
    """The parsed record (normally a dict); None when `error` is set."""
    error: str | None = None
    """Why the row could not be parsed (invalid JSON on a JSONL line), or None."""

    def location(self, field: str | None = None) -> str:
        """`data.jsonl, line 7` or `data.parquet, row 3`, optionally with the field."""
        return where(self.file, row=self.index, line=self.line, field=field)


def iter_rows(source: str | os.PathLike) -> Iterator[RawRow]:
    """Every row of a file, a folder of data files (sorted by path), or a Hub dataset `name[:split]`."""
    path = Path(source)
    if path.is_dir():
        files = data_files_in(path)
        if not files:
            raise UserError(f"{path}: the folder holds no data files ({', '.join(DATA_SUFFIXES)})")
        for file in files:
            yield from iter_file_rows(file)
    elif path.exists():
        yield from iter_file_rows(path)
    elif looks_like_hub_name(str(source)):
        yield from iter_hub_rows(str(source))
    else:
        raise UserError(f"{source}: no such file or folder")


def data_files_in(folder: Path) -> list[Path]:
    """The data files under `folder` (recursively, hidden ones skipped), sorted by relative path."""
    files = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and path.suffix.lower() in DATA_SUFFIXES and not any(
            part.startswith(".") for part in relative.parts
        ):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def looks_like_hub_name(source: str) -> bool:
    """True for `name`, `owner/name` or either with `:split`, and not for something ending like a file."""
    name = source.partition(":")[0]
    return bool(_HUB_NAME.fullmatch(name)) and not name.lower().endswith(DATA_SUFFIXES)


def iter_file_rows(path: Path) -> Iterator[RawRow]:
    """The rows of one file, read according to its extension."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _jsonl_rows(path)
    if suffix in JSON_SUFFIXES:
        return _json_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    if suffix == ".csv":
        return _csv_rows(path)
    raise UserError(f"{path}: unknown file type {suffix or '(no extension)'!r} (expected {', '.join(DATA_SUFFIXES)})")


def _jsonl_rows(path: Path) -> Iterator[RawRow]:
    index = 0
    # Binary lines: `json.loads` decodes bytes itself (and skips a BOM), and a badly encoded line
    # becomes one bad row instead of making the whole file unreadable.
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record, error = json.loads(line.rstrip(b"\r\n")), None
            except json.JSONDecodeError as exc:
                # The decoder's own "line 1" would contradict the file line the message names.
                record, error = None, f"invalid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})"
            except UnicodeDecodeError as exc:
                record, error = None, f"invalid JSON (not UTF-8 text: {exc})"
            yield RawRow(str(path), index, line_number, record, error)
            index += 1


def _json_rows(path: Path) -> Iterator[RawRow]:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except ValueError as exc:
        hint = " (one record per line? name the file .jsonl)" if str(exc).startswith("Extra data") else ""
        raise UserError(f"{path}: not a valid JSON file: {exc}{hint}") from None
    records = _records_in_json(data, path)
    for index, record in enumerate(records):
        yield RawRow(str(path), index, None, record)


def _looks_like_record(value: Any) -> bool:
    return isinstance(value, dict) and find_format(value) is not None


def _records_in_json(data: Any, path: Path) -> list:
    """A JSON file's records: a top-level list, the one list inside an object ({"data": [...]}),
    or a single record."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        # {"messages": [...]} is one record, {"data": [...]} a wrapper: tell them apart by what the list holds.
        if len(lists) == 1 and (not _looks_like_record(data) or (lists[0] and _looks_like_record(lists[0][0]))):
            return lists[0]
        if _looks_like_record(data):
            return [data]
        keys = ", ".join(repr(k) for k in data) or "none"
        raise UserError(
            f"{path}: expected a list of records, or an object holding exactly one list of records "
            f"(like {{\"data\": [...]}}); found an object with keys {keys}"
        )
    raise UserError(f"{path}: expected a list of records, found a JSON {type(data).__name__}")


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        index = 0
        for batch in batches:
            for record in batch.to_pylist():
                yield RawRow(str(path), index, None, record)
                index += 1
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise UserError(f"{path}: cannot read the Parquet file: {exc}") from None


def _csv_rows(path: Path) -> Iterator[RawRow]:
    # Responses are often longer than the csv module's default 128 KiB cell limit.
    csv.field_size_limit(2**31 - 1)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        index = 0
        try:
            for record in reader:
                # A row with more cells than the header puts the rest under the key None: not a column.
                record.pop(None, None)
                yield RawRow(str(path), index, None, record)
                index += 1
        except (csv.Error, UnicodeDecodeError) as exc:
            raise UserError(f"{where(str(path), row=index)}: cannot read the CSV file: {exc}") from None


def iter_hub_rows(source: str, **load_options: Any) -> Iterator[RawRow]:
    """The rows of a Hugging Face dataset `name` or `name:split` (split `train` by default).

    `load_options` go to `datasets.load_dataset` as they are (`name` for a configuration, `revision`,
    `data_files`, `split`, which wins over the one after the colon); those that are None are left out.
    """
    name, _, split = source.partition(":")
    options = {"split": split or "train", **{k: v for k, v in load_options.items() if v is not None}}
    try:
        import datasets

        dataset = datasets.load_dataset(name, **options)
    except Exception as exc:  # noqa: BLE001 - offline, missing, private, bad split: all mean "cannot load"
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(
            f"{source}: no such local file or folder, and it could not be loaded as a Hugging Face dataset "
            f"({type(exc).__name__}: {reason})"
        ) from None
    for index, record in enumerate(dataset):
        yield RawRow(source, index, None, record)
