"""`instructune prepare`'s output: the encoded rows as a dataset folder, with the preparation summary beside them.

A folder holds the rows in one of `FORMATS` and `SUMMARY_FILE`, the preparation report as JSON (what
`inspect` prints: rows read, kept, dropped by reason, tokens, lengths, warnings) with the settings that
made the rows. It is written under a temporary name beside its place and renamed into place when it is
complete, so an error half way leaves no half-written folder, and an existing folder is replaced only
when asked (`overwrite`), and then only once the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import instructune
from instructune.data.encoded import EncodedRow, PreparationReport
from instructune.data.hf_dataset import arrow_batches, columns, features, has_sources, row_dict
from instructune.disk import disk_full_error, is_disk_full
from instructune.errors import UserError
from instructune.show.summary import length_stats

FORMATS = ("hf", "parquet", "jsonl")
"""hf: a `datasets.save_to_disk` folder (`datasets.load_from_disk(DIR)`); parquet: `data.parquet`;
jsonl: `data.jsonl`, one `{"input_ids", "labels", "attention_mask", "row"}` object a line."""
SUMMARY_FILE = "preparation.json"
DATA_FILES = {"parquet": "data.parquet", "jsonl": "data.jsonl"}


def report_json(report: PreparationReport) -> dict[str, Any]:
    """The preparation report as plain JSON values (lengths as statistics, not one number per row)."""
    return {
        "rows_read": report.rows_read, "rows_kept": report.rows_kept, "dropped": dict(sorted(report.dropped.items())),
        "dropped_rows": [[row, reason] for row, reason in report.drops], "truncated": report.truncated,
        "tokens_total": report.tokens_total, "tokens_trained": report.tokens_trained,
        "trained_fraction": report.trained_fraction, "tokens_per_role": dict(report.tokens_per_role),
        "trained_per_role": dict(report.trained_per_role),
        "lengths": length_stats(report.lengths) if report.lengths else None,
        "expanded": {"conversations": report.expanded, "rows": report.expanded_rows,
                     "tokens": report.expanded_tokens, "trained": report.expanded_trained},
        "warnings": dict(sorted(report.warnings.items())), "notes": dict(sorted(report.notes.items())),
        "bad_row_messages": list(report.bad_row_messages),
    }


def check_output_folder(output: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """`output` as a path, or a `UserError` when it is a file, or a non-empty folder and not `overwrite`."""
    path = Path(output).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; give a folder to write the dataset into")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{path} already exists and is not empty; give a new folder, or add --overwrite "
                        "(overwrite=True) to replace it")
    return path


def write_prepared_folder(output: str | os.PathLike, rows: Sequence[EncodedRow], report: PreparationReport, *,
                          fmt: str = "hf", settings: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write `rows` in format `fmt` and the summary (`report` and `settings`) into the folder `output`."""
    if fmt not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    path = check_output_folder(output, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from error
    try:
        _write_rows(tmp, rows, fmt)
        summary = {"instructune": instructune.__version__, "format": fmt, "columns": list(columns(has_sources(rows))),
                   "data_file": DATA_FILES.get(fmt), **(settings or {}), "report": report_json(report)}
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is private; the result should look like any other
        _move_into_place(tmp, path)
    except BaseException as error:
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.is_dir() else None
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, Exception) and is_disk_full(error):
            raise disk_full_error(path, written=written) from None
        if isinstance(error, OSError):
            raise UserError(f"cannot write {path}: {error.strerror or error}") from error
        raise
    return path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an existing `path` (empty, or replaced by `overwrite`) goes only once `tmp` is complete."""
    if not path.exists():
        tmp.rename(path)
        return
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _write_rows(folder: Path, rows: Sequence[EncodedRow], fmt: str) -> None:
    if fmt == "jsonl":
        with (folder / DATA_FILES["jsonl"]).open("w", encoding="utf-8", newline="\n") as file:
            for row in rows:
                file.write(json.dumps(row_dict(row), separators=(",", ":")) + "\n")
        return
    import pyarrow as pa

    sources = has_sources(rows)
    schema = features(sources).arrow_schema
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with pq.ParquetWriter(folder / DATA_FILES["parquet"], schema) as writer:
            for batch in arrow_batches(rows, sources):
                writer.write_batch(batch)
        return
    # hf: the batches into one Arrow file (streamed: memory holds one batch), memory-mapped by `datasets`
    # and saved as its folder.
    from datasets import Dataset, DatasetInfo

    # (`save_to_disk` refuses a folder that holds the file it reads, so the file lies beside it.)
    fd, scratch = tempfile.mkstemp(dir=folder.parent, prefix=f"{folder.name}.rows.", suffix=".arrow")
    os.close(fd)
    try:
        with pa.OSFile(scratch, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in arrow_batches(rows, sources):
                writer.write_batch(batch)
        dataset = Dataset.from_file(scratch, info=DatasetInfo(features=features(sources)))
        with _no_progress_bars():  # one file's copy: `datasets`' bar would only be noise beside our own lines
            dataset.save_to_disk(str(folder))
        del dataset
    finally:
        os.unlink(scratch)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()
